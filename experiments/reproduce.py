"""Reproduce the paper's ImageNet tables: run the variant scripts on the rows of experiments/paper_results.csv.

    python3 experiments/reproduce.py --list                                  # the tables and their row ids
    python3 experiments/reproduce.py --table plain --dry-run --cores 32      # commands + time/memory estimate
    python3 experiments/reproduce.py --table plain --data_dir /data --jobs 4 # run, then compare with the paper

A real run calls the scripts (subprocess, `--resume`, so a rerun skips finished points and rows land in the
usual logs), then prints our top-1/top-5 beside the logged ones with the deltas, and writes
<out>/reproduce.md and <out>/reproduce.png (default out: logs/reproduce/). Rows are matched to log rows by
(variant, model, bits, C, m, seed and the ad hoc options). `--weights random`, `--eval_subset N` or `--m M` make a
rehearsal, labelled as such in every output (docs/paper.md).

Estimate (docs/paper.md). A probe per model, measured on this machine once and cached in a JSON file:
t_img (one float forward per image, random weights and images), the layers (N0, N1, groups, kept patches per
image, MACs), c_rows (seconds per row element gathered, fitted from `gpfq.quantize` on the first layers at a
small m), the layer rule's multiply-add rate per engine form, and t_dec (decoding + transform of one
ImageNet-sized JPEG). Per grid point, in one-core seconds:
    forwards = 2·m·t_img·Σ_i f_i + c_rows·Σ_i rows_i·N0_i   (f_i: share of the MACs up to layer i, both
               networks: fresh calibration re-runs the prefix, so ∝ m·depth²)
    rule     = Σ_i cost_i / rate_form   (cost_i = G·rows·N0·(3·N1 + 2·B) residual, G·(2·rows·N0² + N1·N0²)
               Gram: gpfq.methods.gpfq.engine.predicted_cost, form as engine 'auto' picks it)
    eval     = n_val·t_img (+ the float model once per command unless torchvision publishes it)
    decode   = (L·m + n_val)·t_dec, serial in the script's process (num_workers 0)
Threads: time/S(N) with S(N) = 1 + E·(N−1), E = PARALLEL_EFFICIENCY (decode excluded).
Peak memory: BASE_MEMORY + 2·model + the larger of [the largest layer's rows 2·G·rows·N0·4 B (Gram form:
2·G·N0²·8 B plus one chunk's rows) + three of one chunk's largest activations (fixed calibration: two per
image of all m, per network)] and [three of an evaluation batch's largest activations].
"""
import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, like experiments/plot_logs.py

from gpfq.errors import BadInputError  # noqa: E402

PAPER_CSV = ROOT / "experiments" / "paper_results.csv"
DEFAULT_OUT = ROOT / "logs" / "reproduce"
VARIANT_LOG = {"quantization_scripts": "Quantization_Log.csv"}
BIAS_LOG, SKIP_LOG = "Quantization_Log_Bias_Correct.csv", "Quantization_Log_Skip.csv"
PARALLEL_EFFICIENCY = 0.6   # S(N) = 1 + E·(N−1): per-column products scale poorly past a few threads
BASE_MEMORY = 0.6 * 2 ** 30  # torch and the script itself
CHUNK_IMAGES = 256          # gpfq.pipeline.streams.CalibrationStream's chunk
EVAL_BATCH = 256            # gpfq.runner.experiment's evaluation batch (eval_batch_size)
N_EVAL = {"imagenet": 50000, "fashion_mnist": 10000}
INPUT_SHAPE = {"fashion_mnist": (1, 28, 28), "imagenet": (3, 224, 224)}  # gpfq.io.data: Resize 256, crop 224
PROBE_M, PROBE_LAYERS = (8, 32), 3


def fail(message):
    raise BadInputError(message)


class CommandsInterrupted(Exception):
    """Ctrl-C while the commands ran: how many finished, were stopped, had not started."""

    def __init__(self, finished, stopped, pending):
        super().__init__()
        self.finished, self.stopped, self.pending = finished, stopped, pending


# ---------------------------------------------------------------- the paper's rows
def read_paper(path=PAPER_CSV) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def options_of(row) -> dict:
    """'bias_correction=last; skip_layers=None' -> {'bias_correction': 'last', 'skip_layers': 'None'}."""
    return dict(part.strip().split("=", 1) for part in row["options"].split(";") if part.strip())


def cnn_scalar(row) -> str:
    """C of the Conv2d layers: the row's scalar_C unless its options log another (cnn_scalar=...)."""
    return options_of(row).get("cnn_scalar", row["scalar_C"])


def select(rows, tables=None, ids=None, models=None) -> list:
    if models:
        unknown = sorted(set(models) - {r["model"] for r in rows})
        if unknown:
            fail(f"unknown model {', '.join(unknown)}: see --list")
        rows = [r for r in rows if r["model"] in models]
    if tables:
        unknown = sorted(set(tables) - {r["table"] for r in rows})
        if unknown:
            fail(f"unknown table {', '.join(unknown)}: see --list")
        rows = [r for r in rows if r["table"] in tables]
    if ids:
        unknown = [i for i in ids if i not in {r["id"] for r in rows}]
        if unknown:
            fail(f"unknown row {', '.join(unknown)}: see --list")
        rows = [r for r in rows if r["id"] in ids]
    return rows


