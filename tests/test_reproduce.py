"""experiments/reproduce.py: the paper's rows, the commands, the cost model, the comparison, one real run."""
import csv
import importlib.util
import re
import shlex
import subprocess
import sys

import pytest

from conftest import python_env
from gpfq.paths import REPO_ROOT

from helpers import plain_log_columns, run_python, script_settings

PLAIN_COLUMNS = plain_log_columns()

SCRIPT = REPO_ROOT / "experiments" / "reproduce.py"
PAPER = REPO_ROOT / "experiments" / "paper_results.csv"


def load():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args, cwd=None):
    return run_python([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                      env=python_env(), cwd=cwd, timeout=600)


def paper_rows():
    with open(PAPER, newline="") as f:
        return list(csv.DictReader(f))


def test_paper_csv_carries_the_logged_numbers():
    rows = {r["id"]: r for r in paper_rows()}
    tables = {}
    for r in rows.values():
        tables[r["table"]] = tables.get(r["table"], 0) + 1
    assert tables == {"plain": 21, "plain_4to6": 6, "efficientnet_b7": 1, "sweep": 98, "adhoc_bias_last_float": 12,
                      "adhoc_bias_last": 12, "adhoc_float_ends": 2, "ours_vgg16_m2048": 3}
    r = rows["plain-resnet50-m512-b3"]
    assert (r["scalar_C"], r["logged_top1"], r["logged_top5"], r["float_top1"]) == ("1.81", "68.51", "89.18", "76.13")
    assert (r["percentile"], r["retain_rate"], r["seed"]) == ("1.0", "0.25", "0") and "not stated" not in r["note"]
    # the 12 ad hoc rows of 'correct bias and left last layer unquantized': last layer float, bias batch 2048, seed 1
    r = rows["adhoc_bias_last_float-resnet18-m2048-b5"]
    assert (r["logged_top1"], r["logged_top5"], r["seed"]) == ("69.18", "88.70", "1")
    assert "bias_correction=last_float" in r["options"] and "bias_batch_size=2048" in r["options"]
    # the quantized last layer corrected: other numbers (ResNet-50 3/4/5 bits 70.85/74.24/75.23)
    assert [rows[f"adhoc_bias_last-resnet50-m1024-b{b}"]["logged_top1"] for b in "345"] == ["70.85", "74.24", "75.23"]
    assert all("bias_correction=last;" in rows[f"adhoc_bias_last-resnet50-m1024-b{b}"]["options"] for b in "345")
    assert rows["adhoc_float_ends-resnet18-m2048-b4"]["logged_top1"] == "68.70"
    assert (rows["sweep-resnet18-m32-b4"]["logged_top1"], rows["sweep-resnet18-m32-b4"]["logged_top5"]) == ("19.52", "43.65")
    assert rows["plain_4to6-mobilenet_v2-m2048-b6"]["logged_top5"] == "89.85"
    b7 = rows["efficientnet_b7-efficientnet_b7-m512-b5"]
    assert (b7["float_top1"], b7["float_top5"]) == ("84.12", "96.91")
    # two logged runs of the same settings: the figure's is kept, the other named in the note
    assert rows["plain-googlenet-m2048-b5"]["logged_top1"] == "68.61" and "68.53/88.69" in rows["plain-googlenet-m2048-b5"]["note"]
    assert rows["plain-alexnet-m2048-b3"]["logged_top1"] == "53.23"
    assert "51.81" in rows["plain-alexnet-m2048-b3"]["note"] and "50.99" in rows["plain-alexnet-m2048-b3"]["note"]
    ours = [r for r in rows.values() if r["table"] == "ours_vgg16_m2048"]  # VGG-16 at m 2048: not in the paper
    assert [(r["model"], r["m"], r["bits"], r["logged_top1"]) for r in ours] == [("vgg16", "2048", b, "") for b in "345"]
    assert all(r["source"].startswith("ours: not in the paper") for r in ours)


def test_paper_csv_is_consistent():
    """Ids unique; every row sourced (a logged one by file@commit); one float accuracy per model; the sweep one
    row per (model, bits, m) below the model's plain m, with top-1 and top-5; every logged row has both."""
    rows = paper_rows()
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["id"] == f"{r['table']}-{r['model']}-m{r['m']}-b{r['bits']}" for r in rows)
    for r in rows:
        assert r["source"] and r["note"], r["id"]
        if not r["table"].startswith("ours"):
            assert re.search(r"\S+\.csv@[0-9a-f]{7}$", r["source"]), r["id"]
            assert r["logged_top1"] and r["logged_top5"] and r["float_top1"] and r["float_top5"], r["id"]
            assert 0 < float(r["logged_top1"]) <= float(r["logged_top5"]) <= 100, r["id"]
            assert float(r["logged_top1"]) <= float(r["float_top1"]) + 1, r["id"]
    floats = {}
    for r in rows:
        if r["float_top1"]:
            floats.setdefault(r["model"], set()).add((r["float_top1"], r["float_top5"]))
    assert all(len(v) == 1 for v in floats.values()), floats
    plain_m = {}
    for r in rows:
        if r["table"] in ("plain", "plain_4to6", "efficientnet_b7"):
            plain_m[r["model"]] = min(plain_m.get(r["model"], 1 << 30), int(r["m"]))
    sweep = [r for r in rows if r["table"] == "sweep"]
    assert {r["model"] for r in sweep} == set(plain_m)
    for r in sweep:
        plain_C = {p["scalar_C"] for p in rows if p["model"] == r["model"] and p["table"].startswith(("plain", "eff"))}
        assert int(r["m"]) < plain_m[r["model"]] and plain_C == {r["scalar_C"]}, r["id"]
    assert sorted({int(r["m"]) for r in sweep if r["model"] == "alexnet"}) == [32, 64, 128, 256, 512, 1024]


