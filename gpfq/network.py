"""Quantize a whole network layer by layer (the paper's procedure).

For each Conv2d/Linear layer in execution order: draw a fresh batch of m calibration
images, capture the layer's input in the float ("analog") network (X) and in the
network whose earlier layers are already quantized (X̃), turn both into rows
(conv patches, subsampled with the same indices), and replace the layer's weight
by its quantization. BatchNorm, pooling and activations stay float.

Extension points used by the variants:
- `settings_of(index, name, layer)` chooses each layer's method, bits and alphabet,
  or returns None to leave the layer float (skip lists, mixed precision);
- `LAYER_METHODS` maps a method name to its layer rule (gpfq, msq, gptq, spfq, sparse_gpfq);
- `after_layer(step)` runs after each quantized layer (bias correction, retraining);
- `in_place=True` quantizes `analog_model` itself, so X̃ = X (the retraining variant).
"""
import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from .alphabet import channel_alphabets, make_alphabet, row_radii
from .capture import capture_input, check_finite, flat_weight, grouped, layer_rows, layers_in_execution_order
from .gptq import gptq
from .quantizer import gpfq_columns, msq, relative_error
from .variants import sparse_gpfq, spfq


@dataclass
class LayerSettings:
    """How one layer is quantized."""
    method: str = "gpfq"
    bits: int = 4
    scalar: float = 1.0
    percentile: float = 1.0
    alphabet: str = "gpfq2022"
    include_zero: bool = True
    granularity: str = "layer"  # one alphabet radius per "layer" or per output "channel"
    seed: int = 0  # spfq: seeds this layer's stochastic rounding
    threshold: float = 0.0  # sparse_gpfq: λ, relative to the alphabet's largest level
    thresholding: str = "soft"  # sparse_gpfq: "soft" (L1) or "hard" (L0)
    block_size: int = 128  # gptq: columns per lazy-batch block
    damping: float = 0.01  # gptq: H += damping · mean(diag H) · I
    act_order: bool = False  # gptq: columns in order of decreasing H_tt


@dataclass
class LayerReport:
    index: int
    name: str
    kind: str
    weight_shape: tuple
    rows: int
    bits: int
    levels: int
    radius: float  # the layer's radius; with per-channel alphabets, the mean of the channels' radii
    relative_error: float
    seconds: float
    zero_weights: int = 0  # quantized weights equal to 0 (sparsity)


@dataclass
class LayerStep:
    """What `after_layer` sees once a layer is quantized. Rows and weights are per group (G, …)."""
    report: LayerReport
    analog_layer: nn.Module
    quantized_layer: nn.Module
    analog_model: nn.Module
    quantized_model: nn.Module
    analog_rows: torch.Tensor  # (G, m, N0)
    quantized_rows: torch.Tensor  # (G, m, N0)
    weight: torch.Tensor  # (G, N1, N0), float
    quantized_weight: torch.Tensor  # (G, N1, N0)


def _gpfq(weight, analog, quantized, alphabet, settings):
    return gpfq_columns(weight, analog, quantized, alphabet)


def _msq(weight, analog, quantized, alphabet, settings):
    return msq(weight, alphabet)


def _gptq(weight, analog, quantized, alphabet, settings):
    return gptq(weight, quantized, alphabet, settings.block_size, settings.damping, settings.act_order)


def _spfq(weight, analog, quantized, alphabet, settings):
    return spfq(weight, analog, quantized, alphabet, settings.seed)


def _sparse_gpfq(weight, analog, quantized, alphabet, settings):
    return sparse_gpfq(weight, analog, quantized, alphabet, settings.threshold, settings.thresholding)


# name -> rule(weight (G,N1,N0), analog_rows (G,m,N0), quantized_rows (G,m,N0), alphabet, settings) -> Q
# alphabet: (L,) for one radius per layer, (G, N1, L) per output channel.
LAYER_METHODS = {"gpfq": _gpfq, "msq": _msq, "gptq": _gptq, "spfq": _spfq, "sparse_gpfq": _sparse_gpfq}
METHODS = tuple(LAYER_METHODS)


def settings_for(layer: nn.Module, bits: int, method: str, alphabet: str, include_zero: bool,
                 mlp_scalar: float, cnn_scalar: float, mlp_percentile: float, cnn_percentile: float,
                 **options) -> LayerSettings:
    """Conv layers take the CNN scalar and percentile, Linear layers the MLP ones.

    options: the other LayerSettings fields (granularity, seed, threshold, …).
    """
    conv = isinstance(layer, nn.Conv2d)
    return LayerSettings(method=method, bits=bits, alphabet=alphabet, include_zero=include_zero,
                         scalar=cnn_scalar if conv else mlp_scalar,
                         percentile=cnn_percentile if conv else mlp_percentile, **options)


def collect_rows(analog_model, quantized_model, name, chunks, retain_rate, generator, patch_stride, device):
    """X and X̃ rows (rows, G·N0) of layer `name` over the image chunks of one calibration batch.

    With quantized_model None (in-place quantization), X̃ = X.
    """
    layer = analog_model.get_submodule(name)
    analog_rows, quantized_rows = [], []
    for images in chunks:
        images = images.to(device)
        analog = capture_input(analog_model, name, images)
        quantized = analog if quantized_model is None else capture_input(quantized_model, name, images)
        x, xq = layer_rows(layer, analog, quantized, retain_rate, generator, patch_stride)
        analog_rows.append(x)
        quantized_rows.append(xq)
    return torch.cat(analog_rows), torch.cat(quantized_rows)


