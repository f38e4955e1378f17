"""One experiment = one grid point: load, quantize, save, evaluate, log.

The scripts hold a header dict of hyperparameters; `main(header)` applies
command-line overrides, validates everything, expands list values into a grid,
and runs every point, appending one CSV row each.
"""
import argparse
import ast
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .alphabet import ALPHABET_KINDS, GRANULARITIES
from .data import DATASETS, CalibrationStream, calibration_set, evaluation_loader, evaluation_set
from .evaluate import evaluate
from .folding import fold_batchnorm
from .logs import LOG_COLUMNS, PLAIN_LOG, append_row, check_log
from .models import EMBEDDED_DATASET, check_model_name, is_embedded, load_model, published_accuracy
from .engine import ENGINES
from .network import CALIBRATIONS, METHODS, quantize_network, reports_as_dicts, settings_for, zero_fraction
from .variants import THRESHOLDINGS
from .paths import DATA_DIR, LOG_DIR, MODEL_DIR, REPO_ROOT

# Keys whose list values expand into a grid (a scalar is a one-point axis).
GRID_KEYS = ("model_name", "method", "bits", "batch_size", "mlp_scalar", "cnn_scalar", "mlp_percentile",
             "cnn_percentile", "alphabet", "include_0", "retain_rate", "seed", "alphabet_granularity",
             "fold_batchnorm", "sparsity_threshold", "thresholding", "gptq_block_size", "gptq_damping",
             "gptq_act_order", "engine", "calibration")
# Method and procedure options a header may leave out (older headers, other variants): their defaults.
METHOD_DEFAULTS = {"alphabet_granularity": "layer", "fold_batchnorm": False, "sparsity_threshold": 0.0,
                   "thresholding": "soft", "gptq_block_size": 128, "gptq_damping": 0.01, "gptq_act_order": False,
                   "engine": "auto", "calibration": "fresh"}
# Keys whose value is itself a list (never expanded).
LIST_KEYS = ("ignore_layers",)
CLI_ALIASES = {"model_name": ["--model"]}


# ---------------------------------------------------------------- hyperparameters
def parse_overrides(header: dict, argv=None) -> dict:
    """Header values replaced by any `--name value [value …]` given on the command line."""
    parser = argparse.ArgumentParser(description="GPFQ quantization. Every header name can be overridden: "
                                                 "--bits 3 4 --model resnet18")
    for key, default in header.items():
        flags = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in key else []) + CLI_ALIASES.get(key, [])
        parser.add_argument(*flags, dest=key, nargs="*", default=None, metavar="VALUE",
                            help=f"(header: {default!r})")
    args = parser.parse_args(argv)
    config = dict(header)
    for key, values in vars(args).items():
        if values is None:
            continue
        parsed = [_literal(v) for v in values]
        if key in LIST_KEYS:
            config[key] = parsed
        elif len(parsed) == 1:
            config[key] = parsed[0]
        else:
            config[key] = parsed
    return config


def _literal(text: str):
    if text.lower() in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def expand_grid(config: dict, grid_keys=()) -> list:
    """Every combination of the list-valued GRID_KEYS (and a variant's `grid_keys`), as one flat config each."""
    keys = GRID_KEYS + tuple(k for k in grid_keys if k not in GRID_KEYS)
    axes = {k: (config[k] if isinstance(config[k], (list, tuple)) else [config[k]]) for k in keys if k in config}
    points = []
    for values in itertools.product(*axes.values()):
        point = dict(config)
        point.update(zip(axes.keys(), values))
        points.append(point)
    return points