def rehearsal(weights=None, eval_subset=None, m=None) -> str:
    """'' for a reproduction; else the line that labels a rehearsal's every output."""
    reasons = (["random weights"] if weights == "random" else []) \
        + ([f"evaluation on a {eval_subset}-image subset"] if eval_subset else []) \
        + ([f"m {m} instead of each row's"] if m else [])
    return (f"rehearsal, not a reproduction ({', '.join(reasons)}): its top-1 is not comparable with the paper's"
            if reasons else "")


def at_m(rows, m) -> list:
    """The rows to run at m (`--m`): each (group, bits) once."""
    if not m:
        return rows
    unique = {}
    for row in rows:
        row = dict(row, m=str(m))
        unique.setdefault((group_key(row), row["bits"]), row)
    return list(unique.values())


def group_key(row):
    """Rows one command runs as a grid over bits."""
    return (row["variant"], row["model"], row["dataset"], row["scalar_C"], row["m"], row["percentile"],
            row["retain_rate"], row["seed"], row["options"])


def units_of(rows, per_point: bool) -> list:
    """Lists of rows, each run by one command: a row group (all its bits), or one row each."""
    if per_point:
        return [[r] for r in rows]
    groups = {}
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)
    return list(groups.values())


def command(unit, data_dir, log_dir, threads, python=sys.executable, calibration="fresh", weights=None,
            eval_subset=None, model_dir=None) -> list:
    first = unit[0]
    argv = [python, str(ROOT / first["variant"] / "quantize.py"), "--model", first["model"],
            "--dataset", first["dataset"]]
    if data_dir:
        argv += ["--data_dir", str(data_dir)]
    argv += ["--bits", *[r["bits"] for r in unit], "--batch_size", first["m"],
             "--mlp_scalar", first["scalar_C"], "--cnn_scalar", cnn_scalar(first),
             "--mlp_percentile", first["percentile"], "--cnn_percentile", first["percentile"],
             "--retain_rate", first["retain_rate"], "--seed", first["seed"]]
    for key, value in options_of(first).items():
        if key != "cnn_scalar":
            argv += [f"--{key}", value]
    argv += ["--calibration", calibration]  # explicit: the paper's 'fresh' unless asked, whatever a header says
    if weights:
        argv += ["--weights", weights]
    if eval_subset:
        argv += ["--eval_subset", str(eval_subset)]
    argv += ["--num_threads", str(threads), "--log_dir", str(log_dir)]
    if model_dir:
        argv += ["--model_dir", str(model_dir)]
    return argv + ["--resume"]


# ---------------------------------------------------------------- probe
def cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gpfq" / "reproduce_probes.json"


def speedup(threads: int) -> float:
    return 1 + PARALLEL_EFFICIENCY * (max(1, threads) - 1)


def layer_profile(model, shape):
    """Conv2d/Linear layers in order of first use: N0, N1, groups, patches per image, MACs per image."""
    import torch
    from torch import nn
    layers, seen = [], set()

    def hook(module, inputs, output):
        if id(module) in seen:
            return
        seen.add(id(module))
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            groups = module.groups
            n0 = module.in_channels // groups * math.prod(module.kernel_size)
            n1 = module.out_channels // groups
            padding = module.padding if not isinstance(module.padding, str) else [(k - 1) // 2 for k in module.kernel_size]
            # gpfq's rows: non-overlapping kernel-stride patches of the zero-padded input (patch_stride 'kernel')
            patches = math.prod((d + 2 * p - dil * (k - 1) - 1) // k + 1 for d, p, k, dil in
                                zip(x.shape[-2:], padding, module.kernel_size, module.dilation))
            kind, macs = "conv", output[0].numel() * n0
        else:
            groups, n0, n1 = 1, module.in_features, module.out_features
            patches = x[0].numel() // n0  # tokens per image
            kind, macs = "linear", patches * n0 * n1
        layers.append(dict(kind=kind, n0=n0, n1=n1, groups=groups, patches=patches, macs=macs,
                           activation=max(x[0].numel(), output[0].numel())))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.randn(1, *shape))
    for handle in handles:
        handle.remove()
    return layers


def kept_patches(layer, retain_rate) -> int:
    """Rows per image (gpfq.pipeline.capture.patch_indices: int(p·L + 1) of a conv layer's L patches, all if p = 1)."""
    if layer["kind"] != "conv" or retain_rate >= 1:
        return layer["patches"]
    return int(retain_rate * layer["patches"] + 1)


def timed(function, repeats=3, at_least=1.0):
    """The median of ≥ `repeats` calls, repeated for ≥ `at_least` s. The median, not the minimum: on a machine
    shared with other jobs the scripts will run as disturbed as the probe was."""
    times = []
    while len(times) < repeats or sum(times) < at_least:
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def one_thread(function):
    """Probes run on one thread: one-core times directly (S(N) scales them to N threads)."""
    def wrapped(*args, **kwargs):
        import torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapped


@one_thread
def probe_machine() -> dict:
    """The layer rule's multiply-add rate per engine form, and t_dec of one ImageNet-sized JPEG."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    import gpfq
    from gpfq.io.data import imagenet_transform
    from gpfq.methods.gpfq.engine import predicted_cost
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 64, 3, 3, generator=generator)
    rows = torch.randn(4096, 576, generator=generator)
    rates = {}
    for form in ("residual", "gram"):
        config = gpfq.QuantConfig(bits=4, engine=form)
        gpfq.quantize_layer(weight, rows, rows, config)  # warm-up: the in-block step compiles once
        seconds = timed(lambda: gpfq.quantize_layer(weight, rows, rows, config))
        rates[form] = predicted_cost(form, 4096, 576, 128) / seconds
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buffer, "JPEG")
    transform = imagenet_transform()
    decode = timed(lambda: [transform(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")) for _ in range(8)]) / 8
    # a script's start: Python, torch, torchvision and gpfq's imports. The median of 3: one start measured
    # while another job loads the disk or the cores was 2.5× the quiet one, and that error then enters every command
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    startup = timed(lambda: subprocess.run([sys.executable, "-c", "import gpfq.runner.experiment, torchvision.models"],
                                           check=True, env=env), repeats=3, at_least=0)
    return dict(rates=rates, t_dec=decode, startup=startup, threads=torch.get_num_threads())


@one_thread
def probe_model(name: str, dataset: str) -> dict:
    """t_img, the layer profile, and c_rows from gpfq.quantize on the first layers at m = PROBE_M (one-core s)."""
    import torch

    import gpfq
    from gpfq.io.models import load_model
    shape = INPUT_SHAPE[dataset]
    threads = torch.get_num_threads()
    model = load_model(name, "random").eval()
    layers = layer_profile(model, shape)
    # a batch of about 2·10^10 multiply-adds: big enough that per-call overhead does not count, as in evaluation
    batch = max(2, min(64, int(2e10 // max(1, sum(layer["macs"] for layer in layers)))))
    batch_images = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(batch_images[:2])
        t_img = timed(lambda: model(batch_images)) / batch
    k = min(PROBE_LAYERS, len(layers))
    total = sum(layer["macs"] for layer in layers)
    fitted = []
    for m in PROBE_M:  # two sizes: a per-layer constant c0 and a per-row-element c_rows
        images = torch.randn(m, *shape, generator=torch.Generator().manual_seed(0))
        result = gpfq.quantize(model, images, gpfq.QuantConfig(bits=4, batch_size=m), layers=list(range(k)),
                               log=lambda *a, **kw: None)
        # the rule's time is in rule_seconds; what is left is the forwards, gathering the rows, and overhead
        gathered = sum(r.seconds - r.rule_seconds for r in result.reports)
        forwards = elements = prefix = 0.0
        for layer in layers[:k]:
            prefix += layer["macs"]
            forwards += 2 * m * t_img * prefix / total
            elements += layer["groups"] * m * kept_patches(layer, 0.25) * layer["n0"]
        fitted.append((gathered - forwards, elements))
    (rest1, e1), (rest2, e2) = fitted
    c_rows = max(0.0, (rest2 - rest1) / max(e2 - e1, 1))
    c0 = max(0.0, (rest1 - c_rows * e1) / k)
    parameters = sum(p.numel() for p in model.parameters())
    return dict(t_img=t_img, layers=layers, c_rows=c_rows, c0=c0, model_bytes=4 * parameters, threads=threads)


_CACHE = {}


def load_cache(path: Path) -> dict:
    if not _CACHE.get(str(path)):
        try:
            _CACHE[str(path)] = json.loads(path.read_text())
        except (OSError, ValueError):
            _CACHE[str(path)] = {}
    return _CACHE[str(path)]


def cached(path: Path, key: str, make):
    cache = load_cache(path)
    if key not in cache:
        cache[key] = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1))
    return cache[key]


CACHE_FILE = [cache_path()]


def probe_machine_cached() -> dict:
    return cached(CACHE_FILE[0], f"machine/{os.cpu_count()}", probe_machine)


def probe_cached(name: str, dataset: str) -> dict:
    return cached(CACHE_FILE[0], f"model/{name}/{dataset}/{os.cpu_count()}", lambda: probe_model(name, dataset))


# ---------------------------------------------------------------- cost model
def point_cost(probe: dict, machine: dict, m: int, retain_rate: float = 0.25, engine: str = "auto",
               dataset: str = "imagenet", extra_forward_images: int = 0, calibration: str = "fresh",
               n_eval: int = None) -> dict:
    """One grid point in one-core seconds (forwards, rule, eval) and serial decode seconds, and peak bytes.

    calibration 'fresh' re-runs both networks' prefix on m new images per layer (forwards ∝ m·depth²) and
    decodes L·m images; 'fixed' runs m images once through both networks (∝ m·depth), decodes m, and holds
    every image's live activations of both networks at once (`gpfq.pipeline.cached_forward.CachedForward`)."""
    from gpfq.methods.gpfq.engine import choose_form, predicted_cost
    layers, t_img = probe["layers"], probe["t_img"]
    total = sum(layer["macs"] for layer in layers)
    prefix = forwards = rule = 0.0
    largest = 0
    for layer in layers:
        prefix += layer["macs"]
        rows = m * kept_patches(layer, retain_rate)
        g, n0, n1 = layer["groups"], layer["n0"], layer["n1"]
        share = prefix / total if calibration == "fresh" else 0.0  # fixed: the one pass is added below
        forwards += 2 * m * t_img * share + probe["c_rows"] * g * rows * n0 + probe["c0"]
        form = choose_form(engine, rows, n0, n1, g)
        rule += predicted_cost(form, rows, n0, n1, g) / machine["rates"][form]
        if form == "residual":
            held = 2 * g * rows * n0 * 4
        else:  # streamed: the float64 sums and one chunk's rows
            held = 2 * g * n0 * n0 * 8 + 2 * g * min(m, CHUNK_IMAGES) * kept_patches(layer, retain_rate) * n0 * 4
        largest = max(largest, held)
    forwards += extra_forward_images * 2 * t_img + (2 * m * t_img if calibration == "fixed" else 0.0)
    n_eval = N_EVAL.get(dataset, 50000) if n_eval is None else n_eval
    drawn = len(layers) * m if calibration == "fresh" else m
    decode_images = drawn + n_eval + extra_forward_images if dataset == "imagenet" else 0
    largest_activation = max(layer["activation"] for layer in layers)
    # evaluation runs batches of EVAL_BATCH images: on ImageNet its activations, not the rows, are the peak
    evaluation = 3 * min(n_eval, EVAL_BATCH) * largest_activation * 4
    if calibration == "fresh":
        activations = 3 * min(m, CHUNK_IMAGES) * largest_activation * 4  # one chunk in flight
    else:  # every chunk's cached values, two live tensors (a block's input and its branch) per network
        activations = 2 * 2 * m * largest_activation * 4
    memory = BASE_MEMORY + 2 * probe["model_bytes"] + max(largest + activations, evaluation)
    return dict(forwards=forwards, rule=rule, eval=n_eval * t_img, decode=decode_images * machine["t_dec"],
                memory=memory)


