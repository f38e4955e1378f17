"""Ad hoc improvements over plain GPFQ (docs/variants.md): bias correction, float layers, mixed precision.

All three are one call of `gpfq.quantize`:
- layers left float (`skip_layers`) and bits per layer (`bits_map`) are its `layers` choices;
- bias correction of every quantized layer goes through its `after_layer` hook, so later layers are
  quantized with the corrected network's inputs X̃.

Bias correction (per output channel c):  b'_c = b_c + mean(analog_layer(X) − quantized_layer(X̃))_c,
i.e. b + mean of (X Wᵀ − X̃ Qᵀ) over images and, for a convolution, over every output position. It is
computed on the layers' full outputs (their own stride and padding), not on the quantizer's
subsampled kernel-stride patches: the next layer sees the full output, and the patches are neither
every position nor the layer's positions. The images come from a separate seeded stream
(`bias_stream`): the quantizer then sees exactly the images plain GPFQ sees with the same seed, the
correction is measured on images Q was not fitted to, and its batch size is free of m.

Modes: 'last' (the last layer stays quantized, its bias is corrected: paper variant 1), 'last_float'
(the last layer keeps its float weights and its bias is corrected with X̃: variant 2), 'all' (every
quantized layer right after it is quantized). A layer without a bias gets one (zeros) first. Only a
weight that is a Linear's or a convolution's own is corrected (`correctable_layers`): an attention projection or a
weight used through a bare matmul has no module output to measure the gap on. 'all' leaves those layers'
biases alone and says so before it starts; 'last' and 'last_float' are refused when the last layer is one.

Works on a fresh quantization or on a saved model (`saved_model`: a .pt in models/ whose JSON sidecar
gives the hyperparameters it was quantized with); the saved path can only correct biases.
"""
import dataclasses
import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from gpfq.methods.alphabet import MAX_BITS
from gpfq.api import quantize as quantize_model
from gpfq.pipeline.capture import capture_input
from gpfq.pipeline.discovery import layers_in_execution_order
from gpfq.pipeline.rows import layer_weight
from gpfq.config import FIELDS
from gpfq.pipeline.streams import CalibrationStream
from gpfq.runner.deploy import quantized_path, with_alphabets_from
from gpfq.errors import bad_hyperparameter
from gpfq.runner.experiment import Variant
from gpfq.runner.logs import EXTRA_COLUMNS, PAPER_COLUMNS
from gpfq.pipeline.reports import LayerReport
from gpfq.io.models import load_saved_model
from gpfq.paths import MODEL_DIR, REPO_ROOT
from gpfq.io.storage import display_path

# One row goes to the log of every option it switches on, so the three logs share one column set; each
# puts its own columns first. The bias-correction log keeps the original's place for "Bias Correction
# Batch Size" (right after the batch size).
BIAS_LOG = "Quantization_Log_Bias_Correct.csv"
SKIP_LOG = "Quantization_Log_Skip.csv"
MIXED_LOG = "Quantization_Log_Mixed_Precision.csv"
_BATCH = PAPER_COLUMNS.index("Quantization Batch Size") + 1
LOGS = {
    BIAS_LOG: (PAPER_COLUMNS[:_BATCH] + ["Bias Correction Batch Size"] + PAPER_COLUMNS[_BATCH:]
               + ["Bias Correction", "Skip Layers", "Bits Map", "Average Bits", "Source Model"] + EXTRA_COLUMNS),
    SKIP_LOG: (PAPER_COLUMNS + ["Skip Layers", "Bias Correction", "Bias Correction Batch Size", "Bits Map",
                                "Average Bits", "Source Model"] + EXTRA_COLUMNS),
    MIXED_LOG: (PAPER_COLUMNS + ["Bits Map", "Average Bits", "Skip Layers", "Bias Correction",
                                 "Bias Correction Batch Size", "Source Model"] + EXTRA_COLUMNS),
}
BIAS_CORRECTIONS = (None, "last", "last_float", "all")
SKIP_CHOICES = (None, "first", "last", "both")
FLOAT_BITS = 32  # what a float weight costs in the average bits per weight
BIAS_SEED_OFFSET = 1_000_003  # the bias-correction stream is seeded with seed + this
# Keys of the ad hoc header that expand into the grid (beside the plain ones).
GRID_KEYS = ("bias_correction", "bias_batch_size", "skip_layers", "bits_map")
# Every key the ad hoc header adds to the plain one.
HEADER_KEYS = GRID_KEYS + ("saved_model",)
# How a saved model was quantized: read from its sidecar, replacing the header's values.
SAVED_KEYS = ("model_name", "dataset", "weights") + FIELDS + ("skip_layers", "bits_map")


