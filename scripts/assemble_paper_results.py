"""How experiments/paper_results.csv was assembled from the authors' logs, and a check that it still matches them.

    python3 scripts/assemble_paper_results.py --git PATH/TO/Quantized_Neural_Nets   # a clone of the original
    python3 scripts/assemble_paper_results.py --logs DIR                            # or a copy of the files
    python3 scripts/assemble_paper_results.py --git CLONE --write                   # rewrite the logged rows

The original repository (github.com/YixuanSeanZhou/Quantized_Neural_Nets) kept its runs in CSV logs that
changed over its history; no log is shipped here. Give either a clone (each file is read with
`git show COMMIT:PATH`) or a folder holding each file at DIR/COMMIT/PATH (COMMIT: the 7-character hashes of
FILES below). The script rebuilds every logged row of the CSV (all tables but the `ours_*` ones) from FILES
and the selections below, then compares it with experiments/paper_results.csv (exit 1 on a difference) or,
with --write, replaces the logged rows (the `ours_*` rows are kept).

Columns read (names as in the logs' headers, which changed over time):
  Model Name, Quantization Batch Size (m), Bits, Quantized Top1/Top5 Accuracy, Original Top1/Top5 Accuracy
  (fractions; written here as percent, 2 decimals), Alphabet_Scalar (older logs: one C for all layers) or
  MLP_Alphabet_Scalar and CNN_Alphabet_Scalar, Percentile or MLP_Percentile, Retain_rate, Seed, and in the bias
  logs Bias Correction Batch Size. A file without a header row is read with the 16 columns of the
  MLP/CNN header; its 15-field rows have one unnamed column after Bits (Bits, ?, C, Percentile, Include 0,
  Retain_rate, Seed, Author).

Selection: a run belongs to a row when model, m, bits, C (MLP), percentile 1.0, retain rate 0.25, the seed and,
for bias rows, the bias batch size agree. Where several runs agree, the first file listed for the row and
its first such run are kept; every other run with other numbers is listed in the row's note with its file.
"""
import argparse
import csv
import io
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER_CSV = ROOT / "experiments" / "paper_results.csv"
REPO = "Quantized_Neural_Nets"

FILES = {  # key: (commit, path in the original repository)
    "overall": ("023d8fb", "visualization/overall_log.csv"),
    "googlenet": ("f0afc07", "logs/GoogLeNet_Quantization_Log.csv"),
    "googlenet_2048": ("4628362", "logs/GoogLeNet_2048_Quantization_Log.csv"),
    "resnet18_2048": ("023d8fb", "logs/Resnet18_2048_Quantization_Log.csv"),
    "mobilenet_v2": ("8e6830f", "logs/MobileNet_v2_Quantization_Log.csv"),
    "efficientnet_1218": ("020032a", "logs/2021-12-18 02:35:15.486314_Quantization_Log.csv"),
    "log_1208": ("ba57b63", "logs/2021-12-08 15:59:17.234078_Quantization_Log.csv"),
    "efficientnet_b7_1216": ("ba57b63", "logs/2021-12-16 05:56:14.895529_Quantization_Log.csv"),
    "bias_last_float": ("859cf3d", "logs/Quantization_Log_Bias_Correct.csv"),
    "bias_last": ("859cf3d", "logs/2022-01-08 21:03:11.185018_Quantization_Log_Bias_Correct.csv"),
    "skip": ("42d38f8", "logs/2022-01-11 10:56:50.929209_Quantization_Log_Skip.csv"),
}
NO_HEADER = {"log_1208"}
HEADER_16 = ["Model Name", "Dataset", "Quantization Batch Size", "Original Top1 Accuracy", "Quantized Top1 Accuracy",
             "Original Top5 Accuracy", "Quantized Top5 Accuracy", "Bits", "MLP_Alphabet_Scalar", "CNN_Alphabet_Scalar",
             "MLP_Percentile", "CNN_Percentile", "Include 0", "Retain_rate", "Seed", "Author"]
HEADER_15 = HEADER_16[:8] + ["unnamed", "Alphabet_Scalar", "Percentile"] + HEADER_16[12:]

