"""One experiment = one grid point: load, quantize, save, evaluate, log.

The scripts hold a header dict of hyperparameters; `main(header)` applies
command-line overrides, validates everything, expands list values into a grid,
and runs every point, appending one CSV row each.

Before any point runs, every bad input is reported with one clear error: the
hyperparameters (`validate`), the result folders and logs, then the data, the models
and their layers (`preflight`). With `resume`, points whose row is already in the
log are skipped. An interrupted grid keeps every finished row and model.
"""
import argparse
import ast
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .alphabet import ALPHABET_KINDS, GRANULARITIES, MAX_BITS
from .data import DATASETS, CalibrationStream, calibration_set, dataset_label, evaluation_loader, evaluation_set
from .errors import BadInputError, ResultWriteError, bad_hyperparameter, os_error_reason
from .evaluate import evaluate
from .capture import check_model_finite, layers_in_execution_order
from .folding import fold_batchnorm
from .logs import LOG_COLUMNS, PLAIN_LOG, RESULT_COLUMNS, append_row, check_log, read_rows
from .models import load_model, published_accuracy, weights_label
from .preprocessing import check_model_and_data, check_model_takes, image_folder_sets
from .user_models import model_folder
from .engine import ENGINES
from .network import (CALIBRATIONS, METHODS, check_layer_indices, quantize_network, reports_as_dicts, settings_for,
                      zero_fraction)
from .variants import THRESHOLDINGS
from .column_order import COLUMN_ORDERS
from .qronos import DEFAULT_DAMPING as QRONOS_DAMPING
from .quantizer import FIRST_COLUMN_RULES
from .paths import DATA_DIR, LOG_DIR, MODEL_DIR, REPO_ROOT

# Keys whose list values expand into a grid (a scalar is a one-point axis).
GRID_KEYS = ("model_name", "method", "bits", "batch_size", "mlp_scalar", "cnn_scalar", "mlp_percentile",
             "cnn_percentile", "alphabet", "include_0", "retain_rate", "seed", "alphabet_granularity",
             "fold_batchnorm", "sparsity_threshold", "thresholding", "gptq_block_size", "gptq_damping",
             "gptq_act_order", "engine", "calibration", "gpfq_first_column", "column_order", "qronos_damping")
# Method and procedure options a header may leave out (older headers, other variants): their defaults.
METHOD_DEFAULTS = {"alphabet_granularity": "layer", "fold_batchnorm": False, "sparsity_threshold": 0.0,
                   "thresholding": "soft", "gptq_block_size": 128, "gptq_damping": 0.01, "gptq_act_order": False,
                   "engine": "auto", "calibration": "fresh", "gpfq_first_column": "paper", "column_order": "natural",
                   "qronos_damping": QRONOS_DAMPING}
# Keys whose value is itself a list (never expanded).
LIST_KEYS = ("ignore_layers",)
CLI_ALIASES = {"model_name": ["--model"]}
# Keys every variant understands, whether or not its header lists them.
COMMON_DEFAULTS = {"resume": False, "image_size": None, "debug": False}  # debug: known errors show their stack (gpfq.cli)