# ---------------------------------------------------------------- hyperparameters
@dataclass(frozen=True)
class AdhocOptions:
    """The ad hoc header keys of a grid point (`RunConfig.options`)."""
    bias_correction: Optional[str] = None  # one of BIAS_CORRECTIONS
    bias_batch_size: Optional[int] = None  # images per bias-correction batch (with bias_correction)
    skip_layers: Optional[str] = None  # one of SKIP_CHOICES
    bits_map: dict = field(default_factory=dict, hash=False)  # {layer index or name pattern: bits}
    saved_model: Optional[str] = None  # the .pt whose biases are corrected, instead of a fresh quantization

    def log_names(self) -> list:
        """The log of every option that is on."""
        switched = ((self.bias_correction, BIAS_LOG), (self.skip_layers, SKIP_LOG), (self.bits_map, MIXED_LOG))
        return [name for on, name in switched if on]


def parse_options(point: dict) -> AdhocOptions:
    """The ad hoc options of a grid point, checked (cheap; layer-name matching happens before quantization)."""
    def fail(message):
        raise bad_hyperparameter(message)

    mode, size, skip = point.get("bias_correction"), point.get("bias_batch_size"), point.get("skip_layers")
    if mode not in BIAS_CORRECTIONS:
        fail(f"bias_correction must be one of {BIAS_CORRECTIONS}, got {mode!r}")
    if mode and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        fail(f"bias_batch_size must be an integer ≥ 1, got {size!r}")
    if skip not in SKIP_CHOICES:
        fail(f"skip_layers must be one of {SKIP_CHOICES}, got {skip!r}")
    bits_map = point.get("bits_map") or {}
    if not isinstance(bits_map, dict):
        fail(f"bits_map must be a dict {{layer index or name pattern: bits}}, got {bits_map!r}")
    for key, bits in bits_map.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            fail(f"bits_map keys are layer indices (int) or name patterns (str), got {key!r}")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
            fail(f"bits_map[{key!r}] must be an integer from 1 to {MAX_BITS} (what the alphabets support), "
                 f"got {bits!r}")
    options = AdhocOptions(mode, size, skip, bits_map, point.get("saved_model"))
    if not options.log_names():
        fail("no ad hoc option is on (bias_correction, skip_layers, bits_map): that is plain GPFQ, "
             "run quantization_scripts/quantize.py")
    return options


def log_names(point) -> list:
    """The log of every option the point (a `Point`) switches on."""
    return point.run.options.log_names()


def saved_model_path(saved) -> Path:
    """The .pt of a saved model given as a path (absolute, from here, from the repo root or from models/)."""
    given = Path(saved)
    if given.suffix == ".json":
        given = given.with_suffix(".pt")
    for candidate in (given, REPO_ROOT / given, MODEL_DIR / given):
        if candidate.exists():
            if not candidate.with_suffix(".json").exists():
                raise bad_hyperparameter(f"saved_model {candidate} has no JSON sidecar "
                                         f"{candidate.with_suffix('.json').name}; it was not written by this project")
            return candidate.resolve()
    raise bad_hyperparameter(f"saved_model {saved!r} not found (looked here, in {REPO_ROOT} and "
                             f"in {MODEL_DIR})")


def saved_record(path: Path) -> dict:
    return json.loads(Path(path).with_suffix(".json").read_text())