PLAIN_OPTIONS = "alphabet=gpfq2022; alphabet_granularity=layer"
# (table, model, C, m, bits, files: the first holds the kept run)
PLAIN = [
    ("plain", "alexnet", "1.1", 2048, (3, 4, 5), ["overall", "log_1208"]),
    ("plain", "vgg16", "0.975", 512, (3, 4, 5), ["overall"]),
    ("plain", "resnet18", "1.16", 1024, (3, 4, 5), ["overall"]),
    ("plain", "resnet18", "1.16", 2048, (3, 4, 5), ["resnet18_2048"]),
    ("plain", "resnet50", "1.81", 512, (3, 4, 5), ["overall"]),
    ("plain", "googlenet", "1.41", 1024, (3, 4, 5), ["overall", "googlenet"]),
    ("plain", "googlenet", "1.41", 2048, (3, 4, 5), ["googlenet_2048", "googlenet"]),
    ("plain_4to6", "mobilenet_v2", "1.77", 2048, (4, 5, 6), ["mobilenet_v2"]),
    ("plain_4to6", "efficientnet_b1", "1.6", 1024, (4, 5, 6), ["efficientnet_1218", "log_1208"]),
    ("efficientnet_b7", "efficientnet_b7", "2.26", 512, (5,), ["efficientnet_b7_1216", "log_1208"]),
]
# the m sweep: every logged m below the model's smallest plain m, at the plain rows' C
SWEEP = [
    ("alexnet", "1.1", 2048, (3, 4, 5), ["overall", "log_1208"]),
    ("vgg16", "0.975", 512, (3, 4, 5), ["overall"]),
    ("resnet18", "1.16", 1024, (3, 4, 5), ["overall"]),
    ("resnet50", "1.81", 512, (3, 4, 5), ["overall"]),
    ("googlenet", "1.41", 1024, (3, 4, 5), ["overall", "googlenet"]),
    ("mobilenet_v2", "1.77", 2048, (4, 5, 6), ["mobilenet_v2"]),
    ("efficientnet_b1", "1.6", 1024, (4, 5, 6), ["efficientnet_1218", "log_1208"]),
    ("efficientnet_b7", "2.26", 512, (5,), ["efficientnet_b7_1216", "log_1208"]),
]
# ad hoc: (model, m) at bias batch size 2048 (the size both bias logs use most, with 4096)
BIAS_MODELS = [("vgg16", 512), ("alexnet", 2048), ("resnet50", 1024), ("resnet18", 2048)]
BIAS_BATCH = 2048
BIAS = [  # table, file, option value, seeds in order of preference, what the variant is
    ("adhoc_bias_last_float", "bias_last_float", "last_float", (1,),
     "bias correction with the last layer left float (issue 33: the same runs are in logs/2022-01-11 "
     "10:56:40.070352_Quantization_Log_Bias_Correct.csv@9c03481, committed as 'correct bias and left last layer "
     "unquantized')"),
    ("adhoc_bias_last", "bias_last", "last", (1, 0), "bias correction of the quantized last layer"),
]
FLOAT_ENDS = ("adhoc_float_ends", "resnet18", "1.16", 2048, (4, 5), "skip")

FIELDS = ["id", "table", "variant", "model", "dataset", "bits", "scalar_C", "m", "percentile", "retain_rate", "seed",
          "options", "float_top1", "float_top5", "logged_top1", "logged_top5", "source", "note"]


class BadInput(Exception):
    pass