def test_every_listed_table_has_rows_and_sources():
    result = run("--list")
    assert result.returncode == 0, result.stderr
    listed = re.findall(r"^(\S+) \((\S+), (\d+) rows\)$", result.stdout, re.M)
    counts = {}
    for r in paper_rows():
        counts[r["table"]] = counts.get(r["table"], 0) + 1
    assert {t: int(n) for t, _, n in listed} == counts and all(int(n) > 0 for _, _, n in listed)
    for row in paper_rows():
        line = next(l for l in result.stdout.splitlines() if l.split() and l.split()[0] == row["id"])
        assert f"[{row['source']}]" in line


def test_list_prints_every_row():
    result = run("--list")  # a subprocess once: the script runs as a user calls it
    assert result.returncode == 0, result.stderr
    for row in paper_rows():
        assert row["id"] in result.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    reproduce = load()
    for args in (["--row", "no-such-row", "--dry-run"], ["--table", "nope", "--list"],
                 ["--row", "plain-vgg16-m512-b4", "--data_dir", str(tmp_path)]):  # no ImageNet there
        assert reproduce.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and err.startswith("error: ")
    assert "ImageNet" in err


def dry_run_commands(capsys, *args):
    assert load().main(["--dry-run", "--no_estimate", "--data_dir", "/data", *args]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines() if "quantize.py" in line]


def test_dry_run_commands_parse_in_their_scripts(capsys):
    """Each command's flags are the script's header keys, and give the row's hyperparameters."""
    commands = dry_run_commands(capsys)
    rows = paper_rows()
    reproduce = load()
    assert len(commands) == len({(r["variant"], r["model"], r["m"], r["options"], r["seed"]) for r in rows})
    covered = set()
    for argv in commands:
        variant = argv[1].split("/")[-2]
        config = script_settings(variant, *argv[2:])  # exits on an unknown flag
        assert config["dataset"] == "imagenet" and config["data_dir"] == "/data" and config["resume"] is True
        assert config["calibration"] == "fresh"  # the paper's procedure unless asked otherwise
        bits = config["bits"] if isinstance(config["bits"], list) else [config["bits"]]
        for row in rows:
            if (row["variant"], row["model"], int(row["m"])) == (variant, config["model_name"], config["batch_size"]) \
                    and int(row["bits"]) in bits and int(row["seed"]) == config["seed"] \
                    and (variant == "quantization_scripts" or str(config["bias_correction"]) ==
                         reproduce.options_of(row)["bias_correction"]):
                assert config["mlp_scalar"] == float(row["scalar_C"])
                assert config["cnn_scalar"] == float(reproduce.options_of(row).get("cnn_scalar", row["scalar_C"]))
                if "bias_batch_size" in row["options"]:
                    assert config["bias_batch_size"] == int(reproduce.options_of(row)["bias_batch_size"])
                covered.add(row["id"])
    assert covered == {r["id"] for r in rows}