def resolve_point(point: dict) -> dict:
    """With `saved_model` set, take the quantization hyperparameters from the model's sidecar (before the point is
    parsed: they are read as its header keys)."""
    if not point.get("saved_model"):
        return point
    if point.get("skip_layers") or point.get("bits_map"):
        raise bad_hyperparameter("skip_layers and bits_map choose how layers are quantized; a saved "
                                 "model is already quantized, so with saved_model only bias_correction applies")
    path = saved_model_path(point["saved_model"])
    hyperparameters = saved_record(path).get("hyperparameters")
    if not isinstance(hyperparameters, dict):
        raise bad_hyperparameter(f"{path.with_suffix('.json')} has no 'hyperparameters' record")
    resolved = dict(point, saved_model=str(path), skip_layers=None, bits_map={})
    resolved.update({key: hyperparameters[key] for key in SAVED_KEYS if key in hyperparameters})
    return resolved


# ---------------------------------------------------------------- float layers and bits per layer
def skipped_indices(skip_layers, n_layers: int) -> set:
    """Indices (execution order) that `skip_layers` leaves float."""
    return {"first": {0}, "last": {n_layers - 1}, "both": {0, n_layers - 1}}.get(skip_layers, set())


def bits_per_layer(names: list, bits_map: dict, default_bits: int) -> dict:
    """name -> bits. A bits_map key is a layer index (execution order, negative from the end) or an
    fnmatch pattern on the layer name; the last entry that matches a layer wins, else `default_bits`.
    An entry that matches no layer is an error (a typo would otherwise silently do nothing)."""
    chosen, unmatched = {}, []
    for key, bits in (bits_map or {}).items():
        if isinstance(key, int):
            matched = [names[key]] if -len(names) <= key < len(names) else []
        else:
            matched = [name for name in names if fnmatch.fnmatchcase(name, key)]
        if not matched:
            unmatched.append(key)
        chosen.update({name: bits for name in matched})
    if unmatched:
        raise bad_hyperparameter(f"bits_map entries {unmatched} match no layer; the layers are "
                                 f"{', '.join(f'{i}: {n}' for i, n in enumerate(names))}")
    return {name: chosen.get(name, default_bits) for name in names}


def average_bits(model: nn.Module, names: list, reports) -> float:
    """Bits per weight over the weight tensors of every Conv2d/Linear layer; a float layer costs 32."""
    bits = {report.name: report.bits for report in reports}
    sizes = {name: layer_weight(model, name).numel() for name in names}
    return sum(sizes[n] * bits.get(n, FLOAT_BITS) for n in names) / sum(sizes.values())


# ---------------------------------------------------------------- bias correction
def bias_stream(context) -> CalibrationStream:
    """The seeded stream bias-correction batches are drawn from, apart from the quantizer's."""
    return CalibrationStream(context.calibration, context.config.seed + BIAS_SEED_OFFSET,
                             chunk_size=context.run.chunk_size, num_workers=context.run.num_workers)


def _channel_sums(output: torch.Tensor, layer: nn.Module):
    """Per output channel sum over images (and positions) of a layer output, and the count per channel."""
    channel_dim = 1 if isinstance(layer, nn.modules.conv._ConvNd) else output.dim() - 1
    per_channel = output.movedim(channel_dim, 0).reshape(output.shape[channel_dim], -1)
    return per_channel.double().sum(dim=1), per_channel.shape[1]


@torch.no_grad()
def correctable_layers(model: nn.Module, names: list, example: torch.Tensor) -> set:
    """The layers among `names` that can be bias-corrected: Linear or convolution modules that the forward pass
    calls, so their output is weight · input + bias per output channel. Not an attention projection, nor a Linear
    whose weight another module reads (MultiheadAttention's out_proj), nor a weight read by a bare matmul."""
    called, handles = set(), []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:  # a parameter's name ('…in_proj_weight'), not a module's
            continue
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            handles.append(module.register_forward_pre_hook(lambda m, i, name=name: called.add(name)))
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    return called