def validate(point: dict) -> None:
    """Raise ValueError on the first bad hyperparameter of one grid point (cheap checks only)."""
    def fail(message):
        raise ValueError(f"bad hyperparameter: {message}")

    bits = point["bits"]
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        fail(f"bits must be a positive integer, got {bits!r}")
    for key in ("mlp_scalar", "cnn_scalar"):
        value = point[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            fail(f"{key} must be a number > 0, got {value!r}")
    for key in ("mlp_percentile", "cnn_percentile", "retain_rate"):
        value = point[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            fail(f"{key} must be in (0, 1], got {value!r}")
    m = point["batch_size"]
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        fail(f"batch_size (m) must be an integer ≥ 1, got {m!r}")
    if point["method"] not in METHODS:
        fail(f"method must be one of {METHODS}, got {point['method']!r}")
    if point["alphabet"] not in ALPHABET_KINDS:
        fail(f"alphabet must be one of {ALPHABET_KINDS}, got {point['alphabet']!r}")
    options = method_options(point)
    if options["alphabet_granularity"] not in GRANULARITIES:
        fail(f"alphabet_granularity must be one of {GRANULARITIES}, got {options['alphabet_granularity']!r}")
    for key in ("fold_batchnorm", "gptq_act_order"):
        if not isinstance(options[key], bool):
            fail(f"{key} must be True or False, got {options[key]!r}")
    value = options["sparsity_threshold"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        fail(f"sparsity_threshold (λ, relative to the alphabet's largest level) must be a number ≥ 0, got {value!r}")
    if options["thresholding"] not in THRESHOLDINGS:
        fail(f"thresholding must be one of {THRESHOLDINGS}, got {options['thresholding']!r}")
    if point["method"] == "sparse_gpfq" and point["alphabet"] == "gpfq2022" and not point["include_0"]:
        fail("sparse_gpfq needs the level 0 in the alphabet: set include_0 = True (or another alphabet)")
    value = options["gptq_block_size"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(f"gptq_block_size must be an integer ≥ 1, got {value!r}")
    value = options["gptq_damping"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        fail(f"gptq_damping must be a number ≥ 0, got {value!r}")
    if point["dataset"] not in DATASETS:
        fail(f"dataset must be one of {DATASETS}, got {point['dataset']!r}")
    threads = point.get("num_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        fail(f"num_threads must be None (all cores) or an integer ≥ 1, got {threads!r}")
    if options["engine"] not in ENGINES:
        fail(f"engine must be one of {ENGINES}, got {options['engine']!r}")
    if options["calibration"] not in CALIBRATIONS:
        fail(f"calibration must be one of {CALIBRATIONS}, got {options['calibration']!r}")
    if point.get("patch_stride", "kernel") not in ("kernel", "layer"):
        fail(f"patch_stride must be 'kernel' or 'layer', got {point['patch_stride']!r}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in point.get("ignore_layers") or []):
        fail(f"ignore_layers must be a list of layer indices, got {point['ignore_layers']!r}")
    check_model_name(point["model_name"])
    if is_embedded(point["model_name"]) != (point["dataset"] == EMBEDDED_DATASET):
        fail(f"model {point['model_name']!r} does not go with dataset {point['dataset']!r}: the embedded models "
             f"run on {EMBEDDED_DATASET}, torchvision's on imagenet")
    device = str(point.get("device", "cpu"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"device {device!r} asked for, but torch sees no CUDA GPU; use device='cpu'")


# ---------------------------------------------------------------- provenance
def code_revision() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(model, record: dict, model_dir: Path, stem: str) -> Path:
    """Write <stem>.pt (state dict) and <stem>.json atomically; never overwrite an earlier run."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path, counter = model_dir / f"{stem}.pt", 1
    while path.exists() or path.with_suffix(".json").exists():
        path, counter = model_dir / f"{stem}_{counter}.pt", counter + 1
    _atomic_write(path, lambda f: torch.save(model.state_dict(), f))
    write_record(path.with_suffix(".json"), record)
    return path


def write_record(path: Path, record: dict) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(record, indent=2, default=str) + "\n").encode()))


# ---------------------------------------------------------------- running
class Resources:
    """Datasets, models and float accuracies shared by the points of one grid."""

    def __init__(self):
        self._cache = {}

    def get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def float_accuracy(point, model, resources, loader_of, device):
    """torchvision's published numbers for its own weights, otherwise measured once per model."""
    if point["weights"] == "DEFAULT" and published_accuracy(point["model_name"]) is not None:
        return published_accuracy(point["model_name"])
    folded = method_options(point)["fold_batchnorm"]
    return resources.get(("float", point["model_name"], str(point["weights"]), folded),
                         lambda: evaluate(model, loader_of(), device=device, desc="float model"))


@dataclass
class Context:
    """What one grid point works with, shared with the variants' quantize functions."""
    point: dict
    calibration: object
    evaluation: object
    analog_model: torch.nn.Module
    original_top1: float
    original_top5: float
    device: str
    log: object

    def stream(self) -> CalibrationStream:
        """A fresh seeded calibration stream (the same images for the same seed)."""
        return CalibrationStream(self.calibration, self.point["seed"], chunk_size=self.point.get("chunk_size", 256),
                                 num_workers=self.point.get("num_workers", 0))

    def loader(self):
        return evaluation_loader(self.evaluation, self.point.get("eval_batch_size", 256),
                                 self.point.get("num_workers", 0))

    def settings_of(self, index, name, layer):
        """The header's settings for every layer (CNN values for Conv2d, MLP values for Linear)."""
        p = self.point
        options = method_options(p)
        return settings_for(layer, p["bits"], p["method"], p["alphabet"], p["include_0"], p["mlp_scalar"],
                            p["cnn_scalar"], p["mlp_percentile"], p["cnn_percentile"],
                            granularity=options["alphabet_granularity"], seed=layer_seed(p["seed"], index),
                            threshold=options["sparsity_threshold"], thresholding=options["thresholding"],
                            block_size=options["gptq_block_size"], damping=options["gptq_damping"],
                            act_order=options["gptq_act_order"], engine=options["engine"])


def method_options(point: dict) -> dict:
    """The point's method options, defaults filled in for those its header lacks."""
    return {key: point.get(key, default) for key, default in METHOD_DEFAULTS.items()}


def layer_seed(seed: int, index: int) -> int:
    """Seed of layer `index`'s stochastic rounding: distinct per layer, fixed by the point's seed."""
    return seed * 1_000_003 + index


def method_description(point: dict) -> str:
    """The options that matter for the point's method, for the log's Method Options column."""
    options = method_options(point)
    if point["method"] == "gptq":
        return (f"block {options['gptq_block_size']}, damping {options['gptq_damping']}"
                f"{', act-order' if options['gptq_act_order'] else ''}")
    if point["method"] == "sparse_gpfq":
        return f"{options['thresholding']} threshold {options['sparsity_threshold']}"
    if point["method"] == "spfq":
        return "stochastic rounding"
    return ""


def prepare(point: dict, resources: Resources, log=tqdm.write) -> Context:
    """Load (or reuse) the data and float model of a grid point and its float accuracy."""
    data_dir = Path(point.get("data_dir") or DATA_DIR)
    device = point.get("device", "cpu")
    torch.manual_seed(point["seed"])
    calibration = resources.get(("calibration", point["dataset"], str(data_dir)),
                                lambda: calibration_set(point["dataset"], data_dir))
    evaluation = resources.get(("evaluation", point["dataset"], str(data_dir)),
                               lambda: evaluation_set(point["dataset"], data_dir))
    analog_model = resources.get(("model", point["model_name"], str(point["weights"])),
                                 lambda: load_model(point["model_name"], point["weights"]))
    if method_options(point)["fold_batchnorm"]:
        def folded():
            model, pairs = fold_batchnorm(analog_model)
            log(f"folded {len(pairs)} BatchNorm layers into their Conv2d/Linear layers")
            return model
        analog_model = resources.get(("folded model", point["model_name"], str(point["weights"])), folded)
    if point["batch_size"] > len(calibration):
        raise ValueError(f"bad hyperparameter: batch_size {point['batch_size']} is larger than the calibration "
                         f"set ({len(calibration)} images)")
    context = Context(point, calibration, evaluation, analog_model, 0.0, 0.0, device, log)
    context.original_top1, context.original_top5 = float_accuracy(point, analog_model, resources, context.loader,
                                                                  device)
    return context


def plain_quantize(context: Context):
    """The paper's GPFQ: every layer with the header's settings. Returns (model, reports, {})."""
    p = context.point
    model, reports = quantize_network(context.analog_model, context.stream(), context.settings_of, p["batch_size"],
                                      p["retain_rate"], p["seed"], p.get("ignore_layers") or [],
                                      p.get("patch_stride", "kernel"), context.device, log=context.log,
                                      calibration=method_options(p)["calibration"])
    return model, reports, {}


def log_names_of(point: dict, log_name) -> list:
    """The logs a point's row goes to: `log_name` itself, or log_name(point) (one name or a list)."""
    names = log_name(point) if callable(log_name) else log_name
    return [names] if isinstance(names, str) else list(names)


def run_point(point: dict, resources: Resources, log_name=PLAIN_LOG, quantize=plain_quantize,
              log=tqdm.write, variant: str = "") -> dict:
    """Quantize, save, evaluate and log one grid point; returns the logged row.

    quantize(context) -> (quantized model, [LayerReport], extra columns for the row).
    log_name: a log file name, or a function of the point giving one or several (the row goes to each).
    variant: a name that starts the saved model's file name (e.g. 'adhoc'), so variants' models stand apart.
    """
    model_dir = Path(point.get("model_dir") or MODEL_DIR) / point["model_name"]
    log_paths = [Path(point.get("log_dir") or LOG_DIR) / name for name in log_names_of(point, log_name)]
    context = prepare(point, resources, log)
    log(f"== {point['model_name']} {point['method']} {method_description(point)} {point['bits']} bits, "
        f"m={point['batch_size']}, C=({point['mlp_scalar']}, {point['cnn_scalar']}), "
        f"{method_options(point)['alphabet_granularity']} alphabets, seed {point['seed']}")
    start = time.time()
    quantized_model, reports, extra = quantize(context)
    seconds = time.time() - start

    stem = (f"{variant + '_' if variant else ''}{point['method']}_{point['alphabet']}"
            f"_{method_options(point)['alphabet_granularity']}_b{point['bits']}_m{point['batch_size']}"
            f"_mlp{point['mlp_scalar']}_cnn{point['cnn_scalar']}_s{point['seed']}_{time.strftime('%Y%m%d-%H%M%S')}")
    record = {"hyperparameters": dict(point), "layers": reports_as_dicts(reports), "extra": extra,
              "quantization_seconds": seconds, "package_version": __version__, "code_revision": code_revision()}
    # Saved before evaluation, so a crash there leaves the quantized model on disk.
    model_path = save_model(quantized_model, record, model_dir, stem)
    log(f"saved {model_path}")

    top1, top5 = evaluate(quantized_model, context.loader(), device=context.device, desc="quantized model")
    record["results"] = {"original_top1": context.original_top1, "original_top5": context.original_top5,
                         "quantized_top1": top1, "quantized_top5": top5}
    write_record(model_path.with_suffix(".json"), record)
    row = {
        "Model Name": point["model_name"], "Dataset": point["dataset"], "Quantization Batch Size": point["batch_size"],
        "Original Top1 Accuracy": round(context.original_top1, 6), "Quantized Top1 Accuracy": round(top1, 6),
        "Original Top5 Accuracy": round(context.original_top5, 6), "Quantized Top5 Accuracy": round(top5, 6),
        "Bits": point["bits"], "MLP_Alphabet_Scalar": point["mlp_scalar"], "CNN_Alphabet_Scalar": point["cnn_scalar"],
        "MLP_Percentile": point["mlp_percentile"], "CNN_Percentile": point["cnn_percentile"],
        "Include 0": point["include_0"], "Retain_rate": point["retain_rate"], "Seed": point["seed"],
        "Author": point.get("author", ""), "Method": point["method"], "Alphabet": point["alphabet"],
        "Alphabet Granularity": method_options(point)["alphabet_granularity"],
        "Method Options": method_description(point), "Fold BatchNorm": method_options(point)["fold_batchnorm"],
        "Sparsity": round(zero_fraction(reports), 6),
        "Patch Stride": point.get("patch_stride", "kernel"),
        "Ignore Layers": " ".join(str(i) for i in point.get("ignore_layers") or []),
        "Engine": method_options(point)["engine"], "Calibration": method_options(point)["calibration"],
        "Quantization Seconds": round(seconds, 2), "Model File": display_path(model_path),
        "Package Version": __version__, "Code Revision": record["code_revision"],
        "Date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    row.update(extra)
    for log_path in log_paths:
        append_row(log_path, row, LOG_COLUMNS[log_path.name])
    log(f"top-1 {context.original_top1:.4f} -> {top1:.4f}, top-5 {context.original_top5:.4f} -> {top5:.4f}; "
        f"row appended to {', '.join(str(p) for p in log_paths)}")
    return row


def display_path(path: Path) -> str:
    """A path relative to the repo root when inside it, else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def check_writable(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{folder} is not writable; results could not be saved there")


def main(header: dict, argv=None, log_name=PLAIN_LOG, quantize=plain_quantize, validate_point=None,
         grid_keys=(), resolve_point=None, variant: str = "") -> list:
    """Run the grid of a script's header (with command-line overrides); returns the logged rows.

    validate_point(point) adds a variant's own checks of its hyperparameters.
    log_name: a log file name, or a function of the point giving one or several.
    grid_keys: a variant's own keys whose list values also expand into the grid.
    resolve_point(point) -> point runs before validation (e.g. hyperparameters read from a saved model).
    variant: the prefix of the saved models' file names.
    """
    config = parse_overrides(header, argv)
    points = expand_grid(config, grid_keys)
    if resolve_point is not None:
        points = [resolve_point(point) for point in points]
    for point in points:  # every point checked before any work starts
        validate(point)
        if validate_point is not None:
            validate_point(point)
    log_dir = Path(config.get("log_dir") or LOG_DIR)
    check_writable(log_dir)
    check_writable(Path(config.get("model_dir") or MODEL_DIR))
    for name in dict.fromkeys(n for point in points for n in log_names_of(point, log_name)):
        check_log(log_dir / name, LOG_COLUMNS[name])
    # On a machine shared with other jobs, fewer threads than cores avoids oversubscription, which slows
    # the small per-column products of the quantizers many times over.
    torch.set_num_threads(config.get("num_threads") or max(1, os.cpu_count() or 1))
    resources = Resources()
    rows = []
    for number, point in enumerate(points, 1):
        if len(points) > 1:
            print(f"\n### grid point {number}/{len(points)}")
        rows.append(run_point(point, resources, log_name, quantize, variant=variant))
    return rows