# ---------------------------------------------------------------- hyperparameters
def parse_overrides(header: dict, argv=None) -> dict:
    """Header values replaced by any `--name value [value …]` given on the command line.

    A name given with no value is set to True (`--resume`).
    """
    header = {**COMMON_DEFAULTS, **header}
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
        elif not parsed:
            config[key] = True
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
        raise bad_hyperparameter(message)

    for key, value in point.items():  # grid keys' lists are expanded by now; what is left takes one value
        if isinstance(value, (list, tuple)) and key not in LIST_KEYS:
            fail(f"{key} takes one value, got {len(value)}: {list(value)!r}; it does not expand into a grid "
                 f"(quote a value that has spaces: --{key} 'a b')")
    bits = point["bits"]
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        fail(f"bits must be a positive integer, got {bits!r}")
    if bits > MAX_BITS:
        fail(f"bits {bits} is more than the alphabets support: at most {MAX_BITS} bits ({2 ** MAX_BITS + 1} levels)")
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
    seed = point.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        fail(f"seed must be an integer, got {seed!r}")
    workers = point.get("num_workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        fail(f"num_workers must be an integer ≥ 0, got {workers!r}")
    for key in ("include_0", "resume", "debug"):
        if not isinstance(point.get(key, False), bool):
            fail(f"{key} must be True or False, got {point[key]!r}")
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
    if options["gpfq_first_column"] not in FIRST_COLUMN_RULES:
        fail(f"gpfq_first_column must be one of {FIRST_COLUMN_RULES}, got {options['gpfq_first_column']!r}")
    if options["column_order"] not in COLUMN_ORDERS:
        fail(f"column_order must be one of {COLUMN_ORDERS}, got {options['column_order']!r}")
    value = options["qronos_damping"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        fail(f"qronos_damping must be a number ≥ 0, got {value!r}")
    if options["engine"] not in ENGINES:
        fail(f"engine must be one of {ENGINES}, got {options['engine']!r}")
    if options["calibration"] not in CALIBRATIONS:
        fail(f"calibration must be one of {CALIBRATIONS}, got {options['calibration']!r}")
    if point.get("patch_stride", "kernel") not in ("kernel", "layer"):
        fail(f"patch_stride must be 'kernel' or 'layer', got {point['patch_stride']!r}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in point.get("ignore_layers") or []):
        fail(f"ignore_layers must be a list of layer indices, got {point['ignore_layers']!r}")
    check_model_and_data(point["model_name"], point["dataset"], point.get("image_size"), point.get("data_dir"))
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


def _write_temporary(folder: Path, name: str, write) -> Path:
    """Write a hidden temporary file in `folder` completely (flushed to disk); removed again on any error."""
    tmp = folder / f".{name}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # Ctrl-C included: leave no half-written file behind
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _atomic_write(path: Path, write) -> None:
    """Replace `path` in one step: readers see the old file or the new one, never part of one."""
    os.replace(_write_temporary(path.parent, path.name, write), path)


def save_model(model, record: dict, model_dir: Path, stem: str) -> Path:
    """Write <stem>.pt (state dict) and <stem>.json atomically; never overwrite an earlier run.

    The name is claimed with a hard link of the finished file, which fails if the name exists, so
    two processes saving under the same stem at the same moment both keep their model.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = _write_temporary(model_dir, f"{stem}.pt", lambda f: torch.save(model.state_dict(), f))
    try:
        counter = 0
        while True:
            path = model_dir / (f"{stem}.pt" if counter == 0 else f"{stem}_{counter}.pt")
            counter += 1
            if path.with_suffix(".json").exists():
                continue
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                continue
    finally:
        tmp.unlink(missing_ok=True)
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
    if (point["weights"] == "DEFAULT" and point["dataset"] == "imagenet"
            and published_accuracy(point["model_name"]) is not None):
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
                            act_order=options["gptq_act_order"], engine=options["engine"],
                            first_column=options["gpfq_first_column"], column_order=options["column_order"],
                            qronos_damping=options["qronos_damping"])


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
    order = ", act-order" if options["column_order"] == "act_order" else ""
    if point["method"] == "sparse_gpfq":
        return f"{options['thresholding']} threshold {options['sparsity_threshold']}{order}"
    if point["method"] == "spfq":
        return f"stochastic rounding{order}"
    if point["method"] == "qronos":
        return f"damping {options['qronos_damping']}{order}"
    if point["method"] == "gpfq":
        first = "first column code2022" if options["gpfq_first_column"] == "code2022" else ""
        return ", ".join(part for part in (first, order[2:]) if part)
    return ""


def load_inputs(point: dict, resources: Resources):
    """(calibration set, evaluation set, float model) of a grid point, loaded once per grid."""
    data_dir = Path(point.get("data_dir") or DATA_DIR)
    analog_model = resources.get(("model", point["model_name"], str(point["weights"])),
                                 lambda: load_model(point["model_name"], point["weights"]))
    if point["dataset"] == "imagefolder":  # prepared as the model declares (gpfq.preprocessing)
        calibration, evaluation = resources.get(
            ("imagefolder", str(data_dir), point["model_name"], point.get("image_size")),
            lambda: image_folder_sets(point["model_name"], analog_model, data_dir, point.get("image_size")))
        return calibration, evaluation, analog_model
    calibration = resources.get(("calibration", point["dataset"], str(data_dir)),
                                lambda: calibration_set(point["dataset"], data_dir))
    evaluation = resources.get(("evaluation", point["dataset"], str(data_dir)),
                               lambda: evaluation_set(point["dataset"], data_dir))
    return calibration, evaluation, analog_model


def check_batch_size(key: str, m: int, calibration) -> None:
    if m > len(calibration):
        raise bad_hyperparameter(f"{key} {m} is larger than the calibration set ({len(calibration)} "
                                 f"images)")


@dataclass
class ModelFacts:
    """What `preflight` learns about a grid point's model and data, for a variant's `validate_model`."""
    layer_names: list  # the Conv2d/Linear layers in execution order (what layer indices count)
    model: torch.nn.Module  # the float model
    calibration_size: int
    evaluation_size: int


def preflight(points: list, resources: Resources, validate_model=None) -> None:
    """Load every point's data and float model (kept in `resources` for the run) and check, before any
    point runs: m against the calibration set, NaN/Inf in the model (naming the parameter or layer),
    ignore_layers against the model's layers, and the variant's validate_model(point, ModelFacts)."""
    for point in points:
        calibration, evaluation, model = load_inputs(point, resources)
        check_batch_size("batch_size", point["batch_size"], calibration)

        def checked_layers():
            check_model_takes(point["model_name"], model, point["dataset"], calibration)
            example = calibration[0][0].unsqueeze(0).to(next(model.parameters()).device)
            check_model_finite(model, example)
            return layers_in_execution_order(model, example)
        names = resources.get(("layers", point["model_name"], str(point["weights"])), checked_layers)
        check_layer_indices("ignore_layers", point.get("ignore_layers") or [], names)
        if validate_model is not None:
            validate_model(point, ModelFacts(names, model, len(calibration), len(evaluation)))


def prepare(point: dict, resources: Resources, log=tqdm.write) -> Context:
    """Load (or reuse) the data and float model of a grid point and its float accuracy."""
    device = point.get("device", "cpu")
    torch.manual_seed(point["seed"])
    calibration, evaluation, analog_model = load_inputs(point, resources)
    check_batch_size("batch_size", point["batch_size"], calibration)
    if method_options(point)["fold_batchnorm"]:
        def folded():
            model, pairs = fold_batchnorm(analog_model)
            log(f"folded {len(pairs)} BatchNorm layers into their Conv2d/Linear layers")
            return model
        analog_model = resources.get(("folded model", point["model_name"], str(point["weights"])), folded)
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


def point_columns(point: dict) -> dict:
    """The log columns a grid point's hyperparameters fill; with a variant's own, they identify the point."""
    return {
        "Model Name": point["model_name"],
        "Dataset": dataset_label(point["dataset"], point.get("data_dir"), point.get("image_size")),
        "Quantization Batch Size": point["batch_size"],
        "Bits": point["bits"], "MLP_Alphabet_Scalar": point["mlp_scalar"], "CNN_Alphabet_Scalar": point["cnn_scalar"],
        "MLP_Percentile": point["mlp_percentile"], "CNN_Percentile": point["cnn_percentile"],
        "Include 0": point["include_0"], "Retain_rate": point["retain_rate"], "Seed": point["seed"],
        "Method": point["method"], "Alphabet": point["alphabet"],
        "Alphabet Granularity": method_options(point)["alphabet_granularity"],
        "Method Options": method_description(point), "Fold BatchNorm": method_options(point)["fold_batchnorm"],
        "Patch Stride": point.get("patch_stride", "kernel"),
        "Ignore Layers": " ".join(str(i) for i in point.get("ignore_layers") or []),
        "Engine": method_options(point)["engine"], "Calibration": method_options(point)["calibration"],
        "Weights": weights_label(point["model_name"], point["weights"]),
    }


def log_names_of(point: dict, log_name) -> list:
    """The logs a point's row goes to: `log_name` itself, or log_name(point) (one name or a list)."""
    names = log_name(point) if callable(log_name) else log_name
    return [names] if isinstance(names, str) else list(names)


def run_point(point: dict, resources: Resources, log_name=PLAIN_LOG, quantize=plain_quantize,
              log=tqdm.write, variant: str = "", variant_columns=None) -> dict:
    """Quantize, save, evaluate and log one grid point; returns the logged row.

    quantize(context) -> (quantized model, [LayerReport], extra columns for the row).
    log_name: a log file name, or a function of the point giving one or several (the row goes to each).
    variant: a name that starts the saved model's file name (e.g. 'adhoc'), so variants' models stand apart.
    variant_columns(point) -> the variant's own hyperparameter columns (see `main`).
    """
    model_dir = Path(point.get("model_dir") or MODEL_DIR) / model_folder(point["model_name"])
    log_paths = [Path(point.get("log_dir") or LOG_DIR) / name for name in log_names_of(point, log_name)]
    context = prepare(point, resources, log)
    own_options = {key: value for key, value in (variant_columns(point) if variant_columns else {}).items()
                   if value not in ("", None)}
    log(f"== {point['model_name']} ({weights_label(point['model_name'], point['weights'])}) {point['method']} "
        f"{method_description(point)} {point['bits']} bits, m={point['batch_size']}, "
        f"C=({point['mlp_scalar']}, {point['cnn_scalar']}), {method_options(point)['alphabet_granularity']} "
        f"alphabets, seed {point['seed']}" + "".join(f", {key} {value}" for key, value in own_options.items()))
    start = time.time()
    quantized_model, reports, extra = quantize(context)
    seconds = time.time() - start

    prefix = variant(point) if callable(variant) else variant
    stem = (f"{prefix + '_' if prefix else ''}{point['method']}_{point['alphabet']}"
            f"_{method_options(point)['alphabet_granularity']}_b{point['bits']}_m{point['batch_size']}"
            f"_mlp{point['mlp_scalar']}_cnn{point['cnn_scalar']}_s{point['seed']}_{time.strftime('%Y%m%d-%H%M%S')}")
    record = {"hyperparameters": dict(point), "layers": reports_as_dicts(reports), "extra": extra,
              "quantization_seconds": seconds, "package_version": __version__, "code_revision": code_revision()}
    # Saved before evaluation, so a crash there leaves the quantized model on disk.
    try:
        model_path = save_model(quantized_model, record, model_dir, stem)
    except OSError as error:
        raise ResultWriteError(f"could not save the quantized model in {model_dir} ({os_error_reason(error)}); "
                               f"nothing of this grid point was written") from error
    log(f"saved {model_path}")

    top1, top5 = evaluate(quantized_model, context.loader(), device=context.device, desc="quantized model")
    warnings = [f"{report.name}: {warning}" for report in reports for warning in report.warnings]
    warnings += chance_warnings(top1, output_width(context))
    for warning in warnings:
        log(f"WARNING: {warning}")
    record["results"] = {"original_top1": context.original_top1, "original_top5": context.original_top5,
                         "quantized_top1": top1, "quantized_top5": top5, "warnings": warnings}
    saved = (f"The quantized model is saved at {model_path}, its record (hyperparameters, per-layer errors) at "
             f"{model_path.with_suffix('.json')}; top-1 {context.original_top1:.4f} -> {top1:.4f}, top-5 "
             f"{context.original_top5:.4f} -> {top5:.4f}.")
    try:
        write_record(model_path.with_suffix(".json"), record)
    except OSError as error:
        raise ResultWriteError(f"could not add the results to {model_path.with_suffix('.json')} "
                               f"({os_error_reason(error)}). {saved}") from error
    row = point_columns(point)
    row.update(variant_columns(point) if variant_columns is not None else {})
    row.update({
        "Original Top1 Accuracy": round(context.original_top1, 6), "Quantized Top1 Accuracy": round(top1, 6),
        "Original Top5 Accuracy": round(context.original_top5, 6), "Quantized Top5 Accuracy": round(top5, 6),
        "Author": point.get("author", ""), "Sparsity": round(zero_fraction(reports), 6),
        "Quantization Seconds": round(seconds, 2), "Model File": display_path(model_path),
        "Package Version": __version__, "Code Revision": record["code_revision"],
        "Date": time.strftime("%Y-%m-%d %H:%M:%S"), "Warnings": "; ".join(warnings),
    })
    row.update(extra)
    for log_path in log_paths:
        append_row(log_path, row, LOG_COLUMNS[log_path.name], saved=saved)
    log(f"top-1 {context.original_top1:.4f} -> {top1:.4f}, top-5 {context.original_top5:.4f} -> {top5:.4f}; "
        f"row appended to {', '.join(str(p) for p in log_paths)}")
    return row


# A final top-1 this close to guessing (1 / number of classes) means the quantized model is broken.
CHANCE_MARGIN = 0.02


@torch.no_grad()
def output_width(context: Context) -> int:
    """The number of classes: the float model's output width on one calibration image."""
    example = context.calibration[0][0].unsqueeze(0).to(context.device)
    return int(context.analog_model.eval().to(context.device)(example).shape[-1])


def chance_warnings(top1: float, n_classes: int) -> list:
    """A warning when top-1 is within CHANCE_MARGIN of chance (1 / n_classes)."""
    chance = 1.0 / n_classes
    if top1 <= chance + CHANCE_MARGIN:
        return [f"final top-1 {top1:.4f} is within {CHANCE_MARGIN * 100:.0f} points of chance "
                f"({chance:.4f} for {n_classes} classes)"]
    return []


def display_path(path: Path) -> str:
    """A path relative to the repo root when inside it, else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


class UnwritableFolderError(BadInputError, PermissionError):
    """A result folder that cannot be written."""


def check_writable(folder: Path, key: str = "folder") -> None:
    """Create `folder` if needed and write a file in it: a folder results cannot go to is found before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UnwritableFolderError(f"{key} {folder} is not a writable folder ({type(error).__name__}: {error}), so "
                              f"results could not be saved there. Fix it, or choose another with --{key} PATH"
                              ) from error


# ---------------------------------------------------------------- resume
def point_identity(point: dict, columns, variant_columns=None) -> dict:
    """The values a point would log in the hyperparameter columns (all but logs.RESULT_COLUMNS) of a log."""
    values = point_columns(point)
    values.update(variant_columns(point) if variant_columns is not None else {})
    identity = [c for c in columns if c not in RESULT_COLUMNS]
    unknown = [c for c in identity if c not in values]
    if unknown:  # a variant's column that is neither a result nor filled from the point: refuse to guess
        raise ValueError(f"resume cannot tell grid points apart: the log's columns {unknown} are neither results "
                         f"(gpfq.logs.RESULT_COLUMNS) nor filled from the point (experiment.point_columns, or the "
                         f"variant's variant_columns)")
    return {c: values[c] for c in identity}


def _same_value(logged, value) -> bool:
    """A logged CSV cell against a hyperparameter value (numbers compare as numbers: 1 == 1.0)."""
    text = "" if value is None else str(value)
    if logged == text:
        return True
    try:
        return float(logged) == float(text)
    except (TypeError, ValueError):
        return False


def pending_points(points: list, log_dir: Path, log_name=PLAIN_LOG, variant_columns=None) -> list:
    """The points whose row is not yet in each of their logs (a row with equal hyperparameter columns)."""
    rows_of = {}
    pending = []
    for point in points:
        for name in log_names_of(point, log_name):
            if name not in rows_of:
                path = Path(log_dir) / name
                rows_of[name] = read_rows(path) if check_log(path, LOG_COLUMNS[name]) else []
            identity = point_identity(point, LOG_COLUMNS[name], variant_columns)
            if not any(all(_same_value(row.get(c), v) for c, v in identity.items()) for row in rows_of[name]):
                pending.append(point)
                break
    return pending


def main(header: dict, argv=None, log_name=PLAIN_LOG, quantize=plain_quantize, validate_point=None,
         grid_keys=(), resolve_point=None, variant: str = "", validate_model=None, variant_columns=None) -> list:
    """Run the grid of a script's header (with command-line overrides); returns the logged rows.

    validate_point(point) adds a variant's own checks of its hyperparameters (cheap, before anything loads).
    log_name: a log file name, or a function of the point giving one or several.
    grid_keys: a variant's own keys whose list values also expand into the grid.
    resolve_point(point) -> point runs before validation (e.g. hyperparameters read from a saved model).
    variant: the prefix of the saved models' file names.
    validate_model(point, ModelFacts) adds checks that need the model's layers or the data's size; it runs
    in `preflight`, after loading and before any point runs.
    variant_columns(point) -> {column: value}: the variant's own hyperparameter columns of its log, written
    into each row and used, with `point_columns`, to recognise a logged point (`resume`).
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
    model_dir = Path(config.get("model_dir") or MODEL_DIR)
    check_writable(log_dir, "log_dir")
    check_writable(model_dir, "model_dir")
    for name in dict.fromkeys(model_folder(p["model_name"]) for p in points):  # models/<model folder>/
        if (model_dir / name).exists():
            check_writable(model_dir / name, "model_dir")
    log_names = list(dict.fromkeys(n for point in points for n in log_names_of(point, log_name)))
    for name in log_names:
        check_log(log_dir / name, LOG_COLUMNS[name])
    if config["resume"]:
        total = len(points)
        points = pending_points(points, log_dir, log_name, variant_columns)
        print(f"resume: {total - len(points)} of {total} grid points are already in {', '.join(log_names)}; "
              f"running the other {len(points)}")
    # On a machine shared with other jobs, fewer threads than cores avoids oversubscription, which slows
    # the small per-column products of the quantizers many times over.
    torch.set_num_threads(config.get("num_threads") or max(1, os.cpu_count() or 1))
    resources = Resources()
    preflight(points, resources, validate_model)
    rows, number = [], 0
    try:
        for number, point in enumerate(points, 1):
            if len(points) > 1:
                print(f"\n### grid point {number}/{len(points)}")
            rows.append(run_point(point, resources, log_name, quantize, variant=variant,
                                  variant_columns=variant_columns))
    except KeyboardInterrupt:
        print(f"\ninterrupted during grid point {number} of {len(points)}: the rows of the finished points are in "
              f"{', '.join(str(log_dir / n) for n in log_names)}, their models in {model_dir}. Run the same "
              f"command with --resume to go on.", file=sys.stderr)
        raise SystemExit(130) from None
    return rows