@torch.no_grad()
def output_gap_mean(analog_model, quantized_model, name: str, chunks, device="cpu") -> torch.Tensor:
    """(C_out,) float64: mean over images and output positions of analog_layer(X) − quantized_layer(X̃).

    X, X̃: the inputs the layer receives in the float and in the quantized network, on the same images.
    """
    analog_layer = analog_model.get_submodule(name)
    quantized_layer = quantized_model.get_submodule(name)
    total, count = 0.0, 0
    for images in chunks:
        images = images.to(device)
        analog = capture_input(analog_model, name, images)
        quantized = capture_input(quantized_model, name, images)
        sums, n = _channel_sums(analog_layer(analog) - quantized_layer(quantized), analog_layer)
        total, count = total + sums, count + n
    return total / count


@torch.no_grad()
def correct_bias(analog_model, quantized_model, name: str, chunks, device="cpu", log=print) -> torch.Tensor:
    """Add the mean output gap to the bias of `name` in `quantized_model` (giving it a zero bias first if it
    has none), so the gap has mean zero per output channel on `chunks`. Returns the correction (C_out,)."""
    gap = output_gap_mean(analog_model, quantized_model, name, chunks, device)
    layer = quantized_model.get_submodule(name)
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                              device=layer.weight.device), requires_grad=layer.weight.requires_grad)
    layer.bias.add_(gap.to(layer.bias.dtype))
    log(f"    bias correction {name}: mean |Δb| {float(gap.abs().mean()):.4g}, max |Δb| {float(gap.abs().max()):.4g}")
    return gap


# ---------------------------------------------------------------- saved models
def _report_from_dict(record: dict) -> LayerReport:
    fields = {f.name for f in dataclasses.fields(LayerReport)}
    values = {k: v for k, v in record.items() if k in fields}
    values["weight_shape"] = tuple(values["weight_shape"])
    if values.get("relative_error", 0.0) is None:  # written as null when undefined (network.reports_as_dicts)
        values["relative_error"] = float("nan")
    return LayerReport(**values)


# ---------------------------------------------------------------- the variant
def quantize(context):
    """Quantize (or load) a model with the ad hoc options of `context.run.options`.

    Returns (model, [LayerReport] of the quantized layers, extra log columns).
    """
    options, log, device = context.run.options, context.log, context.device
    analog_model = context.analog_model.eval().to(device)
    example = context.calibration[0][0].unsqueeze(0).to(device)
    names = layers_in_execution_order(analog_model, example)
    mode = options.bias_correction
    corrections = bias_stream(context)
    last = names[-1]
    # 'all' corrects every layer it can ('last' and 'last_float' were checked against the last layer before work)
    correctable = correctable_layers(analog_model, names, example) if mode == "all" else set(names)
    uncorrectable = [name for name in names if name not in correctable]
    if uncorrectable:
        log(f"bias correction: {len(uncorrectable)} of {len(names)} layers are not Linear or convolution modules that "
            f"the forward pass calls, and keep their biases: {', '.join(uncorrectable)}")

    if options.saved_model:
        model = load_saved_model(options.saved_model, analog_model).to(device)
        reports = [_report_from_dict(r) for r in saved_record(options.saved_model).get("layers", [])]
        # the codebooks of the source's quantized model file, so the bias-corrected model has one too
        reports = with_alphabets_from(reports, quantized_path(options.saved_model))
        log(f"loaded {options.saved_model} ({len(reports)} quantized layers)")
        if mode == "last_float":
            with torch.no_grad():  # restore the last layer to the float model's weights and bias
                restored, float_layer = model.get_submodule(last), analog_model.get_submodule(last)
                restored.weight.copy_(float_layer.weight)
                if restored.bias is not None:  # (a bias that an earlier correction added starts again at 0)
                    restored.bias.copy_(float_layer.bias if float_layer.bias is not None else 0.0)
            reports = [r for r in reports if r.name != last]
        if mode == "all":
            for report in reports:  # execution order: each with X̃ from the already corrected layers
                if report.name in uncorrectable:
                    continue
                correct_bias(analog_model, model, report.name, corrections.draw(options.bias_batch_size), device, log)
    else:
        bits_per_layer(names, options.bits_map, context.config.bits)  # every entry matches a layer
        left_float = skipped_indices(options.skip_layers, len(names))
        if mode == "last_float":
            left_float.add(len(names) - 1)
        # bits per layer (the last matching entry wins), then the float layers, which win over bits
        layers = {key: {"bits": bits} for key, bits in options.bits_map.items()}
        for index in sorted(left_float):
            layers.pop(index, None)  # re-inserted last, so no bits entry comes after it
            layers[index] = None

        def after_layer(step):
            if step.report.name in uncorrectable:
                return
            correct_bias(step.analog_model, step.quantized_model, step.report.name,
                         corrections.draw(options.bias_batch_size), device, log)

        # the checkpoint holds the loop's state; 'last' corrections draw from their own stream after the loop,
        # so a resumed point ends as an uninterrupted one ('all' corrects inside the loop: the loop turns it off)
        result = quantize_model(analog_model, context.stream(), context.config, device=device, layers=layers,
                                after_layer=after_layer if mode == "all" else None, log=log,
                                checkpoint=context.checkpoint)
        model, reports = result.model, result.reports
    if mode in ("last", "last_float"):
        correct_bias(analog_model, model, last, corrections.draw(options.bias_batch_size), device, log)

    bits = average_bits(model, names, reports)
    log(f"average bits per weight: {bits:.4f} ({len(reports)} of {len(names)} layers quantized)")
    return model, reports, dict(variant_columns(context.point), **{"Average Bits": round(bits, 4)})