def test_calibration_fixed_reaches_every_command(capsys):
    commands = dry_run_commands(capsys, "--calibration", "fixed", "--table", "plain", "adhoc_bias_last")
    assert commands and all(script_settings(argv[1].split("/")[-2], *argv[2:])["calibration"] == "fixed"
                            for argv in commands)


def fake_probe(layers, t_img=1e-3):
    return dict(t_img=t_img, layers=layers, c_rows=0.0, c0=0.0, model_bytes=1000)


def test_cost_model_scales_as_stated():
    reproduce = load()
    machine = dict(rates={"residual": 1e9, "gram": 1e9}, t_dec=0.0, startup=0.0)
    layer = dict(kind="linear", n0=64, n1=32, groups=1, patches=1, macs=64 * 32, activation=64)
    shallow = fake_probe([layer] * 4)
    deep = fake_probe([layer] * 8, t_img=2e-3)  # twice the layers, each image twice as long to run
    cost = lambda probe, m, **kw: reproduce.point_cost(probe, machine, m, dataset="fashion_mnist", n_eval=1,
                                                        **dict(dict(engine="residual"), **kw))
    a, b, c = cost(shallow, 128), cost(deep, 128), cost(shallow, 512)
    # fresh forwards: 2·m·t_img·Σ f_i, f_i = i/L for equal layers: (L+1)/2 → m·t_img·(L+1)
    assert a["forwards"] == pytest.approx(128 * 1e-3 * 5)
    assert b["forwards"] == pytest.approx(128 * 2e-3 * 9)  # ~ depth²
    assert c["forwards"] == pytest.approx(4 * a["forwards"])  # linear in m
    # residual rule: rows·N0·(3·N1 + 2·B) per layer, B = min(block, N0); linear in m
    assert c["rule"] == pytest.approx(4 * a["rule"])
    assert a["rule"] > 4 * 128 * 64 * 3 * 32 / 1e9
    # memory: X and X̃ rows of the largest layer in float32, flat in m under the Gram form
    assert c["memory"] - a["memory"] == pytest.approx(2 * (512 - 128) * 64 * 4 + 3 * (256 - 128) * 64 * 4)
    g1, g2 = cost(shallow, 128, engine="gram"), cost(shallow, 4096, engine="gram")
    held = lambda m: 2 * 64 * 64 * 8 + 2 * min(m, 256) * 64 * 4 + 3 * min(m, 256) * 64 * 4
    assert g2["memory"] - g1["memory"] == pytest.approx(held(4096) - held(128))
    # an evaluation batch of 256 images (3 activations each) outweighs 2·128 rows + 3 of 128 images' activations
    full_eval = reproduce.point_cost(shallow, machine, 128, engine="residual", dataset="fashion_mnist")
    assert full_eval["memory"] - a["memory"] == pytest.approx(3 * 256 * 64 * 4 - (2 * 128 + 3 * 128) * 64 * 4)
    # fixed calibration: one pass of m images through both networks (linear in depth), all m images held
    f_shallow, f_deep = cost(shallow, 128, calibration="fixed"), cost(deep, 128, calibration="fixed")
    assert f_shallow["forwards"] == pytest.approx(2 * 128 * 1e-3) and f_deep["forwards"] == pytest.approx(2 * 128 * 2e-3)
    assert f_shallow["memory"] - a["memory"] == pytest.approx(2 * 2 * 128 * 64 * 4 - 3 * 128 * 64 * 4)
    assert reproduce.speedup(1) == 1 and reproduce.speedup(5) == pytest.approx(1 + 4 * reproduce.PARALLEL_EFFICIENCY)
    assert reproduce.makespan([3, 2, 2, 1], 2) == 4