def unit_estimate(unit, probe, machine, threads: int, workers: int = 0, calibration: str = "fresh",
                  n_eval: int = None) -> dict:
    """Seconds and peak bytes of one command (its rows' grid points) at `threads` threads."""
    first = unit[0]
    options = options_of(first)
    m = int(first["m"])
    extra = 1024 if options.get("bias_correction", "None") != "None" else 0  # bias_batch_size default
    cost = point_cost(probe, machine, m, float(first["retain_rate"]), options.get("engine", "auto"),
                      first["dataset"], extra, calibration, n_eval)
    compute = len(unit) * (cost["forwards"] + cost["rule"] + cost["eval"])
    if not (first["dataset"] == "imagenet"):  # the float model is evaluated once per command
        compute += cost["eval"]
    decode = len(unit) * cost["decode"] / max(1, workers)
    seconds = machine["startup"] + compute / speedup(threads) + decode
    parts = {k: len(unit) * cost[k] / speedup(threads) for k in ("forwards", "rule", "eval")}
    return dict(seconds=seconds, memory=cost["memory"], parts=dict(parts, decode=decode))


def memory_total() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * 2 ** 30


def plan(units, estimates, cores: int, jobs: int, memory: int):
    """Jobs that fit the cores and memory, threads per job, and the reason when fewer jobs than asked."""
    jobs = max(1, min(jobs, len(units), cores))
    peak = max(e["memory"] for e in estimates)
    reason = ""
    fit = max(1, int(0.9 * memory // peak))
    if fit < jobs:
        reason = (f"{jobs} jobs would need {jobs * peak / 2 ** 30:.1f} GiB (peak {peak / 2 ** 30:.1f} GiB each) "
                  f"of {memory / 2 ** 30:.0f} GiB: running {fit}")
        jobs = fit
    return jobs, max(1, cores // jobs), reason


def makespan(seconds: list, jobs: int) -> float:
    """Wall time of commands run `jobs` at a time, longest first."""
    lanes = [0.0] * jobs
    for s in sorted(seconds, reverse=True):
        lanes[lanes.index(min(lanes))] += s
    return max(lanes)


def hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------- compare
def read_log(path: Path) -> list:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _same(cell, value) -> bool:
    try:
        return float(cell) == float(value)
    except (TypeError, ValueError):
        return (cell or "") == (value or "")


def log_name(row) -> str:
    if row["variant"] in VARIANT_LOG:
        return VARIANT_LOG[row["variant"]]
    options = options_of(row)
    return BIAS_LOG if options.get("bias_correction", "None") != "None" else SKIP_LOG


def match(row, log_rows, calibration="fresh", weights="DEFAULT", eval_subset=None, m=None):
    """The last log row of the paper row's (model, dataset, bits, C, m, seed, ad hoc options), calibration
    mode, weights and eval subset, or None: a rehearsal (random weights, a subset) never passes for a real run."""
    options = options_of(row)
    wanted = {"Model Name": row["model"], "Dataset": row["dataset"], "Bits": row["bits"],
              "CNN_Alphabet_Scalar": cnn_scalar(row), "MLP_Alphabet_Scalar": row["scalar_C"],
              "Quantization Batch Size": str(m or row["m"]), "Seed": row["seed"]}
    hits = [r for r in log_rows if (r.get("Calibration") or "fresh") == calibration  # older logs: fresh
            and (r.get("Weights") or "DEFAULT").split()[0] == (weights or "DEFAULT")
            and (r.get("Eval Subset") or "") == (str(eval_subset) if eval_subset else "")]
    if row["variant"] != "quantization_scripts":
        wanted["Bias Correction"] = "" if options.get("bias_correction", "None") == "None" else options["bias_correction"]
        wanted["Skip Layers"] = "" if options.get("skip_layers", "None") == "None" else options["skip_layers"]
        if "bias_batch_size" in options:
            wanted["Bias Correction Batch Size"] = options["bias_batch_size"]
    hits = [r for r in hits if all(_same(r.get(c), v) for c, v in wanted.items())]
    return hits[-1] if hits else None


def compare(rows, log_dir: Path, calibration="fresh", weights="DEFAULT", eval_subset=None, m=None) -> list:
    """One line per paper row: ours (%, from the logs; run at `m` if given) beside the logged numbers, the deltas."""
    logs = {}
    lines = []
    for row in rows:
        name = log_name(row)
        if name not in logs:
            logs[name] = read_log(Path(log_dir) / name)
        hit = match(row, logs[name], calibration, weights, eval_subset, m)
        line = dict(id=row["id"], model=row["model"], bits=row["bits"], m=row["m"], C=row["scalar_C"],
                    paper_top1=_number(row["logged_top1"]), paper_top5=_number(row["logged_top5"]),
                    ours_top1=None, ours_top5=None, delta_top1=None, delta_top5=None)
        if hit is not None:
            for k in ("1", "5"):
                ours = _number(hit[f"Quantized Top{k} Accuracy"])
                ours = None if ours is None else round(100 * ours, 2)
                line[f"ours_top{k}"] = ours
                if ours is not None and line[f"paper_top{k}"] is not None:
                    line[f"delta_top{k}"] = round(ours - line[f"paper_top{k}"], 2)
        lines.append(line)
    return lines


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _cell(value):
    return "–" if value is None else (f"{value:+.2f}" if isinstance(value, float) and value < 0 else f"{value}")


def markdown(lines, label="") -> str:
    """The side-by-side table; a rehearsal's (`label`) starts with that label and marks every row."""
    head = "| row | model | bits | m | C | paper top-1 | ours top-1 | Δ top-1 | paper top-5 | ours top-5 | Δ top-5 |"
    out = [head + (" run |" if label else ""), "|" + "---|" * (12 if label else 11)]
    for l in lines:
        delta = [("–" if l[k] is None else f"{l[k]:+.2f}") for k in ("delta_top1", "delta_top5")]
        out.append(f"| {l['id']} | {l['model']} | {l['bits']} | {l['m']} | {l['C']} | {_cell(l['paper_top1'])} | "
                   f"{_cell(l['ours_top1'])} | {delta[0]} | {_cell(l['paper_top5'])} | {_cell(l['ours_top5'])} | "
                   f"{delta[1]} |" + (" rehearsal |" if label else ""))
    if label:
        out = [f"**{label}**", ""] + out
    return "\n".join(out) + "\n"


def figure(lines, path: Path, label="") -> bool:
    """Ours against the paper's top-1, one point per row, the diagonal for reference."""
    points = [l for l in lines if l["ours_top1"] is not None and l["paper_top1"] is not None]
    if not points:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 5))
    for model in sorted({l["model"] for l in points}):
        mine = [l for l in points if l["model"] == model]
        ax.scatter([l["paper_top1"] for l in mine], [l["ours_top1"] for l in mine], label=model)
    low = min(min(l["paper_top1"], l["ours_top1"]) for l in points) - 1
    high = max(max(l["paper_top1"], l["ours_top1"]) for l in points) + 1
    ax.plot([low, high], [low, high], "k--", lw=0.8)
    ax.set_xlabel("paper top-1 (%)")
    ax.set_ylabel("ours top-1 (%)" + (", rehearsal" if label else ""))
    ax.set_title(f"GPFQ {label}" if label else "GPFQ: reproduced vs logged", fontsize=10 if not label else 6, wrap=True)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- top-1 against m
PLOT_PATH = ROOT / "figures" / "paper_top1_vs_m.png"


def authors_curves(rows) -> dict:
    """{model: {bits: [(m, top-1, row)]}} of the plain GPFQ rows with a logged top-1 (tables plain, plain_4to6,
    efficientnet_b7 and sweep: one C per model), sorted by m."""
    curves = {}
    for row in rows:
        if row["variant"] == "quantization_scripts" and _number(row["logged_top1"]) is not None:
            curves.setdefault(row["model"], {}).setdefault(int(row["bits"]), []).append(
                (int(row["m"]), float(row["logged_top1"]), row))
    for by_bits in curves.values():
        for points in by_bits.values():
            points.sort(key=lambda p: p[0])
    return curves


def drawn_C(by_bits) -> str:
    return "/".join(sorted({r["scalar_C"] for points in by_bits.values() for _, _, r in points}))


def _axes(count, plt):
    columns = min(4, count)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def plot_paper_against_m(rows, log_dir, path: Path, calibration="fresh", weights="DEFAULT", eval_subset=None,
                         m=None, label=""):
    """Top-1 against m, one panel per model, one colour per bit width: the authors' logged points (circles, solid)
    and ours (crosses, dashed) where our log has the row's run. Returns the lines of `compare` that were drawn."""
    curves = authors_curves(rows)
    if not curves:
        fail("no row with a logged top-1 of plain GPFQ among the selected rows: nothing to draw")
    drawn = [r for by_bits in curves.values() for points in by_bits.values() for _, _, r in points]
    lines = compare(drawn, log_dir, calibration, weights, eval_subset, m)
    ours = {l["id"]: l["ours_top1"] for l in lines}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = _axes(len(curves), plt)
    colours = dict(zip(range(2, 9), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (model, by_bits) in zip(axes, curves.items()):
        floats = {_number(r["float_top1"]) for points in by_bits.values() for _, _, r in points} - {None}
        for bits, points in sorted(by_bits.items()):
            colour = colours.get(bits)
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=colour, ms=3, lw=1,
                    label=f"{bits} bits, logged")
            mine = sorted({(m or row_m, ours[r["id"]]) for row_m, _, r in points if ours.get(r["id"]) is not None})
            if mine:
                ax.plot(*zip(*mine), "x--", color=colour, ms=6, lw=1,
                        label=f"{bits} bits, ours" + (" (rehearsal)" if label else ""))
        for value in floats:
            ax.axhline(value, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} (C {drawn_C(by_bits)})", fontsize=9)
        ax.set_xlabel("m (calibration images)", fontsize=8)
        ax.set_ylabel("top-1 (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    title = "GPFQ top-1 against m: the authors' logs (o) and ours (x); dotted: float"
    if label:
        import textwrap
        title = textwrap.fill(f"{title}. Ours: {label}", 50 * min(4, len(curves)))
    fig.suptitle(title, fontsize=8 if label else 10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return lines


def sweep_of_our_log(log_rows, model) -> dict:
    """{(calibration, bits): [(m, mean top-1 %, sd, seeds)]} of our log's plain GPFQ rows of `model`."""
    groups = {}
    for r in log_rows:
        if r.get("Model Name") != model or (r.get("Method") or "gpfq") != "gpfq" \
                or _number(r.get("Quantized Top1 Accuracy")) is None:
            continue
        key = ((r.get("Calibration") or "fresh"), int(r["Bits"]))
        groups.setdefault(key, {}).setdefault(int(r["Quantization Batch Size"]), {})[r.get("Seed")] = \
            100 * float(r["Quantized Top1 Accuracy"])
    out = {}
    for key, by_m in groups.items():
        points = []
        for m, by_seed in sorted(by_m.items()):
            values = list(by_seed.values())
            mean = sum(values) / len(values)
            sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
            points.append((m, mean, sd, len(values)))
        out[key] = points
    return out


def plot_our_sweep(log_dir, model, path: Path) -> str:
    """Top-1 against m of our own sweep of `model` (mean ± sd over the logged seeds), fresh (solid) and fixed
    (dashed) calibration, one colour per bit width. Returns a markdown table of the points."""
    curves = sweep_of_our_log(read_log(Path(log_dir) / VARIANT_LOG["quantization_scripts"]), model)
    if not curves:
        fail(f"no GPFQ row of {model} in {Path(log_dir) / VARIANT_LOG['quantization_scripts']}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6))
    colours = dict(zip(range(2, 9), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    table = ["| calibration | bits | m | top-1 (mean ± sd) | seeds |", "|---|---|---|---|---|"]
    for (calibration, bits), points in sorted(curves.items()):
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                    fmt="o-" if calibration == "fresh" else "s--", color=colours.get(bits), ms=3, lw=1, capsize=2,
                    label=f"{bits} bits, {calibration}")
        table += [f"| {calibration} | {bits} | {m} | {mean:.2f} ± {sd:.2f} | {n} |" for m, mean, sd, n in points]
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m (calibration images)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{model}: GPFQ top-1 against m (ours)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "\n".join(table) + "\n"


# ---------------------------------------------------------------- main
def check_data(rows, data_dir):
    if any(r["dataset"] == "imagenet" for r in rows):
        root = Path(data_dir or ROOT / "data") / "ILSVRC2012"
        if not root.is_dir():
            fail(f"ImageNet not found: {root} does not exist (pass --data_dir, the folder holding ILSVRC2012/, "
                 f"as data/README.md describes; --dry-run needs no data)")


def list_rows(rows):
    for table in dict.fromkeys(r["table"] for r in rows):
        mine = [r for r in rows if r["table"] == table]
        print(f"{table} ({mine[0]['variant']}, {len(mine)} rows)")
        for r in mine:
            top5 = f"/{r['logged_top5']}" if r["logged_top5"] else ""
            logged = f"logged {r['logged_top1']}{top5}" if r["logged_top1"] else "not in the paper (ours)"
            print(f"  {r['id']:<40} {r['model']:<16} {r['bits']} bits  m {r['m']:<5} C {r['scalar_C']:<6} {logged}"
                  f"  [{r['source']}]")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the tables and their rows")
    parser.add_argument("--table", nargs="+", help="tables to run (default: all)")
    parser.add_argument("--row", nargs="+", help="row ids to run")
    parser.add_argument("--models", nargs="+", help="only these models' rows")
    parser.add_argument("--plot", nargs="?", const=str(PLOT_PATH), default=None, metavar="PNG",
                        help="run nothing: draw top-1 against m per model and bit width, the authors' points with ours "
                             f"overlaid where --log_dir has them (default {PLOT_PATH.relative_to(ROOT)})")
    parser.add_argument("--plot_model", default=None, metavar="MODEL",
                        help="with --plot: draw our own m sweep of MODEL from --log_dir instead (mean ± sd over "
                             "seeds, fresh and fixed calibration; docs/paper.md)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the commands and the estimate, run nothing")
    parser.add_argument("--no_estimate", action="store_true", help="with --dry-run: the commands only (no probes)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cores to plan for (default: this machine's)")
    parser.add_argument("--memory_gb", type=float, default=None, help="memory to plan for (default: this machine's)")
    parser.add_argument("--jobs", type=int, default=1, help="commands at once (each gets cores/jobs threads)")
    parser.add_argument("--num_workers", type=int, default=0, help="data-loading processes per command")
    parser.add_argument("--data_dir", default=None, help="the folder holding ILSVRC2012/ (default: data/)")
    parser.add_argument("--log_dir", default=str(ROOT / "logs"))
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown table and figure (default logs/reproduce/)")
    parser.add_argument("--paper_csv", default=str(PAPER_CSV), help="the rows (default experiments/paper_results.csv)")
    parser.add_argument("--cache", default=None, help=f"probe cache (default {cache_path()})")
    parser.add_argument("--calibration", choices=("fresh", "fixed"), default="fresh",
                        help="'fresh' (the paper's, default: m new images per layer) or 'fixed' (one set of m "
                             "images; forwards linear in depth, but every image's activations held: docs/results.md)")
    parser.add_argument("--weights", default=None,
                        help="passed to the scripts, e.g. 'random' for a rehearsal without the pretrained weights "
                             "(compared only with rows logged with the same weights)")
    parser.add_argument("--eval_subset", type=int, default=None,
                        help="passed to the scripts: a class-balanced N of the evaluation set, for a quick look "
                             "(logged in the row's Eval Subset column and compared only with such rows)")
    parser.add_argument("--m", "--batch_size", dest="m", type=int, default=None,
                        help="for a rehearsal: run every row at this m (calibration images) instead of its own, and "
                             "compare with log rows of this m; every output is labelled a rehearsal")
    parser.add_argument("--model_dir", default=None, help="passed to the scripts: where the quantized models go "
                                                          "(default: theirs, models/)")
    parser.add_argument("--compare_only", action="store_true", help="run nothing: compare the logs with the paper")
    return parser.parse_args(argv)


def run(args) -> int:
    if args.cache:
        CACHE_FILE[0] = Path(args.cache)
    rows = read_paper(args.paper_csv)
    if args.plot_model and not args.plot:
        fail("--plot_model goes with --plot")
    if args.list:
        list_rows(select(rows, args.table, args.row, args.models))
        return 0
    rows = select(rows, args.table, args.row, args.models)
    if args.m is not None and args.m < 1:
        fail(f"--m must be an integer ≥ 1, got {args.m}")
    label = rehearsal(args.weights, args.eval_subset, args.m)
    if args.plot:
        path = Path(args.plot)
        if args.plot_model:
            print(plot_our_sweep(args.log_dir, args.plot_model, path), end="")
        else:
            lines = plot_paper_against_m(rows, Path(args.log_dir), path, args.calibration, args.weights,
                                         args.eval_subset, args.m, label)
            mine = [l for l in lines if l["ours_top1"] is not None]
            print(f"{len(lines)} logged points, {len(mine)} of ours" + (f" ({label})" if label else ""))
        print(f"wrote {path}")
        return 0
    memory = int(args.memory_gb * 2 ** 30) if args.memory_gb else memory_total()
    per_point = args.jobs > 1  # parallel jobs take one grid point each, so the load spreads evenly
    units = units_of(at_m(rows, args.m), per_point)
    if not args.dry_run and not args.compare_only:
        check_data(rows, args.data_dir)
    if args.no_estimate or args.compare_only:
        estimates, jobs, threads, reason = None, max(1, min(args.jobs, len(units))), None, ""
        threads = max(1, args.cores // jobs)
    else:
        from tqdm import tqdm
        machine = probe_machine_cached()
        probes = {}
        for model, dataset in tqdm(list(dict.fromkeys((u[0]["model"], u[0]["dataset"]) for u in units)),
                                   desc="probes", leave=False):
            probes[model, dataset] = probe_cached(model, dataset)
        jobs, threads, reason = plan(units, [unit_estimate(u, probes[u[0]["model"], u[0]["dataset"]], machine, 1,
                                                           calibration=args.calibration, n_eval=args.eval_subset)
                                             for u in units], args.cores, args.jobs, memory)
        estimates = [unit_estimate(u, probes[u[0]["model"], u[0]["dataset"]], machine, threads, args.num_workers,
                                   args.calibration, args.eval_subset) for u in units]
    if reason:
        print(f"note: {reason}")
    commands = [command(u, args.data_dir or (None if u[0]["dataset"] != "imagenet" else ROOT / "data"),
                        args.log_dir, threads, calibration=args.calibration, weights=args.weights,
                        eval_subset=args.eval_subset, model_dir=args.model_dir) for u in units]
    if args.num_workers:
        commands = [c + ["--num_workers", str(args.num_workers)] for c in commands]
    if args.compare_only:
        commands = []
    if args.dry_run:
        if label:
            print(label)
        for i, (unit, argv) in enumerate(zip(units, commands)):
            tail = ""
            if estimates:
                e = estimates[i]
                parts = ", ".join(f"{k} {hms(v)}" for k, v in e["parts"].items())
                tail = f"   # ~{hms(e['seconds'])} ({parts}), peak {e['memory'] / 2 ** 30:.1f} GiB"
            print(shlex.join(argv) + tail)
        if estimates:
            total = makespan([e["seconds"] for e in estimates], jobs)
            print(f"estimate: {len(commands)} commands, {sum(len(u) for u in units)} grid points on {args.cores} cores, "
                  f"{jobs} at a time with {threads} threads each: ~{hms(total)} wall, peak "
                  f"{jobs * max(e['memory'] for e in estimates) / 2 ** 30:.1f} GiB "
                  f"(cost model: experiments/reproduce.py docstring, docs/paper.md)")
        return 0
    done = run_commands(commands, jobs, Path(args.out), estimates)
    args.commands_ended = True
    lines = compare(rows, Path(args.log_dir), args.calibration, args.weights, args.eval_subset, args.m)
    table = markdown(lines, label)
    print(table, end="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduce.md").write_text(table)
    drawn = figure(lines, out / "reproduce.png", label)
    print(f"wrote {out / 'reproduce.md'}" + (f" and {out / 'reproduce.png'}" if drawn else "")
          + (f" ({label})" if label else ""))
    return failure_status(done)


def failure_status(done) -> int:
    """0 when every command succeeded; else says how many failed and gives the first one's status (1 for a signal)."""
    failed = [status for _, _, _, status in done if status != 0]
    if not failed:
        return 0
    sys.stdout.flush()
    print(f"{len(failed)} of {len(done)} commands failed (the first with exit {failed[0]}): their rows are missing "
          f"from the comparison", file=sys.stderr)
    return failed[0] if 0 < failed[0] < 256 else 1


def run_commands(commands, jobs: int, out: Path, estimates=None) -> list:
    """The commands, `jobs` at a time; with one job the script's own output shows, else it goes to out/runs/.
    Returns [(command, measured seconds, estimated seconds or None, exit status)], also in out/timings.json."""
    from tqdm import tqdm
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    pending, running, done = list(enumerate(commands)), [], []

    def finish(item, bar):
        i, process, output, start = item
        running.remove(item)
        seconds = time.perf_counter() - start
        if output:
            output.close()
        bar.update(1)
        estimate = estimates[i]["seconds"] if estimates else None
        done.append((i, shlex.join(commands[i]), round(seconds, 1),
                     None if estimate is None else round(estimate, 1), process.returncode))
        said = f" (estimated {estimate:.0f} s)" if estimate is not None else ""
        tqdm.write(f"command {i + 1}/{len(commands)}: {seconds:.0f} s{said}, exit {process.returncode}"
                   + (f", output in {output.name}" if output else ""))

    def write_timings():
        (out / "timings.json").write_text(json.dumps(
            [dict(command=c, seconds=s, estimate=e, exit=x) for _, c, s, e, x in sorted(done)], indent=1))

    with tqdm(total=len(commands), desc="commands", disable=len(commands) < 2) as bar:
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    i, argv = pending.pop(0)
                    output = None if jobs == 1 else open(out / "runs" / f"command_{i}.txt", "w")
                    # its own session: a terminal's Ctrl-C reaches only this script, which passes it on once
                    process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT if output else None,
                                               start_new_session=True)
                    running.append((i, process, output, time.perf_counter()))
                time.sleep(0.2)
                for item in [r for r in running if r[1].poll() is not None]:
                    finish(item, bar)
        except KeyboardInterrupt:
            stopped = len(running)
            stop_commands([r[1] for r in running])
            for item in list(running):
                finish(item, bar)
            write_timings()
            raise CommandsInterrupted(len(done) - stopped, stopped, len(pending)) from None
    write_timings()
    done = [entry[1:] for entry in sorted(done)]  # in the commands' order
    for c, _, _, status in done:
        if status != 0:
            print(f"failed (exit {status}): {c}", file=sys.stderr)
    return done


def stop_commands(processes):
    """SIGINT to each running command (each stops as on Ctrl-C, keeping its finished points and checkpoint), then
    wait for them; a second Ctrl-C kills them."""
    import signal
    for process in processes:
        process.send_signal(signal.SIGINT)
    try:
        for process in processes:
            process.wait()
    except KeyboardInterrupt:
        for process in processes:
            process.kill()
            process.wait()


def interrupted_line(error, log_dir) -> str:
    if error is None:
        return "interrupted before any command ran: nothing was run"
    return (f"interrupted: {error.finished} of {error.finished + error.stopped + error.pending} commands finished, "
            f"{error.stopped} stopped, {error.pending} not started; the rows of finished grid points are in "
            f"{log_dir}. Run the same command again to go on (each command carries --resume: finished points "
            f"are skipped, a stopped one continues from its last layer checkpoint)")


def main(argv=None) -> int:
    args = parse(argv)
    try:
        status = run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except BadInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except CommandsInterrupted as error:
        print(f"\n{interrupted_line(error, args.log_dir)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        phase = "after the commands ended, while comparing: run again with --compare_only for the comparison" \
            if getattr(args, "commands_ended", False) else None
        print(f"\n{('interrupted ' + phase) if phase else interrupted_line(None, args.log_dir)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `--list | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush does not fail again
        return 141  # 128 + SIGPIPE, as a shell reports a program ended by a closed pipe


if __name__ == "__main__":
    raise SystemExit(main())