def variant_columns(point) -> dict:
    """The ad hoc hyperparameter columns of a point's row (with the plain ones, they identify it for `resume`)."""
    options = point.run.options
    mode = options.bias_correction
    return {
        "Bias Correction": mode or "", "Bias Correction Batch Size": options.bias_batch_size if mode else "",
        "Skip Layers": options.skip_layers or "", "Bits Map": format_bits_map(options.bits_map),
        "Source Model": display_path(options.saved_model) if options.saved_model else "",
    }


def model_prefix(point) -> str:
    """The start of a saved ad hoc model's file name: 'adhoc' and the options that made it, e.g.
    'adhoc_bias-all' or 'adhoc_skip-first_bits-0=8,-1=8' (characters a file name should not hold become -)."""
    options = point.run.options
    parts = ["adhoc"]
    if options.bias_correction:
        parts.append(f"bias-{options.bias_correction}")
    if options.skip_layers:
        parts.append(f"skip-{options.skip_layers}")
    if options.bits_map:
        parts.append("bits-" + ",".join(f"{key}={bits}" for key, bits in options.bits_map.items()))
    if options.saved_model:
        parts.append("saved")
    return "_".join(re.sub(r"[^A-Za-z0-9.,=+-]", "-", part) for part in parts)


def validate_model(point, facts) -> None:
    """Checks that need the model's layers and the data's size, run before any point starts."""
    options = point.run.options
    bits_per_layer(facts.layer_names, options.bits_map, point.config.bits)  # every entry matches a layer
    last = facts.layer_names[-1]
    if (options.bias_correction in ("last", "last_float")
            and last not in correctable_layers(facts.model, [last], facts.example)):
        raise bad_hyperparameter(f"bias_correction {options.bias_correction!r} corrects the last layer's bias, and "
                                 f"the last layer, {last}, is not a Linear or convolution module (use 'all', which "
                                 f"corrects the layers that are)")
    if options.bias_correction and options.bias_batch_size > facts.calibration_size:
        raise bad_hyperparameter(f"bias_batch_size {options.bias_batch_size} is larger than the "
                                 f"calibration set ({facts.calibration_size} images)")


def format_bits_map(bits_map) -> str:
    """A bits map as the log shows it: 'key=bits' pairs, e.g. '0=8 -1=8' or 'stages.2.*=4'."""
    return " ".join(f"{key}={bits}" for key, bits in (bits_map or {}).items())


ADHOC = Variant(name="adhoc", file_prefix=model_prefix, quantize=quantize, logs=LOGS, log_names=log_names, header_keys=HEADER_KEYS,
                grid_keys=GRID_KEYS, columns=variant_columns, result_columns=frozenset({"Average Bits"}),
                resolve_point=resolve_point, options=parse_options, validate_model=validate_model)
