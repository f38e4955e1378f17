"""Quantize a whole network layer by layer (the paper's procedure).

For each Conv2d/Linear layer in execution order: draw a fresh batch of m calibration
images, capture the layer's input in the float ("analog") network (X) and in the
network whose earlier layers are already quantized (X̃), turn both into rows
(conv patches, subsampled with the same indices), and replace the layer's weight
by its quantization. BatchNorm, pooling and activations stay float.

Extension points used by the variants:
- `settings_of(index, name, layer)` chooses each layer's method, bits and alphabet,
  or returns None to leave the layer float (skip lists, mixed precision);
- `LAYER_METHODS` maps a method name to its layer rule;
- `after_layer(step)` runs after each quantized layer (bias correction, retraining);
- `in_place=True` quantizes `analog_model` itself, so X̃ = X (the retraining variant).
"""
import copy
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from .alphabet import layer_radius, make_alphabet
from .capture import capture_input, flat_weight, grouped, layer_rows, layers_in_execution_order
from .quantizer import gpfq_columns, msq, relative_error


@dataclass
class LayerSettings:
    """How one layer is quantized."""
    method: str = "gpfq"
    bits: int = 4
    scalar: float = 1.0
    percentile: float = 1.0
    alphabet: str = "gpfq2022"
    include_zero: bool = True


@dataclass
class LayerReport:
    index: int
    name: str
    kind: str
    weight_shape: tuple
    rows: int
    bits: int
    levels: int
    radius: float
    relative_error: float
    seconds: float


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


# name -> rule(weight (G,N1,N0), analog_rows (G,m,N0), quantized_rows (G,m,N0), alphabet, settings) -> Q
LAYER_METHODS = {"gpfq": _gpfq, "msq": _msq}
METHODS = tuple(LAYER_METHODS)


def settings_for(layer: nn.Module, bits: int, method: str, alphabet: str, include_zero: bool,
                 mlp_scalar: float, cnn_scalar: float, mlp_percentile: float, cnn_percentile: float) -> LayerSettings:
    """Conv layers take the CNN scalar and percentile, Linear layers the MLP ones."""
    conv = isinstance(layer, nn.Conv2d)
    return LayerSettings(method=method, bits=bits, alphabet=alphabet, include_zero=include_zero,
                         scalar=cnn_scalar if conv else mlp_scalar,
                         percentile=cnn_percentile if conv else mlp_percentile)


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


def layer_alphabet(layer: nn.Module, settings: LayerSettings) -> torch.Tensor:
    weight = flat_weight(layer)
    radius = layer_radius(weight, settings.percentile)
    return make_alphabet(settings.alphabet, settings.bits, settings.scalar, radius, settings.include_zero), radius


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
    bad = [i for i in ignore_layers if not -len(names) <= i < len(names)]
    if bad:
        raise ValueError(f"ignore_layers {bad} match no layer: the model has {len(names)} (0 … {len(names) - 1})")
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
        weight, quantized_weight, analog_g, quantized_g, alphabet, radius = quantize_layer(
            layer, analog_rows, quantized_rows, settings)
        error = relative_error(weight, quantized_weight, analog_g, quantized_g)
        quantized_layer = quantized_model.get_submodule(name)
        with torch.no_grad():
            quantized_layer.weight.copy_(quantized_weight.reshape(layer.weight.shape))
        report = LayerReport(index, name, type(layer).__name__, tuple(layer.weight.shape), analog_rows.shape[0],
                             settings.bits, alphabet.numel(), radius, error, time.time() - start)
        reports.append(report)
        log(f"[{index + 1}/{len(names)}] {name} {report.kind} W{report.weight_shape} X({report.rows}, "
            f"{analog_rows.shape[1]}) {settings.method} {settings.bits} bits, {report.levels} levels: "
            f"rel. error {error:.4f}, {report.seconds:.1f}s")
        if after_layer is not None:
            after_layer(LayerStep(report, layer, quantized_layer, analog_model, quantized_model, analog_g,
                                  quantized_g, weight, quantized_weight))
    return quantized_model, reports


def reports_as_dicts(reports) -> list:
    return [asdict(r) for r in reports]
