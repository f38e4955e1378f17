"""Quantize a whole network layer by layer (the paper's procedure).

For each Conv2d/Linear layer in execution order: draw a fresh batch of m calibration
images, capture the layer's input in the float ("analog") network (X) and in the
network whose earlier layers are already quantized (X̃), turn both into rows
(conv patches, subsampled with the same indices), and replace the layer's weight
by its quantization. BatchNorm, pooling and activations stay float.
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

METHODS = ("gpfq", "msq")


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
    levels: int
    radius: float
    relative_error: float
    seconds: float


def settings_for(layer: nn.Module, bits: int, method: str, alphabet: str, include_zero: bool,
                 mlp_scalar: float, cnn_scalar: float, mlp_percentile: float, cnn_percentile: float) -> LayerSettings:
    """Conv layers take the CNN scalar and percentile, Linear layers the MLP ones."""
    conv = isinstance(layer, nn.Conv2d)
    return LayerSettings(method=method, bits=bits, alphabet=alphabet, include_zero=include_zero,
                         scalar=cnn_scalar if conv else mlp_scalar,
                         percentile=cnn_percentile if conv else mlp_percentile)


def collect_rows(analog_model, quantized_model, name, chunks, retain_rate, generator, patch_stride, device):
    """X and X̃ rows (rows, G·N0) of layer `name` over the image chunks of one calibration batch."""
    layer = analog_model.get_submodule(name)
    analog_rows, quantized_rows = [], []
    for images in chunks:
        images = images.to(device)
        analog = capture_input(analog_model, name, images)
        quantized = capture_input(quantized_model, name, images)
        x, xq = layer_rows(layer, analog, quantized, retain_rate, generator, patch_stride)
        analog_rows.append(x)
        quantized_rows.append(xq)
    return torch.cat(analog_rows), torch.cat(quantized_rows)


def quantize_layer(layer: nn.Module, analog_rows, quantized_rows, settings: LayerSettings):
    """Quantized weight (layer.weight's shape), relative error, alphabet size and radius."""
    weight = flat_weight(layer)
    radius = layer_radius(weight, settings.percentile)
    alphabet = make_alphabet(settings.alphabet, settings.bits, settings.scalar, radius, settings.include_zero)
    weight_g, analog_g = grouped(layer, weight, analog_rows)
    _, quantized_g = grouped(layer, weight, quantized_rows)
    if settings.method == "gpfq":
        quantized_weight = gpfq_columns(weight_g, analog_g, quantized_g, alphabet)
    elif settings.method == "msq":
        quantized_weight = msq(weight_g, alphabet)
    else:
        raise ValueError(f"unknown method {settings.method!r}; choose one of {METHODS}")
    error = relative_error(weight_g, quantized_weight, analog_g, quantized_g)
    return quantized_weight.reshape(layer.weight.shape), error, alphabet.numel(), radius


def quantize_network(analog_model: nn.Module, stream, settings_of, batch_size: int, retain_rate: float,
                     seed: int, ignore_layers=(), patch_stride: str = "kernel", device="cpu", log=print):
    """Quantize a copy of `analog_model`; returns (quantized model, [LayerReport]).

    stream: a CalibrationStream; each layer draws `batch_size` fresh images from it.
    settings_of(layer) -> LayerSettings. ignore_layers: indices (execution order) left float.
    """
    analog_model = analog_model.eval().to(device)
    quantized_model = copy.deepcopy(analog_model)
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
        if index in ignored:
            log(f"[{index + 1}/{len(names)}] {name}: left float (ignore_layers)")
            continue
        start = time.time()
        chunks = stream.draw(batch_size)
        analog_rows, quantized_rows = collect_rows(analog_model, quantized_model, name, chunks, retain_rate,
                                                   generator, patch_stride, device)
        quantized_weight, error, levels, radius = quantize_layer(layer, analog_rows, quantized_rows,
                                                                 settings_of(layer))
        with torch.no_grad():
            quantized_model.get_submodule(name).weight.copy_(quantized_weight)
        report = LayerReport(index, name, type(layer).__name__, tuple(layer.weight.shape), analog_rows.shape[0],
                             levels, radius, error, time.time() - start)
        reports.append(report)
        log(f"[{index + 1}/{len(names)}] {name} {report.kind} W{report.weight_shape} X({report.rows}, "
            f"{analog_rows.shape[1]}) {levels} levels: rel. error {error:.4f}, {report.seconds:.1f}s")
    return quantized_model, reports


def reports_as_dicts(reports) -> list:
    return [asdict(r) for r in reports]