def percent(text) -> str:
    return str((Decimal(text) * 100).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def where(key) -> str:
    commit, path = FILES[key]
    return f"{path}@{commit}"


def read_text(key, git=None, logs=None) -> str:
    commit, path = FILES[key]
    if git:
        result = subprocess.run(["git", "-C", str(git), "show", f"{commit}:{path}"], capture_output=True, text=True)
        if result.returncode != 0:
            raise BadInput(f"git show {commit}:{path} failed in {git}: {result.stderr.strip().splitlines()[-1:]}")
        return result.stdout
    file = Path(logs) / commit / path
    if not file.is_file():
        raise BadInput(f"{file} does not exist (--logs DIR holds each file at DIR/COMMIT/PATH; see --help)")
    return file.read_text()


def runs_of(key, text) -> list:
    """The file's runs as dicts of its columns, with 'line' (1-based, header included) and 'file' (key)."""
    lines = list(csv.reader(io.StringIO(text)))
    if key in NO_HEADER:
        header, body, first = None, lines, 1
    else:
        header, body, first = lines[0], lines[1:], 2
    runs = []
    for number, fields in enumerate(body, first):
        if not fields:
            continue
        names = header or {16: HEADER_16, 15: HEADER_15}.get(len(fields))
        if names is None or len(names) != len(fields):
            continue
        run = dict(zip(names, fields), line=number, file=key)
        run["C"] = run.get("MLP_Alphabet_Scalar", run.get("Alphabet_Scalar"))
        run["cnn_C"] = run.get("CNN_Alphabet_Scalar", run["C"])
        run["percentile"] = run.get("MLP_Percentile", run.get("Percentile"))
        runs.append(run)
    return runs


def agrees(run, model, m, bits, C, seed=None, bias_batch=None) -> bool:
    return (run["Model Name"] == model and int(run["Quantization Batch Size"]) == m and int(run["Bits"]) == bits
            and float(run["C"]) == float(C) and float(run["percentile"]) == 1.0
            and float(run["Retain_rate"]) == 0.25 and (seed is None or int(run["Seed"]) == seed)
            and (bias_batch is None or int(run["Bias Correction Batch Size"]) == bias_batch))


def numbers(run) -> str:
    return f"{percent(run['Quantized Top1 Accuracy'])}/{percent(run['Quantized Top5 Accuracy'])}"


def others(kept, runs) -> str:
    """The runs with numbers other than the kept one's, grouped by file."""
    seen, by_file = {numbers(kept)}, {}
    for run in runs:
        if numbers(run) not in seen:
            seen.add(numbers(run))
            by_file.setdefault(run["file"], []).append(numbers(run))
    if not by_file:
        return ""
    return "; other logged runs of these settings: " + ", ".join(
        f"{' and '.join(v)} ({where(k)})" for k, v in by_file.items())


def row(table, variant, kept, options, note, dataset="imagenet") -> dict:
    model, m, bits = kept["Model Name"], kept["Quantization Batch Size"], kept["Bits"]
    if float(kept["cnn_C"]) != float(kept["C"]):
        options = f"{options}; cnn_scalar={float(kept['cnn_C'])}"
    return dict(id=f"{table}-{model}-m{m}-b{bits}", table=table, variant=variant, model=model, dataset=dataset,
                bits=bits, scalar_C=kept["C"], m=m, percentile=kept["percentile"], retain_rate=kept["Retain_rate"],
                seed=kept["Seed"], options=options, float_top1=percent(kept["Original Top1 Accuracy"]),
                float_top5=percent(kept["Original Top5 Accuracy"]), logged_top1=percent(kept["Quantized Top1 Accuracy"]),
                logged_top5=percent(kept["Quantized Top5 Accuracy"]), source=f"{REPO} {where(kept['file'])}",
                note=note)


def pick(runs_by_file, files, **wanted):
    found = [r for key in files for r in runs_by_file[key] if agrees(r, **wanted)]
    return (found[0], found) if found else (None, [])


def header_note(kept) -> str:
    scalar = ("C from the log's MLP_Alphabet_Scalar and CNN_Alphabet_Scalar" if "MLP_Alphabet_Scalar" in kept
              else "C from the log's one Alphabet_Scalar column (used for Linear and Conv2d layers)")
    return f"as logged: {scalar}, percentile {kept['percentile']}, retain rate {kept['Retain_rate']}, seed {kept['Seed']}"


def build(runs_by_file) -> list:
    rows = []
    for table, model, C, m, all_bits, files in PLAIN:
        for bits in all_bits:
            kept, found = pick(runs_by_file, files, model=model, m=m, bits=bits, C=C, seed=0)
            if kept is None:
                raise BadInput(f"no run of {model} m {m} {bits} bits C {C} in {', '.join(map(where, files))}")
            rows.append(row(table, "quantization_scripts", kept, PLAIN_OPTIONS, header_note(kept) + others(kept, found)))
    for model, C, limit, all_bits, files in SWEEP:
        points = sorted({(int(r["Bits"]), int(r["Quantization Batch Size"])) for key in files
                         for r in runs_by_file[key] if r["Model Name"] == model and int(r["Bits"]) in all_bits
                         and int(r["Quantization Batch Size"]) < limit
                         and agrees(r, model, int(r["Quantization Batch Size"]), int(r["Bits"]), C, seed=0)})
        for bits, m in points:
            kept, found = pick(runs_by_file, files, model=model, m=m, bits=bits, C=C, seed=0)
            rows.append(row("sweep", "quantization_scripts", kept, PLAIN_OPTIONS,
                            f"m sweep at the plain rows' C; {header_note(kept)}" + others(kept, found)))
    for table, key, mode, seeds, what in BIAS:
        for model, m in BIAS_MODELS:
            for bits in (3, 4, 5):
                kept = found = None
                for seed in seeds:
                    kept, found = pick(runs_by_file, [key], model=model, m=m, bits=bits, C=_plain_C(model),
                                       seed=seed, bias_batch=BIAS_BATCH)
                    if kept:
                        break
                if kept is None:
                    raise BadInput(f"no {mode} run of {model} m {m} {bits} bits in {where(key)}")
                elsewhere = [r for r in runs_by_file[key] if r["Seed"] != kept["Seed"]
                             and agrees(r, model, m, bits, _plain_C(model), bias_batch=BIAS_BATCH)]
                note = (f"{what}; bias batch size {BIAS_BATCH}; {header_note(kept)}" + others(kept, found)
                        + "".join(f"; seed {r['Seed']} logged {numbers(r)}" for r in elsewhere))
                if float(kept["cnn_C"]) != float(kept["C"]):
                    note += f"; the log records CNN_Alphabet_Scalar {float(kept['cnn_C'])} (MLP {kept['C']}): kept as logged"
                options = f"bias_correction={mode}; bias_batch_size={BIAS_BATCH}; skip_layers=None; {PLAIN_OPTIONS}"
                rows.append(row(table, "adhoc_quantization_scripts", kept, options, note))
    table, model, C, m, all_bits, key = FLOAT_ENDS
    for bits in all_bits:
        kept, found = pick(runs_by_file, [key], model=model, m=m, bits=bits, C=C, seed=0)
        note = (f"first and last layers left float (the skip log does not name the layers); no bias correction; "
                f"{header_note(kept)}" + others(kept, found))
        rows.append(row(table, "adhoc_quantization_scripts", kept,
                        f"skip_layers=both; bias_correction=None; {PLAIN_OPTIONS}", note))
    return rows


def _plain_C(model) -> str:
    return next(C for _, name, C, *_ in PLAIN if name == model)


def compare(built, current) -> list:
    """Differences between the rebuilt logged rows and the CSV's (ours_* rows aside)."""
    mine = {r["id"]: r for r in current if not r["table"].startswith("ours")}
    problems = [f"missing in the CSV: {r['id']}" for r in built if r["id"] not in mine]
    problems += [f"not from the logs: {i}" for i in mine if i not in {r["id"] for r in built}]
    for r in built:
        if r["id"] in mine:
            problems += [f"{r['id']}: {k} is {mine[r['id']].get(k)!r}, the logs give {v!r}"
                         for k, v in r.items() if mine[r["id"]].get(k) != v]
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--git", help="a clone of the original repository (all its history)")
    source.add_argument("--logs", help="a folder holding each file of FILES at DIR/COMMIT/PATH")
    parser.add_argument("--csv", default=str(PAPER_CSV), help="the CSV to check or write")
    parser.add_argument("--write", action="store_true", help="replace the CSV's logged rows by the rebuilt ones")
    args = parser.parse_args(argv)
    try:
        if args.git and not Path(args.git).is_dir():
            raise BadInput(f"{args.git} is not a folder (--git takes a clone of the original repository)")
        if args.logs and not Path(args.logs).is_dir():
            raise BadInput(f"{args.logs} is not a folder (--logs DIR holds each file at DIR/COMMIT/PATH)")
        runs_by_file = {key: runs_of(key, read_text(key, args.git, args.logs)) for key in FILES}
        built = build(runs_by_file)
        with open(args.csv, newline="") as f:
            current = list(csv.DictReader(f))
    except (BadInput, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.write:
        ours = [r for r in current if r["table"].startswith("ours")]
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(built + ours)
        print(f"wrote {len(built)} logged rows and kept {len(ours)} of ours in {args.csv}")
        return 0
    problems = compare(built, current)
    for problem in problems:
        print(problem)
    print(f"{len(built)} logged rows rebuilt, {len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