def layer_alphabet(layer: nn.Module, settings: LayerSettings):
    """(alphabet, radius): alphabet (L,) with granularity 'layer' (radius = mean of the rows' radii),
    (G, N1, L) with 'channel' (radius reported as that mean too)."""
    radii = row_radii(flat_weight(layer), settings.percentile)
    radius = float(radii.mean())
    if settings.granularity == "layer":
        return make_alphabet(settings.alphabet, settings.bits, settings.scalar, radius, settings.include_zero), radius
    if settings.granularity == "channel":
        per_channel = channel_alphabets(settings.alphabet, settings.bits, settings.scalar, radii, settings.include_zero)
        return grouped(layer, per_channel), radius
    raise ValueError(f"unknown alphabet granularity {settings.granularity!r}; choose 'layer' or 'channel'")


def quantize_layer(layer: nn.Module, analog_rows, quantized_rows, settings: LayerSettings):
    """Quantize one layer from its rows (m, G·N0).

    Returns weight (G, N1, N0), Q (G, N1, N0), analog and quantized rows (G, m, N0), alphabet, radius.
    """
    if settings.method not in LAYER_METHODS:
        raise ValueError(f"unknown method {settings.method!r}; choose one of {tuple(LAYER_METHODS)}")
    alphabet, radius = layer_alphabet(layer, settings)
    weight_g, analog_g = grouped(layer, flat_weight(layer), analog_rows)
    _, quantized_g = grouped(layer, flat_weight(layer), quantized_rows)
    quantized_weight = LAYER_METHODS[settings.method](weight_g, analog_g, quantized_g, alphabet, settings)
    return weight_g, quantized_weight, analog_g, quantized_g, alphabet, radius


def quantize_network(analog_model: nn.Module, stream, settings_of, batch_size: int, retain_rate: float,
                     seed: int, ignore_layers=(), patch_stride: str = "kernel", device="cpu", log=tqdm.write,
                     after_layer=None, in_place: bool = False):
    """Quantize a copy of `analog_model` (or the model itself, `in_place`); returns (model, [LayerReport]).

    stream: a CalibrationStream; each layer draws `batch_size` fresh images from it.
    settings_of(index, name, layer) -> LayerSettings, or None to leave that layer float.
    ignore_layers: indices (execution order, negative counts from the end) left float.
    """
    analog_model = analog_model.eval().to(device)
    quantized_model = analog_model if in_place else copy.deepcopy(analog_model)
    example = stream.dataset[0][0].unsqueeze(0).to(device)
    names = layers_in_execution_order(analog_model, example)
    check_layer_indices("ignore_layers", ignore_layers, names)
    ignored = {i % len(names) for i in ignore_layers}
    generator = torch.Generator().manual_seed(seed)
    reports = []
    for index, name in enumerate(tqdm(names, desc="layers")):
        layer = analog_model.get_submodule(name)
        settings = None if index in ignored else settings_of(index, name, layer)
        if settings is None:
            log(f"[{index + 1}/{len(names)}] {name}: left float")
            continue
        start = time.time()
        chunks = stream.draw(batch_size)
        analog_rows, quantized_rows = collect_rows(analog_model, None if in_place else quantized_model, name,
                                                   chunks, retain_rate, generator, patch_stride, device)
        check_finite(layer.weight, f"the weight of layer {name}")
        check_finite(analog_rows, f"the input of layer {name} in the float model")
        check_finite(quantized_rows, f"the input of layer {name} in the partially quantized model")
        weight, quantized_weight, analog_g, quantized_g, alphabet, radius = quantize_layer(
            layer, analog_rows, quantized_rows, settings)
        error = relative_error(weight, quantized_weight, analog_g, quantized_g)
        quantized_layer = quantized_model.get_submodule(name)
        with torch.no_grad():
            quantized_layer.weight.copy_(quantized_weight.reshape(layer.weight.shape))
        zeros = int((quantized_weight == 0).sum())
        report = LayerReport(index, name, type(layer).__name__, tuple(layer.weight.shape), analog_rows.shape[0],
                             settings.bits, alphabet.shape[-1], radius, error, time.time() - start, zeros)
        reports.append(report)
        log(f"[{index + 1}/{len(names)}] {name} {report.kind} W{report.weight_shape} X({report.rows}, "
            f"{analog_rows.shape[1]}) {settings.method} {settings.bits} bits, {report.levels} levels"
            f"{' per channel' if settings.granularity == 'channel' else ''}: rel. error {error:.4f}, "
            f"{zeros / quantized_weight.numel():.1%} zeros, {report.seconds:.1f}s")
        if after_layer is not None:
            after_layer(LayerStep(report, layer, quantized_layer, analog_model, quantized_model, analog_g,
                                  quantized_g, weight, quantized_weight))
    return quantized_model, reports


def check_layer_indices(key: str, indices, names: list) -> None:
    """ValueError if a layer index (execution order, negative from the end) of `key` matches no layer."""
    bad = [i for i in indices if not -len(names) <= i < len(names)]
    if bad:
        raise ValueError(f"bad hyperparameter: {key} {bad} match no layer; the model has {len(names)} "
                         f"(0 … {len(names) - 1}): {', '.join(f'{i}: {n}' for i, n in enumerate(names))}")


def reports_as_dicts(reports) -> list:
    return [asdict(r) for r in reports]


def zero_fraction(reports) -> float:
    """Fraction of the quantized layers' weights that are 0."""
    total = sum(math.prod(r.weight_shape) for r in reports)
    return sum(r.zero_weights for r in reports) / total if total else 0.0
