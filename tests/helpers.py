"""What several tests share: hashes, alphabet checks, accuracy, tiny models, and the scripts seen from outside.

The sections below the first are the one place most tests reach gpfq.runner and gpfq.pipeline: they run a script's
grid in-process as its command line would, read what it logged and saved, build the settings and context of one
grid point, and give one layer's rows and quantization, so a test says what a script or the library does rather
than which module does it (moving code then changes this file, not the tests). Each imports what it needs in its
body. `run_python` and `ForkedProcess` (tests/python_server.py) run a script as a new process, forked."""
import hashlib
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from python_server import ForkedProcess, run_python  # noqa: F401 (`python SCRIPT …` for the tests, forked)


def state_hash(state: dict) -> str:
    """sha256 over a state dict: for each key in sorted order, its name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def off_alphabet(model, reports) -> dict:
    """{parameter: entries not on the layer's alphabet} for every quantized layer that has any (an empty dict
    when every quantized weight is one of its alphabet's levels, per channel where the alphabet is)."""
    parameters = dict(model.named_parameters())
    bad = {}
    for report in reports:
        weight = parameters[report.parameter].detach().cpu().float()
        if report.input_major:
            weight = weight.t()
        rows = weight.reshape(weight.shape[0], -1)
        levels = report.alphabet.float()
        if levels.dim() == 1:
            hits = (rows.unsqueeze(-1) == levels).any(-1)
        else:  # (G, N1, L) per group and channel: the groups' channels stack along N1
            per_row = levels.reshape(-1, levels.shape[-1])
            hits = (rows.unsqueeze(-1) == per_row.unsqueeze(1)).any(-1)
        if not bool(hits.all()):
            bad[report.parameter] = int((~hits).sum())
    return bad


@torch.no_grad()
def top1(model, dataset, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` (eval mode) over a dataset of (image, label)."""
    correct = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        correct += int((model(images).argmax(1) == labels).sum())
        total += labels.numel()
    return correct / total


def resnet18_calibration():
    """ResNet-18 (torchvision, random weights of seed 0) and 8 random 48-px calibration images (seed 1)."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    images = torch.randn(8, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    return model, TensorDataset(images, torch.zeros(8, dtype=torch.long))


def worst_relative_gap(errors: list, recorded: list) -> float:
    """max over layers of |error / recorded − 1|: how far a run's per-layer errors are from a recorded run's."""
    assert len(errors) == len(recorded), (len(errors), len(recorded))
    return max(abs(e / r - 1) for e, r in zip(errors, recorded))


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (C order), what a quantized file's header records per tensor."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def safetensors_metadata(raw: bytes) -> dict:
    """The "__metadata__" of a safetensors file's bytes: an 8-byte little-endian header length, then JSON."""
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length].decode("utf-8")).get("__metadata__") or {}


# ---------------------------------------------------------------- the scripts, seen from outside

def script_header(folder: str) -> dict:
    """The HEADER dict of <folder>/quantize.py (e.g. "quantization_scripts"): a script's default settings."""
    import importlib.util
    from gpfq.paths import REPO_ROOT
    spec = importlib.util.spec_from_file_location(f"{folder}_script", REPO_ROOT / folder / "quantize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HEADER


def run_script(header, *argv) -> list:
    """Run a script in this process as `python <folder>/quantize.py argv…` runs it: `header` is the folder's name
    (its own HEADER, run by its own variant: ad hoc, retraining) or a HEADER dict of one's own (run as the plain
    script runs it). Returns the rows it logged, one dict per grid point."""
    from gpfq.runner.experiment import main
    if isinstance(header, str):
        return main(script_header(header), list(argv), _variant(header))
    return main(header, list(argv))


def logged_rows(path) -> list:
    """The whole rows of a CSV log a script wrote, as {column: text} (a torn last line is left out)."""
    from gpfq.runner.logs import read_rows
    return read_rows(path)


def result_columns() -> set:
    """The columns of the plain log that record what a run measured, or who ran it when with which code, rather than
    its settings: a resumed run does not compare them when it looks for a grid point already done."""
    from gpfq.runner.logs import RESULT_COLUMNS
    return set(RESULT_COLUMNS)


def scored(model, loader) -> tuple:
    """(top-1, top-5) of `model` over `loader`, counted as the scripts count a model's accuracy (eval mode, no
    progress bar): the number a script's log row would show, unrounded."""
    from gpfq.runner.evaluate import evaluate
    return evaluate(model, loader, progress=False)


def script_settings(header, *argv) -> dict:
    """The settings a script runs with for `argv` (header as in run_script): its HEADER with the command line's
    values put in, before the grid expands (list values stay lists). Exits, as the script does, on an unknown flag."""
    from gpfq.runner.header import parse_overrides
    return parse_overrides(script_header(header) if isinstance(header, str) else header, list(argv))


def plain_log_columns() -> list:
    """The columns of the plain script's log (Quantization_Log.csv), in the order of its header line."""
    from gpfq.runner.logs import PLAIN_COLUMNS
    return list(PLAIN_COLUMNS)


def grid_points(header, *argv) -> list:
    """The grid points a script runs for `argv` (header as in run_script): one flat settings dict each, in the
    order the script runs them."""
    from gpfq.runner.header import expand_grid
    return expand_grid(script_settings(header, *argv))


def check_point(point: dict) -> None:
    """Check a grid point's settings as a script does before any work: ValueError naming the first bad one."""
    from gpfq.runner.header import parse_point
    parse_point(point)


def method_options(point: dict) -> str:
    """What a grid point's row logs in its Method Options column: the options that matter for its method."""
    from gpfq.runner.header import method_description
    return method_description(point)


def saved_alphabets(reports, quantized_file) -> list:
    """`reports` with each layer's alphabet as a script recovers it from a saved quantized model file (a saved
    model's reports carry none; the ad hoc variant starting from a saved model needs them); a layer the file does
    not hold as codes keeps alphabet None."""
    from gpfq.runner.deploy import with_alphabets_from
    return with_alphabets_from(reports, quantized_file)


def saved_record(model_file) -> dict:
    """The JSON record a script saves beside a quantized model (<stem>.json): hyperparameters, results, layers."""
    return json.loads(Path(model_file).with_suffix(".json").read_text())


def _variant(script: str):
    """The runner's Variant behind a script folder's name."""
    from gpfq.runner.adhoc import ADHOC
    from gpfq.runner.experiment import PLAIN
    from gpfq.runner.retrain import RETRAIN
    return {"quantization_scripts": PLAIN, "adhoc_quantization_scripts": ADHOC, "retraining_scripts": RETRAIN}[script]


def point_context(point: dict, data: tuple, options=None):
    """The context a script's variant quantizes one grid point in: the point's settings parsed as the runner
    parses them (`options`: a script folder's name, whose own keys are then checked as that script checks them,
    or a parser of those keys, e.g. gpfq.runner.adhoc.parse_options), on data = (calibration set, evaluation set,
    float model), with no float evaluation (accuracies 0)."""
    from gpfq.runner.experiment import Context, parse_point
    if isinstance(options, str):
        options = _variant(options).options
    config, run = parse_point(point, options)
    calibration, evaluation, model = data
    return Context(config, run, calibration, evaluation, model, 0.0, 0.0, print)


def quantize_point(script: str, context) -> tuple:
    """Quantize one grid point's context (point_context) as the script of that folder does ("quantization_scripts",
    "adhoc_quantization_scripts", "retraining_scripts"): (quantized model, [LayerReport], the extra columns its
    log row gets)."""
    return _variant(script).quantize(context)


def reuse_settings(record: dict, header: dict) -> tuple:
    """(a saved record's values, a header's values) of the settings the ad hoc variant requires to be equal before
    it starts from that saved model (those the header sets): equal when the model was made with these settings."""
    from gpfq.runner.adhoc import SAVED_KEYS
    same = {k: header[k] for k in SAVED_KEYS if k in header}
    return {k: record["hyperparameters"][k] for k in same}, same


# ---------------------------------------------------------------- one layer and the scripts' parts, seen from outside
# What gpfq.quantize_layer and the scripts' command lines do not expose: grouped layers and their rows, and what a
# script does with one grid point, one log or one model file. Like the functions above, they reach gpfq.pipeline or
# gpfq.runner only inside their bodies.

def layer_input_rows(layer, analog_inputs, quantized_inputs, retain_rate: float, generator, patch_stride="kernel"):
    """(X, X̃): the rows (m·patches, G·N0) gpfq quantizes `layer` from, given its inputs in the float and the
    partly quantized network (a convolution's patches: the same retain_rate share of each image's, for both)."""
    from gpfq.pipeline.rows import layer_rows
    return layer_rows(layer, analog_inputs, quantized_inputs, retain_rate, generator, patch_stride)


def quantized_layer(layer, analog_rows, quantized_rows, config) -> tuple:
    """What gpfq makes of one layer (grouped convolutions included, which gpfq.quantize_layer does not take) from
    its rows (m, G·N0): (weight, Q, X, X̃ per group (G, N1, N0) and (G, m, N0), alphabet, radius)."""
    from gpfq.pipeline.network import quantize_layer
    return quantize_layer(layer, analog_rows, quantized_rows, config)


def layer_form(config, rows: int, inputs: int, neurons: int, groups: int) -> str:
    """How gpfq computes a layer of G groups of (N1 = neurons, N0 = inputs) from m = rows rows under `config`, as
    its LayerReport.form says: 'residual', 'gram', 'columns' or the method's name."""
    from gpfq.pipeline.calibrator import layer_form as form
    return form(config, rows, inputs, neurons, groups)


def theory_errors(m: int, n0_values, trials: int, neurons: int, seed: int, methods, bits: int) -> dict:
    """{method: {N0: mean over trials of ‖XWᵀ − XQᵀ‖²/‖XWᵀ‖²}} on one Gaussian layer (X̃ = X, the gpfq2022
    alphabet), as experiments/theory.py measures and plots it (docs/theory.md)."""
    from gpfq.runner.theory import TheoryAlphabet, gaussian_layer_errors, mean_errors
    rows = gaussian_layer_errors(m, n0_values, trials=trials, neurons=neurons, seed=seed, methods=methods,
                                 alphabet=TheoryAlphabet(bits=bits))
    return {method: mean_errors(rows, method) for method in methods}


def theory_slope(errors: dict, low: float = float("-inf"), high: float = float("inf")) -> float:
    """The slope experiments/theory.py fits to {N0: error}: least squares of log(error) on log(N0), N0 in
    [low, high]."""
    from gpfq.runner.theory import fitted_slope
    return fitted_slope(errors, low, high)


def layer_order(model, example) -> list:
    """The names of the layers gpfq quantizes in `model` (its LayerReports' names), in the order it quantizes them:
    the order in which one forward pass on `example` first uses them."""
    from gpfq.pipeline.discovery import layers_in_execution_order
    return layers_in_execution_order(model, example)


def batchnorm_folded(model) -> tuple:
    """(a copy of `model`, eval mode, with every foldable BatchNorm folded into its layer, [(layer name, norm name)]
    folded): what gpfq quantizes with QuantConfig(fold_batchnorm=True)."""
    from gpfq.pipeline.folding import fold_batchnorm
    return fold_batchnorm(model)


def script_points(folder: str, *argv, header=None) -> list:
    """The grid points the script of `folder` runs for `argv`, its own grid axes (e.g. the retraining's retrain_lr)
    expanded too: one flat settings dict each, in the order the script runs them. header: a HEADER dict of one's
    own in place of the folder's."""
    from gpfq.runner.header import expand_grid
    return expand_grid(script_settings(folder if header is None else header, *argv), _variant(folder).grid_keys)


def check_options(folder: str, point: dict) -> None:
    """Check a grid point's values of the keys the script of `folder` adds (e.g. retrain_lr) as that script does
    before any work: ValueError naming the first bad one."""
    _variant(folder).options(point)


def watching_layers(watch):
    """A context manager: while open, every gpfq.quantize (a script's too) calls watch(step) with each layer's
    LayerStep the moment that layer is quantized, before the caller's own after_layer (a script's fine-tuning)."""
    import contextlib
    import dataclasses
    from gpfq.pipeline import network

    real = network.quantize_network

    def watched(model, stream, layer_config, calibration, hooks=network.Hooks(), *args, **kwargs):
        own = hooks.after_layer

        def after_layer(step):
            watch(step)
            if own is not None:
                own(step)
        return real(model, stream, layer_config, calibration, dataclasses.replace(hooks, after_layer=after_layer),
                    *args, **kwargs)

    @contextlib.contextmanager
    def swapped():
        network.quantize_network = watched  # the documented seam (docs/api.md, "Seams")
        try:
            yield
        finally:
            network.quantize_network = real
    return swapped()


def retraining_freeze(layer) -> None:
    """Take `layer` out of the retraining script's later fine-tuning, as it does with each layer once quantized:
    the parameters of the module that holds its weight, not those of its submodules."""
    from gpfq.runner.retrain import freeze
    freeze(layer)


def retraining_fine_tune(model, dataset, indices, settings: dict, generator) -> tuple:
    """One fine-tuning of the retraining script on `dataset[indices]`, with its header keys `settings` (retrain_lr,
    retrain_batchnorm, …): Adam on the parameters that require grad; (mean loss of the last epoch, optimizer
    steps). The model is left in eval mode."""
    from gpfq.runner.retrain import fine_tune, parse_options
    return fine_tune(model, dataset, indices, parse_options(settings), generator)


def layer_input(model, name: str, images):
    """The input layer `name` of `model` takes when the model runs on `images` (what gpfq makes its rows from)."""
    from gpfq.pipeline.capture import capture_input
    return capture_input(model, name, images)


def bias_correction(analog_model, quantized_model, name: str, batches, log=print):
    """Correct the bias of layer `name` of `quantized_model` in place as the ad hoc script does (a layer without one
    gets one): add the mean over `batches` of the float layer's output minus the quantized one's, per channel.
    Returns that correction (C_out,)."""
    from gpfq.runner.adhoc import correct_bias
    return correct_bias(analog_model, quantized_model, name, batches, log=log)


def bias_batches(context):
    """The seeded stream the ad hoc script draws a point's bias-correction batches from (point_context): draw(m)
    gives the next m images, in chunks."""
    from gpfq.runner.adhoc import bias_stream
    return bias_stream(context)


def bias_correctable_layers(model, names: list, example) -> set:
    """Those of the layers `names` whose bias the ad hoc script can correct: the Linear and convolution modules
    that a forward pass on `example` calls."""
    from gpfq.runner.adhoc import correctable_layers
    return correctable_layers(model, names, example)


def adhoc_point(point: dict) -> dict:
    """The point the ad hoc script runs for `point`: with saved_model, the quantization settings taken from that
    model's JSON record (ValueError when it or its record is missing, or with skip_layers or bits_map)."""
    from gpfq.runner.adhoc import resolve_point
    return resolve_point(point)


def adhoc_bits(layer_names: list, bits_map: dict, bits: int) -> dict:
    """{layer: bits} the ad hoc script gives each layer for a bits_map (index or name pattern: bits; the last
    entry that matches wins, else `bits`); ValueError for an entry that matches no layer."""
    from gpfq.runner.adhoc import bits_per_layer
    return bits_per_layer(layer_names, bits_map, bits)


def _adhoc_typed_point(options: dict, fields: dict):
    """The runner's parsed point of the default model and data with ad hoc `options` (unchecked) and
    QuantConfig(**fields)."""
    from gpfq.config import QuantConfig
    from gpfq.runner.adhoc import AdhocOptions
    from gpfq.runner.run_config import Point, RunConfig
    return Point(QuantConfig(**fields), RunConfig("fashion_resnet", "fashion_mnist", options=AdhocOptions(**options)))


def adhoc_logs(options: dict, **fields) -> list:
    """The logs (file names) the ad hoc script writes a point's row to, for its ad hoc keys `options`
    (bias_correction, bias_batch_size, skip_layers, bits_map) and QuantConfig(**fields)."""
    from gpfq.runner.adhoc import ADHOC
    return ADHOC.log_names_of(_adhoc_typed_point(options, fields))


def check_adhoc_model(options: dict, model, example, **fields) -> None:
    """Check, as the ad hoc script does once the model is loaded and before any point starts, that a point (its ad
    hoc keys `options`, QuantConfig(**fields)) fits `model` (example: one input (1, …); 1000 images of calibration
    and evaluation data): ValueError saying why not."""
    from gpfq.runner.adhoc import validate_model
    from gpfq.runner.experiment import ModelFacts
    facts = ModelFacts(layer_order(model, example), model, 1000, 1000, example)
    validate_model(_adhoc_typed_point(options, fields), facts)


def refuse_quantization(monkeypatch) -> None:
    """From here to the end of the test, any quantization that starts (gpfq.quantize, a script's) fails with an
    AssertionError: to show that bad input is reported before any work."""
    from gpfq.pipeline import network

    def started(*args, **kwargs):
        raise AssertionError("quantization started before the bad input was reported")
    monkeypatch.setattr(network, "quantize_network", started)  # the documented seam (docs/api.md, "Seams")


def export_beside_model(model_file, log=print):
    """What a script's --export_onnx does with the model file it saved: <stem>.onnx beside it (and <stem>.int8.onnx,
    the QDQ graph, for an act_bits 8 run), its lines to `log`; returns the .onnx path, or None if the export failed."""
    from gpfq.runner.deploy import export_beside
    return export_beside(model_file, log)


def run_keys() -> set:
    """The settings of how a script runs rather than how it quantizes (model, data, weights, folders, execution)."""
    from gpfq.runner.header import RUN_KEYS
    return set(RUN_KEYS)


def run_settings(point: dict) -> dict:
    """{name: value} of the run settings the runner parses a grid point into (its RunConfig, field by field)."""
    import dataclasses
    from gpfq.runner.header import parse_point
    run = parse_point(point)[1]
    return {item.name: getattr(run, item.name) for item in dataclasses.fields(run)}


def script_own_keys(folder: str) -> set:
    """The settings only the script of `folder` takes (the ad hoc or retraining options; none for the plain one)."""
    return set(_variant(folder).header_keys)


def point_config(point: dict):
    """The QuantConfig a script quantizes a grid point with."""
    from gpfq.runner.header import quant_config
    return quant_config(point)


def point_log_values(point: dict) -> dict:
    """{log column: value} a grid point's row gets from its settings (model, data, the QuantConfig, weights, eval
    subset), in the order of the log; with the script's own options, they identify the point (resume)."""
    from gpfq.runner.header import parse_point, point_columns
    return point_columns(parse_point(point))


def run_columns() -> set:
    """The log columns that record run settings (model, data, weights, author) rather than QuantConfig fields."""
    from gpfq.runner.header import RUN_COLUMNS
    return set(RUN_COLUMNS.values())


def script_logs(folder: str = None) -> dict:
    """{log file name: its columns, in header order} of the logs the script of `folder` writes (default: every
    script's)."""
    if folder is None:
        from gpfq.runner.procedures import LOG_COLUMNS
        return {name: list(columns) for name, columns in LOG_COLUMNS.items()}
    return {name: list(columns) for name, columns in _variant(folder).logs.items()}


def filled_columns(folder: str) -> set:
    """The log columns a row of the script of `folder` fills from its default grid point's settings: the point's
    (point_log_values) and those of the script's own options."""
    from gpfq.runner.header import parse_point, point_columns
    variant = _variant(folder)
    point = parse_point(script_points(folder)[0], variant.options)
    return set(point_columns(point)) | set(variant.own_columns(point))


def script_result_columns(folder: str) -> set:
    """The columns of the script of `folder`'s logs that record what a run measured (result_columns(), and the
    script's own, e.g. the retraining's Retrain Seconds)."""
    return result_columns() | set(_variant(folder).result_columns)


def grid_axes() -> tuple:
    """The settings a script's grid expands (a list value of any other is one value), in the order that fixes the
    order of its points: itertools.product's, the last axis varying fastest."""
    from gpfq.runner.header import GRID_KEYS
    return tuple(GRID_KEYS)


def grid_notes(header, *argv) -> tuple:
    """(the grid points as grid_points gives them, the notes the script prints about its grid, e.g. on repeated
    values)."""
    from gpfq.runner.header import expand_grid
    notes = []
    return expand_grid(script_settings(header, *argv), say=notes.append), notes


def points_run(header, *argv) -> list:
    """The QuantConfig of each grid point a script runs for `argv` (header as in run_script), in order, with the
    work of each point left out (its row is empty); what the script prints goes to stdout as it does."""
    import pytest
    from gpfq.runner import experiment
    configs = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment, "run_point", lambda point, *args, **kwargs: configs.append(point.config) or {})
        run_script(header, *argv)
    return configs


def header_help(script) -> dict:
    """{key: its comment} that a script's --help shows, read from the header of the script file at `script`
    (a comment's continuation lines joined)."""
    from gpfq.runner.header import header_comments
    return header_comments(script)


def common_help() -> dict:
    """{key: its help} of the keys every script takes beside its header's (resume, debug, …)."""
    from gpfq.runner.header import COMMON_HELP
    return dict(COMMON_HELP)


# ---------------------------------------------------------------- logs, figures and whole runs, seen from outside
# What the scripts' logs, the figures and a script's run around a grid point do, for tests that check them without
# naming the runner's modules. Like the functions above, they reach gpfq.pipeline or gpfq.runner only in their bodies.

def append_log_row(path, row: dict, columns) -> None:
    """Append `row` ({column: value}) to the CSV log at `path` as a script appends a grid point's row: the log is
    created with the header `columns` if missing; a log with another header is refused (foreign_log_error)."""
    from gpfq.runner.logs import append_row
    append_row(path, row, columns)


def fresh_log(path, columns):
    """Start the log at `path` fresh with the header `columns`, as logs/init_logs.py does for each log: the path an
    existing log was renamed to (<stem>_<timestamp>.csv), or None when there was none."""
    from gpfq.runner.logs import init_log
    return init_log(path, columns)


def foreign_log_error() -> type:
    """The error class (a gpfq.errors.BadInputError and ValueError) of a log whose header is not a script's."""
    from gpfq.runner.logs import ForeignLogError
    return ForeignLogError


def plot_logs_script() -> dict:
    """The namespace of experiments/plot_logs.py (its main, read_logs, seed_table, the plot_* functions, …)."""
    import runpy
    from gpfq.paths import REPO_ROOT
    return runpy.run_path(str(REPO_ROOT / "experiments" / "plot_logs.py"))


def top1_by_m(frame, model: str):
    """The table plot_logs.py draws top-1 against m from for `model` (frame: its read_logs rows): index m, a column
    per bit width, seeds averaged."""
    from gpfq.runner.figures import top1_against_m
    return top1_against_m(frame, model)


def top1_by_bits(frame, model: str, m: int):
    """The table plot_logs.py draws its method comparison from for `model` at `m`: index bits, a column per method
    setting (e.g. "MSQ, per channel"), seeds averaged."""
    from gpfq.runner.figures import top1_against_bits
    return top1_against_bits(frame, model, m)


def refuse_evaluation(monkeypatch) -> None:
    """From here to the end of the test, any evaluation a script starts (the float or the quantized model's) fails
    with an AssertionError; the float accuracy cache is off, so a cached accuracy cannot skip it."""
    from gpfq.runner import experiment

    def started(*args, **kwargs):
        raise AssertionError("evaluation started before the bad input was reported")
    monkeypatch.setenv("GPFQ_CACHE_DIR", "off")
    monkeypatch.setattr(experiment, "evaluate", started)


def small_evaluation(monkeypatch, images: int) -> None:
    """From here to the end of the test, a script evaluates on the first `images` images of its evaluation set only
    (the code paths are the real ones; the rows' accuracies are over those images)."""
    from torch.utils.data import Subset
    from gpfq.runner import experiment
    full = experiment.evaluation_set
    monkeypatch.setattr(experiment, "evaluation_set", lambda name, data_dir: Subset(full(name, data_dir),
                                                                                     range(images)))


def slow_layers(seconds: float) -> None:
    """For the rest of this process (a child a test starts), each layer gpfq quantizes takes `seconds` longer, so a
    grid point lasts long enough for a signal to land inside it (its rows stay the real ones)."""
    import time
    from gpfq.pipeline import network
    # the loop asks layer_alphabet once per quantized layer, from rows or from sums
    real_layer_alphabet = network.layer_alphabet
    network.layer_alphabet = lambda *args, **kwargs: (time.sleep(seconds), real_layer_alphabet(*args, **kwargs))[1]


def run_script_with_model_check(header, check, *argv) -> list:
    """run_script(header, *argv) with check(layer names, calibration set size, evaluation set size) called where a
    script variant checks its points against the loaded model, before any point starts (as the ad hoc script checks
    its bits_map): raising there stops the run."""
    from gpfq.runner.experiment import Variant, main

    def validate_model(point, facts):
        check(facts.layer_names, facts.calibration_size, facts.evaluation_size)
    return main(header, list(argv), variant=Variant(validate_model=validate_model))


def point_identity(point: dict, log_name: str, folder: str = "quantization_scripts") -> dict:
    """{column: value} of the columns of log `log_name` that a resumed run of the script of `folder` compares to
    find grid point `point` done (every column but the results)."""
    from gpfq.runner.experiment import parse_point
    from gpfq.runner.resume import point_identity as identity
    variant = _variant(folder)
    return identity(parse_point(point, variant.options), variant.logs[log_name], variant)


def pending_grid_points(points: list, log_dir, **variant) -> list:
    """Those of `points` (grid point dicts) that a resumed script would still run, given the rows in the logs of
    `log_dir`: one whose row is missing from one of its logs. variant: the fields of a script variant of one's own
    (logs, log_names, columns, options: the runner's names; log_names and columns take the parsed point, whose
    .config is its QuantConfig and .run.options what `options` parsed); default: the plain script."""
    from gpfq.runner.experiment import PLAIN, Variant, parse_point
    from gpfq.runner.resume import pending_points
    kind = Variant(**variant) if variant else PLAIN
    parsed = [parse_point(point, kind.options) for point in points]
    pending = pending_points(parsed, log_dir, kind)
    return [point for point, typed in zip(points, parsed) if any(typed is p for p in pending)]


def calibration_stream(dataset, seed: int, chunk_size: int = 256, num_workers: int = 0):
    """The seeded endless shuffle a script draws calibration images from (gpfq.pipeline.streams.CalibrationStream,
    a documented seam): draw(m) gives the next m images as a list of chunks."""
    from gpfq.pipeline.streams import CalibrationStream
    return CalibrationStream(dataset, seed, chunk_size=chunk_size, num_workers=num_workers)


def quantized_network(model, images, config, keep_rows: bool = False, after_layer=None) -> tuple:
    """gpfq.quantize's layer loop on `images` (N, …), every layer under `config` (its batch_size, retain_rate, seed,
    calibration and patch_stride drive the calibration), no log lines: (quantized copy, [LayerReport]).
    keep_rows: keep each layer's rows (G, m, N0) for after_layer(step), as the ad hoc and retraining scripts do
    (gpfq.quantize streams them)."""
    from gpfq.pipeline.network import Calibration, Hooks, quantize_network
    stream = calibration_stream(TensorDataset(images, torch.zeros(len(images))), seed=config.seed)
    calibration = Calibration(config.batch_size, config.retain_rate, config.seed, mode=config.calibration,
                              patch_stride=config.patch_stride, keep_rows=keep_rows)
    return quantize_network(model, stream, lambda index, name, n_layers: config, calibration,
                            Hooks(log=lambda text: None, after_layer=after_layer))


def non_finite_error() -> type:
    """The error class (a gpfq.errors.BadInputError) of a NaN or Inf in a model's weights or a layer's input."""
    from gpfq.pipeline.capture import NonFiniteError
    return NonFiniteError


def layer_warning_lines(rows: int, inputs: int, zeros: int, weights: int, relative_error: float) -> list:
    """The warnings a layer's line and its log row get: m·patches `rows` against N0 `inputs` weights per neuron,
    `zeros` of `weights` quantized to 0, its relative error."""
    from gpfq.pipeline.reports import layer_warnings
    return layer_warnings(rows, inputs, zeros, weights, relative_error)


def chance_warning_lines(top1: float, classes: int) -> list:
    """The warning a script's row gets when the quantized model's top-1 is within 2 points of chance (1/classes)."""
    from gpfq.runner.evaluate import chance_warnings
    return chance_warnings(top1, classes)


def debug_asked(argv: list, header: dict = None) -> bool:
    """Whether a script shows an error's stack for command line `argv` and its HEADER `header` (--debug, the
    header's debug, or GPFQ_DEBUG set)."""
    from gpfq.runner.cli import debug_requested
    return debug_requested(argv, header)


def script_evaluation_loader(dataset: str, data_dir=None):
    """The loader of the evaluation set a script evaluates its models on for `dataset` (narrowed when the test
    called small_evaluation), as the script batches it."""
    from gpfq.paths import DATA_DIR
    from gpfq.runner import experiment
    return experiment.evaluation_loader(experiment.evaluation_set(dataset, data_dir or DATA_DIR))


def refuse_model_loading(monkeypatch) -> None:
    """From here to the end of the test, a script that loads its model fails the test: to show that bad input is
    reported before the model is built."""
    import pytest
    from gpfq.runner import experiment
    monkeypatch.setattr(experiment, "load_model", lambda *args: pytest.fail("the model was built"))


def model_data_mismatch_error() -> type:
    """The error class (a gpfq.errors.BadInputError, ValueError) of a model that cannot take a script's images."""
    from gpfq.runner.preprocessing import ModelDataMismatchError
    return ModelDataMismatchError


def check_model_fits_data(model_name: str, dataset: str, image_size=None, data_dir=None) -> None:
    """Check, as a script does before loading anything, that model `model_name` goes with `dataset` (and
    --image_size): ValueError saying why not."""
    from gpfq.runner.preprocessing import check_model_and_data
    check_model_and_data(model_name, dataset, image_size, data_dir)


def check_model_takes_images(model_name: str, model, dataset_name: str, dataset) -> None:
    """Check, as a script does once the model is loaded, that `model` runs on one image of `dataset`:
    model_data_mismatch_error() saying the image's shape and what the model raised, if not."""
    from gpfq.runner.preprocessing import check_model_takes
    check_model_takes(model_name, model, dataset_name, dataset)


def model_preprocessing(model_name: str, model, image_size=None) -> tuple:
    """(transform, description): how a script prepares a photo (PIL image) for `model` with --dataset imagefolder,
    e.g. to a (3, 224, 224) tensor, and the line it prints about it."""
    from gpfq.runner.preprocessing import model_transform
    return model_transform(model_name, model, image_size)


def image_folder_data(model_name: str, model, folder, image_size=None, log=print) -> tuple:
    """(calibration set, evaluation set) a script reads from an ImageFolder `folder` (train/ and val/) for `model`:
    datasets of (image tensor, class index) with .classes."""
    from gpfq.runner.preprocessing import image_folder_sets
    return image_folder_sets(model_name, model, folder, image_size, log=log)


def logged_float_accuracy(point: dict, measured: tuple, **run_changes) -> tuple:
    """The float model's (top-1, top-5) a script logs for grid point `point`, its run settings changed by
    `run_changes` (unchecked, e.g. dataset="imagefolder" without a folder), where measuring the model gives
    `measured`: torchvision's published numbers where they stand for the run, else the measured ones."""
    import dataclasses
    import pytest
    from gpfq.runner import experiment
    config, run = experiment.parse_point(point)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment, "evaluate", lambda *args, **kwargs: measured)
        return experiment.float_accuracy((config, dataclasses.replace(run, **run_changes)), None,
                                         experiment.Resources(), lambda: None)


def record_layers(reports) -> list:
    """The "layers" of the JSON record a script saves beside a model (saved_record) for `reports`: one JSON-ready
    dict per LayerReport (no alphabet), an undefined (NaN) relative error as None (null)."""
    from gpfq.pipeline.reports import reports_as_dicts
    return reports_as_dicts(reports)


def evaluation_classes(dataset):
    """The number of classes a script counts in an evaluation set of (image, label) (its chance level is 1/that),
    or None for a set without labels."""
    from gpfq.runner.evaluate import classes_in
    return classes_in(dataset)


def hold_quantized_evaluation(mark, seconds: float) -> None:
    """For the rest of this process (a script's child), a script's evaluation of a quantized model (after the
    point's files are saved, before its row) first creates the file `mark`, then sleeps `seconds`: time for a test
    to interrupt the point there."""
    import time
    from gpfq.runner import experiment
    real_evaluate = experiment.evaluate

    def evaluate(model, loader, *args, desc="evaluate", **kwargs):
        if desc == "quantized model":
            Path(mark).touch()
            time.sleep(seconds)
        return real_evaluate(model, loader, *args, desc=desc, **kwargs)
    experiment.evaluate = evaluate


def script_result_folders() -> tuple:
    """(log folder, model folder) a script writes to when --log_dir and --model_dir are not given."""
    from gpfq.runner import experiment
    return experiment.LOG_DIR, experiment.MODEL_DIR


def run_script_command(folder: str, *argv) -> None:
    """Run <folder>/quantize.py in this process as `python <folder>/quantize.py argv…` runs from a shell: an
    expected error ends it as the script ends, one line on stderr and SystemExit (2: bad input, 1: a failed
    write)."""
    import runpy
    import sys
    from gpfq.paths import REPO_ROOT
    script = REPO_ROOT / folder / "quantize.py"
    saved, sys.argv = sys.argv, [str(script), *map(str, argv)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved


def save_beside_model(model, reports, model_path, point: dict, input_shape, log=print) -> tuple:
    """What a script writes for grid point `point` beside its saved model at `model_path`: the quantized model file
    <stem>.safetensors of `model` and its [LayerReport], recording `input_shape` (one example's, no batch axis);
    (its path, SizeReport)."""
    from gpfq.runner.deploy import save_beside
    from gpfq.runner.header import parse_point
    return save_beside(model, reports, model_path, parse_point(point), input_shape, log=log)


def checkpoint_kill_variable() -> str:
    """The environment variable that makes a run with --checkpoint end (as if killed) after that many layers."""
    from gpfq.pipeline.checkpoint import KILL_VARIABLE
    return KILL_VARIABLE


def layer_checkpoint(folder, identity: dict, revision: str, mode="auto", resume: bool = False, log=print):
    """The per-layer checkpoint of one grid point in `folder`, as a script keeps it with --checkpoint and passes it
    to gpfq.quantize(checkpoint=…): load(layer names) -> a matching saved state or None, after_layer(index,
    state), remove(), path."""
    from gpfq.pipeline.checkpoint import LayerCheckpoint
    return LayerCheckpoint(folder, identity, revision, mode=mode, resume=resume, log=log)


def read_layer_checkpoint(path) -> dict:
    """The state saved in a checkpoint file; ValueError when its checksum does not match (a corrupted file)."""
    from gpfq.pipeline.checkpoint import read_checkpoint
    return read_checkpoint(path)


def interrupt_after_logging(monkeypatch) -> None:
    """From here to the end of the test, a Ctrl-C (KeyboardInterrupt) reaches a script just after it appends a
    grid point's row to its log, before it marks the point done."""
    from gpfq.runner import experiment
    real_append = experiment.append_row

    def append_then_interrupt(*args, **kwargs):
        real_append(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(experiment, "append_row", append_then_interrupt)


def user_data_stream(calibration_data, seed: int, chunk_size: int = 256):
    """The stream gpfq.quantize draws from a caller's calibration data (a DataLoader in its own order; a Dataset,
    tensor or dict of tensors in a seeded shuffle): draw(m) gives the next m inputs as a list of chunks."""
    from gpfq.api import calibration_stream
    return calibration_stream(calibration_data, seed, chunk_size)