def test_plan_fits_jobs_to_memory():
    reproduce = load()
    units = [[{}]] * 8
    jobs, threads, reason = reproduce.plan(units, [dict(memory=10 * 2 ** 30)] * 8, 32, 8, 50 * 2 ** 30)
    assert (jobs, threads) == (4, 8) and "GiB" in reason
    assert reproduce.plan(units, [dict(memory=2 ** 30)] * 8, 32, 4, 50 * 2 ** 30) == (4, 8, "")


def test_compare_gives_the_deltas_of_a_logged_row(tmp_path):
    reproduce = load()
    row = next(r for r in paper_rows() if r["id"] == "plain-resnet18-m1024-b4")
    logged = {c: "" for c in PLAIN_COLUMNS}
    logged.update({"Model Name": "resnet18", "Dataset": "imagenet", "Quantization Batch Size": "1024", "Bits": "4",
                   "MLP_Alphabet_Scalar": "1.16", "CNN_Alphabet_Scalar": "1.16", "Seed": "0",
                   "Quantized Top1 Accuracy": "0.6801", "Quantized Top5 Accuracy": "0.8790"})
    other = dict(logged, Bits="3", **{"Quantized Top1 Accuracy": "0.1"})
    with open(tmp_path / "Quantization_Log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, PLAIN_COLUMNS)
        writer.writeheader()
        writer.writerows([other, logged])
    [line] = reproduce.compare([row], tmp_path)
    assert line["ours_top1"] == 68.01 and line["delta_top1"] == pytest.approx(68.01 - 67.70)
    assert line["delta_top5"] == pytest.approx(87.90 - 88.09)
    table = reproduce.markdown([line])
    assert "| 67.7 | 68.01 | +0.31 |" in table and "-0.19" in table
    assert reproduce.compare([row], tmp_path, calibration="fixed")[0]["ours_top1"] is None  # logged as fresh
    [missing] = reproduce.compare([dict(row, bits="5")], tmp_path)
    assert missing["ours_top1"] is None and "–" in reproduce.markdown([missing])


@pytest.mark.slow
def test_end_to_end_one_tiny_row(tmp_path):
    """A one-row table on Fashion-MNIST: the script runs, its row is matched, the side-by-side table printed."""
    fields = paper_rows()[0].keys()
    tiny = dict.fromkeys(fields, "")
    tiny.update(id="tiny", table="tiny", variant="quantization_scripts", model="fashion_resnet",
                dataset="fashion_mnist", bits="4", scalar_C="1.3", m="64", percentile="1.0", retain_rate="0.25",
                seed="0", options="alphabet=gpfq2022", logged_top1="90.00", logged_top5="99.00", source="test")
    with open(tmp_path / "tiny.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerow(tiny)
    result = run("--paper_csv", str(tmp_path / "tiny.csv"), "--log_dir", str(tmp_path / "logs"), "--out",
                 str(tmp_path / "out"), "--no_estimate", "--cores", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    [logged] = list(csv.DictReader(open(tmp_path / "logs" / "Quantization_Log.csv")))
    ours = round(100 * float(logged["Quantized Top1 Accuracy"]), 2)
    assert f"| tiny | fashion_resnet | 4 | 64 | 1.3 | 90.0 | {ours} | {ours - 90:+.2f} |" in result.stdout
    assert (tmp_path / "out" / "reproduce.md").read_text() in result.stdout
    assert (tmp_path / "out" / "reproduce.png").stat().st_size > 0


def write_mini_imagenet(root):
    """ILSVRC2012/train and val in class folders: 3 wnids, 4 train and 2 val JPEGs each (random pixels)."""
    import numpy as np
    from PIL import Image
    for c, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
        for split, n in (("train", 4), ("val", 2)):
            for i in range(n):
                path = root / "ILSVRC2012" / split / wnid / f"{wnid}_{split}_{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.random.default_rng(100 * c + 10 * i + len(split)).integers(0, 255, (240, 260, 3))
                Image.fromarray(pixels.astype(np.uint8)).save(path, "JPEG")


@pytest.mark.slow
def test_end_to_end_paper_row_random_weights_synthetic_imagenet(tmp_path):
    """A paper row (ResNet-18, 4 bits) at m 4 on a synthetic ImageNet with random weights: the command carries
    --weights random and --eval_subset, the row is matched with the same weights and subset only, and the table
    shows ours beside the logged 67.70 with the delta."""
    write_mini_imagenet(tmp_path / "data")
    rows = paper_rows()
    row = dict(next(r for r in rows if r["id"] == "plain-resnet18-m1024-b4"), m="4")
    with open(tmp_path / "one.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, rows[0].keys())
        writer.writeheader()
        writer.writerow(row)
    args = ["--paper_csv", str(tmp_path / "one.csv"), "--log_dir", str(tmp_path / "logs"), "--out", str(tmp_path / "out"),
            "--data_dir", str(tmp_path / "data"), "--weights", "random", "--eval_subset", "6", "--no_estimate"]
    result = run(*args, "--cores", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    [logged] = list(csv.DictReader(open(tmp_path / "logs" / "Quantization_Log.csv")))
    assert (logged["Weights"], logged["Eval Subset"], logged["Calibration"], logged["Model Name"]) == (
        "random", "6", "fresh", "resnet18")
    ours = round(100 * float(logged["Quantized Top1 Accuracy"]), 2)
    assert f"| plain-resnet18-m1024-b4 | resnet18 | 4 | 4 | 1.16 | 67.7 | {ours} | {ours - 67.70:+.2f} |" in result.stdout
    # the same log read for the pretrained weights or the whole set: nothing of ours to show
    assert load().compare([row], tmp_path / "logs")[0]["ours_top1"] is None
    assert load().compare([row], tmp_path / "logs", weights="random", eval_subset=6)[0]["ours_top1"] == ours


def test_sweep_table_of_one_model_prices_one_command_per_m(capsys):
    commands = dry_run_commands(capsys, "--table", "sweep", "--models", "resnet18")
    ms = [script_settings("quantization_scripts", *argv[2:])["batch_size"] for argv in commands]
    assert ms == [32, 64, 128, 256, 512]
    for argv in commands:
        config = script_settings("quantization_scripts", *argv[2:])
        assert config["bits"] == [3, 4, 5] and config["cnn_scalar"] == config["mlp_scalar"] == 1.16
    assert load().main(["--table", "sweep", "--models", "nope", "--dry-run", "--no_estimate"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown model nope")


def _our_log(path, rows):
    """A plain-GPFQ log with our rows: (model, m, bits, C, seed, top-1 fraction, calibration)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, PLAIN_COLUMNS)
        writer.writeheader()
        for model, m, bits, C, seed, top1, calibration in rows:
            row = {c: "" for c in PLAIN_COLUMNS}
            row.update({"Model Name": model, "Dataset": "imagenet", "Quantization Batch Size": str(m), "Bits": str(bits),
                        "MLP_Alphabet_Scalar": C, "CNN_Alphabet_Scalar": C, "Seed": str(seed), "Method": "gpfq",
                        "Quantized Top1 Accuracy": str(top1), "Quantized Top5 Accuracy": "0.9",
                        "Calibration": calibration})
            writer.writerow(row)


def test_plot_draws_the_authors_points_and_ours(tmp_path, capsys):
    reproduce = load()
    _our_log(tmp_path / "Quantization_Log.csv", [("resnet18", 64, 4, "1.16", 0, 0.5, "fresh"),
                                                 ("resnet18", 64, 4, "1.16", 0, 0.4, "fixed")])
    png = tmp_path / "fig.png"
    assert reproduce.main(["--plot", str(png), "--models", "resnet18", "--log_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "21 logged points, 1 of ours" in out and png.stat().st_size > 0  # 15 sweep + 6 plain (m 1024, 2048)
    curves = reproduce.authors_curves(reproduce.select(paper_rows(), models=["resnet18"]))
    assert [m for m, _, _ in curves["resnet18"][4]] == [32, 64, 128, 256, 512, 1024, 2048]
    lines = reproduce.compare(reproduce.select(paper_rows(), ids=["sweep-resnet18-m64-b4"]), tmp_path)
    assert lines[0]["ours_top1"] == 50.0 and lines[0]["delta_top1"] == pytest.approx(50.0 - 53.03)


def test_plot_model_draws_our_sweep_mean_and_sd(tmp_path, capsys):
    reproduce = load()
    _our_log(tmp_path / "Quantization_Log.csv", [("fashion_resnet", m, 4, "1.3", seed, top1, calibration)
                                                 for m, seed, top1, calibration in
                                                 [(32, 0, 0.80, "fresh"), (32, 1, 0.82, "fresh"), (64, 0, 0.9, "fresh"),
                                                  (32, 0, 0.70, "fixed")]])
    png = tmp_path / "ours.png"
    assert reproduce.main(["--plot", str(png), "--plot_model", "fashion_resnet", "--log_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| fresh | 4 | 32 | 81.00 ± 1.41 | 2 |" in out and "| fixed | 4 | 32 | 70.00 ± 0.00 | 1 |" in out
    assert png.stat().st_size > 0
    assert reproduce.main(["--plot", str(png), "--plot_model", "nope", "--log_dir", str(tmp_path)]) == 2
    assert reproduce.main(["--plot_model", "fashion_resnet"]) == 2


def test_bias_rows_match_only_their_bias_batch_size_and_cnn_scalar(tmp_path):
    reproduce = load()
    row = next(r for r in paper_rows() if r["id"] == "adhoc_bias_last-vgg16-m512-b4")
    assert reproduce.cnn_scalar(row) == "1.0" and row["scalar_C"] == "0.975"
    argv = reproduce.command([row], None, tmp_path, 1)
    assert argv[argv.index("--cnn_scalar") + 1] == "1.0" and argv.count("--cnn_scalar") == 1
    assert argv[argv.index("--bias_batch_size") + 1] == "2048"
    logged = {"Model Name": "vgg16", "Dataset": "imagenet", "Bits": "4", "MLP_Alphabet_Scalar": "0.975",
              "CNN_Alphabet_Scalar": "1.0", "Quantization Batch Size": "512", "Seed": "1", "Bias Correction": "last",
              "Skip Layers": "", "Bias Correction Batch Size": "1024", "Quantized Top1 Accuracy": "0.7"}
    assert reproduce.match(row, [logged]) is None
    assert reproduce.match(row, [dict(logged, **{"Bias Correction Batch Size": "2048"})]) is not None


ASSEMBLE = REPO_ROOT / "scripts" / "assemble_paper_results.py"


def test_assembly_script_reads_the_logs_columns_and_refuses_a_missing_copy(tmp_path):
    spec = importlib.util.spec_from_file_location("assemble", ASSEMBLE)
    assemble = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assemble)
    assert assemble.percent("0.69666") == "69.67" and assemble.percent("0.7525") == "75.25"
    # a file without header: 16-field rows take the MLP/CNN header, 15-field rows one unnamed column after Bits
    text = ("alexnet,ILSVRC2012,2048,0.56522,0.51812,0.79066,0.76162,3,3,1.1,1.0,True,0.25,0,Y\n"
            "efficientnet_b1,ILSVRC2012,512,0.7761,0.75788,0.93596,0.92674,5,1.6,1.6,1.0,1.0,True,0.25,0,Y\n")
    a, b = assemble.runs_of("log_1208", text)
    assert assemble.agrees(a, "alexnet", 2048, 3, "1.1", seed=0) and assemble.numbers(a) == "51.81/76.16"
    assert assemble.agrees(b, "efficientnet_b1", 512, 5, "1.6", seed=0) and not assemble.agrees(b, "efficientnet_b1", 512, 5, "1.5")
    # every logged row of the CSV names one of the script's files
    sources = {f"{assemble.REPO} {assemble.where(k)}" for k in assemble.FILES}
    assert {r["source"] for r in paper_rows() if not r["table"].startswith("ours")} <= sources
    result = run_python([sys.executable, str(ASSEMBLE), "--logs", str(tmp_path / "none")], capture_output=True,
                        text=True, env=python_env())
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    (tmp_path / "copy").mkdir()
    result = run_python([sys.executable, str(ASSEMBLE), "--logs", str(tmp_path / "copy")], capture_output=True,
                        text=True, env=python_env())
    assert result.returncode == 2 and "DIR/COMMIT/PATH" in result.stderr


def tiny_csv(path, **changes):
    """A paper CSV of Fashion-MNIST rows (fashion_resnet, 4 bits, m 64), one per dict in `changes['rows']`."""
    fields = paper_rows()[0].keys()
    base = dict.fromkeys(fields, "")
    base.update(id="tiny", table="tiny", variant="quantization_scripts", model="fashion_resnet",
                dataset="fashion_mnist", bits="4", scalar_C="1.3", m="64", percentile="1.0", retain_rate="0.25",
                seed="0", options="alphabet=gpfq2022", logged_top1="90.00", logged_top5="99.00", source="test")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for row in changes.get("rows", [{}]):
            writer.writerow(dict(base, **row))
    return path


@pytest.mark.slow  # reproduce.py runs quantize.py commands on the default model
def test_a_failed_command_makes_the_run_fail_after_running_the_others(tmp_path):
    """Two commands the script refuses (m 0: bad input, exit 2): both run, the table is still written, then the
    run says how many failed and exits with the first failure's status."""
    paper = tiny_csv(tmp_path / "bad.csv", rows=[dict(id="bad-a", m="0"), dict(id="bad-b", m="0", seed="1")])
    result = run("--paper_csv", str(paper), "--log_dir", str(tmp_path / "logs"), "--out", str(tmp_path / "out"),
                 "--no_estimate")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("failed (exit 2): ") == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "2 of 2 commands failed (the first with exit 2): their rows " \
                                                     "are missing from the comparison"
    assert "| bad-a |" in (tmp_path / "out" / "reproduce.md").read_text()


@pytest.mark.slow  # reproduce.py runs quantize.py commands on the default model
def test_ctrl_c_stops_the_commands_and_says_how_to_go_on(tmp_path):
    """SIGINT to reproduce.py while a command runs: the command is stopped (its own Ctrl-C handling), and one
    line says what finished and how to go on; exit 130, no traceback."""
    import os
    import signal
    paper = tiny_csv(tmp_path / "one.csv", rows=[dict(m="256")])
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--paper_csv", str(paper), "--log_dir",
                                str(tmp_path / "logs"), "--out", str(tmp_path / "out"), "--no_estimate",
                                "--cores", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(python_env(), PYTHONUNBUFFERED="1"),
                               # as from a terminal: a suite started in the background inherits SIGINT ignored
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in process.stdout:  # the command's first quantized layer: it is inside its grid
            if line.startswith("[1/"):
                break
        os.kill(process.pid, signal.SIGINT)  # the script only, as a terminal's Ctrl-C reaches it
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"interrupted: 0 of 1 commands finished, 1 stopped, 0 not started; the rows of finished grid points are in "
        f"{tmp_path / 'logs'}. Run the same command again to go on (each command carries --resume: finished "
        f"points are skipped, a stopped one continues from its last layer checkpoint)")
    import json
    [timing] = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert timing["exit"] == 130  # the command itself was stopped and waited for


def test_a_closed_pipe_ends_the_listing_quietly():
    """`reproduce.py --list | head`: the reader goes away; no BrokenPipeError, no traceback."""
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--list"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=python_env())
    process.stdout.close()  # before the script writes anything: every write meets a closed pipe
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141 and err == ""


def test_a_rehearsal_is_labelled_in_every_output_and_takes_m_and_model_dir(tmp_path, capsys):
    """--weights random, --eval_subset and --m make a rehearsal: the commands carry them (and --model_dir), the
    dry run, the table, reproduce.md and the plot say 'rehearsal', and rows are matched at the rehearsal's m."""
    reproduce = load()
    commands = dry_run_commands(capsys, "--table", "sweep", "--models", "resnet18", "--weights", "random",
                                "--eval_subset", "6", "--m", "4", "--model_dir", str(tmp_path / "models"))
    [argv] = commands  # the sweep's five m collapse into one command at m 4
    config = script_settings("quantization_scripts", *argv[2:])
    assert (config["batch_size"], config["bits"], config["weights"], config["eval_subset"], config["model_dir"]) == (
        4, [3, 4, 5], "random", 6, str(tmp_path / "models"))
    assert load().main(["--dry-run", "--no_estimate", "--data_dir", "/data", "--row", "plain-resnet18-m1024-b4",
                        "--weights", "random", "--m", "4"]) == 0
    label = "rehearsal, not a reproduction (random weights, m 4 instead of each row's): its top-1 is not comparable " \
            "with the paper's"
    assert capsys.readouterr().out.splitlines()[0] == label
    row = {c: "" for c in PLAIN_COLUMNS}
    row.update({"Model Name": "resnet18", "Dataset": "imagenet", "Quantization Batch Size": "4", "Bits": "4",
                "MLP_Alphabet_Scalar": "1.16", "CNN_Alphabet_Scalar": "1.16", "Seed": "0", "Weights": "random",
                "Eval Subset": "6", "Quantized Top1 Accuracy": "0.0", "Quantized Top5 Accuracy": "0.5"})
    with open(tmp_path / "Quantization_Log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, PLAIN_COLUMNS)
        writer.writeheader()
        writer.writerow(row)
    args = ["--row", "plain-resnet18-m1024-b4", "--log_dir", str(tmp_path), "--weights", "random",
            "--eval_subset", "6", "--m", "4"]
    assert reproduce.main(["--compare_only", "--no_estimate", "--out", str(tmp_path / "out"), *args]) == 0
    out = capsys.readouterr().out
    written = (tmp_path / "out" / "reproduce.md").read_text()
    assert written in out
    label = ("rehearsal, not a reproduction (random weights, evaluation on a 6-image subset, m 4 instead of each "
             "row's): its top-1 is not comparable with the paper's")
    assert written.splitlines()[0] == f"**{label}**"
    assert "| plain-resnet18-m1024-b4 | resnet18 | 4 | 1024 | 1.16 | 67.7 | 0.0 | -67.70 | 88.09 | 50.0 | -38.09 | " \
           "rehearsal |" in written
    assert f"wrote {tmp_path / 'out' / 'reproduce.md'} and {tmp_path / 'out' / 'reproduce.png'} ({label})" in out
    assert reproduce.main(["--plot", str(tmp_path / "m.png"), *args]) == 0
    assert f"1 logged points, 1 of ours ({label})" in capsys.readouterr().out
    # without the rehearsal's settings the same log has nothing to compare
    assert reproduce.main(["--compare_only", "--no_estimate", "--out", str(tmp_path / "real"), "--row",
                           "plain-resnet18-m1024-b4", "--log_dir", str(tmp_path)]) == 0
    real = capsys.readouterr().out + (tmp_path / "real" / "reproduce.md").read_text()
    assert "rehearsal, not" not in real and "| rehearsal |" not in real and "| – | – | 88.09 | – | – |" in real
    assert reproduce.main(["--m", "0", "--dry-run", "--no_estimate"]) == 2
    assert capsys.readouterr().err == "error: --m must be an integer ≥ 1, got 0\n"
