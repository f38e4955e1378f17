"""Quantize a whole network layer by layer (the paper's procedure).

For each layer (a weight the model multiplies with an activation: Linear, Conv1d/2d/3d, matmul,
attention projections; `discovery.find_layers`) in order of first use: draw m calibration images,
capture what the weight is multiplied with in the float ("analog") network (X) and in the network
whose earlier layers are already quantized (X̃), turn both into rows (conv patches, subsampled with
the same indices) or Gram sums (`calibrator.Calibrator`: fresh, fixed or sharded inputs), call the
method's rule on them, and replace the weight by its quantization. BatchNorm, pooling, activations and
every other parameter stay float (`coverage.Coverage`). Each layer is reported (`reports`) and handed
to the hooks (`hooks.Hooks`: log, after_layer, checkpoint).

Extension points used by the variants:
- `layer_config(index, name, n_layers)` gives each layer's QuantConfig (`QuantConfig.for_layer`: method, bits,
  alphabet, the layer's seed), or None to leave the layer float (skip lists, mixed precision);
- `gpfq.methods.METHODS` maps a method name to its `Method` object (gpfq, msq, gptq, spfq, sparse_gpfq, qronos):
  the layer rule on rows and on Gram sums, what it needs, its form; this module never checks a method's name;
- `Hooks.after_layer(step)` runs after each quantized layer (bias correction, retraining);
- `in_place=True` quantizes `analog_model` itself, so X̃ = X (the retraining variant).
"""
import copy
import time
from dataclasses import replace

from torch import nn
from tqdm import tqdm

from gpfq.methods import method_of
from gpfq.methods.alphabet import channel_alphabets, make_alphabet, row_radii
from gpfq.pipeline.calibrator import Calibration, Calibrator, LayerRows, sharded
from gpfq.pipeline.capture import check_finite, is_conv
from gpfq.pipeline.checkpoint import summary as checkpoint_summary
from gpfq.pipeline.coverage import Coverage
from gpfq.pipeline.discovery import find_layers
from gpfq.pipeline.hooks import Hooks, LayerStep, LoopState
from gpfq.pipeline.inputs import as_inputs, floating_dtype, move
from gpfq.pipeline.reports import (LayerReport, LayerReports, LayerResult, check_coverage, check_layer_indices,
                                   log_line, report_layer)
from gpfq.pipeline.rows import flat_weight, grouped, owner_module, write_weight

__all__ = ["Calibration", "Hooks", "LayerReport", "LayerReports", "LayerStep", "layer_alphabet", "layer_problem",
           "quantize_layer", "quantize_network", "rule_inputs"]


def layer_alphabet(layer: nn.Module, config):
    """(alphabet, radius) of a layer under its QuantConfig (conv layers take the cnn_* scalar and percentile,
    the others the mlp_* ones): alphabet (L,) with granularity 'layer' (radius = mean of the rows' radii),
    (G, N1, L) with 'channel' (radius reported as that mean too)."""
    conv = is_conv(layer)
    scalar = config.cnn_scalar if conv else config.mlp_scalar
    radii = row_radii(flat_weight(layer), config.cnn_percentile if conv else config.mlp_percentile)
    radius = float(radii.mean())
    if config.alphabet_granularity == "layer":
        return make_alphabet(config.alphabet, config.bits, scalar, radius, config.include_0), radius
    if config.alphabet_granularity == "channel":
        per_channel = channel_alphabets(config.alphabet, config.bits, scalar, radii, config.include_0)
        return grouped(layer, per_channel), radius
    raise ValueError(f"unknown alphabet granularity {config.alphabet_granularity!r}; choose 'layer' or 'channel'")


def layer_problem(layer: nn.Module, analog_rows, quantized_rows, config):
    """What a layer rule takes from rows (m, G·N0): weight (G, N1, N0), analog and quantized rows (G, m, N0),
    alphabet, radius."""
    alphabet, radius = layer_alphabet(layer, config)
    weight_g, analog_g = grouped(layer, flat_weight(layer), analog_rows)
    _, quantized_g = grouped(layer, flat_weight(layer), quantized_rows)
    return weight_g, analog_g, quantized_g, alphabet, radius


def quantize_layer(layer: nn.Module, analog_rows, quantized_rows, config):
    """Quantize one layer from its rows (m, G·N0) (`gpfq.quantize_layer`; the network loop calls the rule itself).

    Returns weight (G, N1, N0), Q (G, N1, N0), analog and quantized rows (G, m, N0), alphabet, radius.
    """
    weight_g, analog_g, quantized_g, alphabet, radius = layer_problem(layer, analog_rows, quantized_rows, config)
    quantized_weight = method_of(config.method).from_rows(weight_g, analog_g, quantized_g, alphabet, config)
    return weight_g, quantized_weight, analog_g, quantized_g, alphabet, radius


def rule_inputs(layer: nn.Module, rows: LayerRows, config):
    """What the layer's rule takes, from its rows or its Gram sums (`calibrator.LayerRows`): weight (G, N1, N0),
    analog and quantized rows (G, m, N0) (None when streamed), alphabet, radius."""
    if rows.statistics is None:
        return layer_problem(layer, rows.analog, rows.quantized, config)
    alphabet, radius = layer_alphabet(layer, config)
    weight = grouped(layer, flat_weight(layer))
    analog_g = quantized_g = None
    if rows.analog is not None:  # kept for after_layer
        analog_g = grouped(layer, flat_weight(layer), rows.analog)[1]
        quantized_g = grouped(layer, flat_weight(layer), rows.quantized)[1]
    return weight, analog_g, quantized_g, alphabet, radius


def quantize_network(analog_model: nn.Module, stream, layer_config, calibration: Calibration, hooks: Hooks = Hooks(),
                     ignore_layers=(), in_place: bool = False, strict_coverage: bool = False):
    """Quantize a copy of `analog_model` (or the model itself, `in_place`); returns (model, [LayerReport]).

    The layer loop behind `gpfq.quantize`, public as the seam for what `quantize` does not expose: a stream
    of one's own (its chunk_size), a function giving each layer's config, keep_rows, rows_budget, shard.
    `gpfq.quantize` calls it as `network.quantize_network`, so replacing that attribute (a test's
    monkeypatch) intercepts every quantization.

    stream: a CalibrationStream. calibration: a `Calibration` (m images per layer, fresh or fixed, patches, rows
    kept or streamed, device, shard). hooks: `Hooks` (log, after_layer, checkpoint, prepare_quantized).
    layer_config(index, name, n_layers) -> the layer's QuantConfig (`QuantConfig.for_layer`), or None to leave that
    layer float. ignore_layers: indices (execution order, negative counts from the end) left float.
    Coverage (`coverage.Coverage`) is logged, and returned as `reports.coverage`; more than 5 % of the
    matmul parameters that cannot be quantized gives a warning, or with strict_coverage a ValueError.
    """
    log, device = hooks.log, calibration.device
    keep_rows = hooks.after_layer is not None if calibration.keep_rows is None else calibration.keep_rows
    shard, stream = sharded(calibration, stream)
    analog_model = analog_model.eval().to(device)
    quantized_model = analog_model if in_place else copy.deepcopy(analog_model)
    if hooks.prepare_quantized is not None:
        hooks.prepare_quantized(quantized_model)
    example = move(as_inputs(stream.dataset[0][0]).unsqueeze(0), device, floating_dtype(analog_model))
    discovery = find_layers(analog_model, example)
    layers = discovery.layers
    names = [layer.name for layer in layers]
    check_layer_indices("ignore_layers", ignore_layers, names)
    ignored = {i % len(names) for i in ignore_layers}
    check_coverage(Coverage.of(discovery), strict_coverage, log)
    calibrator = Calibrator(calibration, stream, (analog_model, None if in_place else quantized_model), keep_rows,
                            shard)
    if calibration.mode == "fixed":
        calibrator.fix(example, layers)
    calibrator.start()
    reports = LayerReports()
    checkpoint = hooks.checkpoint
    if checkpoint is not None and (in_place or hooks.after_layer is not None or shard.active):
        log("checkpoint: off (in_place, after_layer or several ranks keep state outside the layer loop)")
        checkpoint = None
    state = LoopState(names, quantized_model, calibrator.generator, stream, reports)
    start_index = state.resume(checkpoint, log)
    loop_start = time.perf_counter()
    for index, layer in enumerate(tqdm(layers, desc="layers", disable=not shard.writer)):  # one bar: rank 0's
        if index < start_index:
            continue
        config = None if index in ignored else layer_config(index, layer.name, len(names))
        if config is None:
            log(f"[{index + 1}/{len(names)}] {layer.name}: left float")
            continue
        method, label, started = method_of(config.method), f"layer {index + 1} ({layer.name})", time.time()
        check_finite(layer.weight, f"the weight of layer {layer.name}")
        rows = calibrator.rows(layer, config, label)
        weight, analog_g, quantized_g, alphabet, radius = rule_inputs(layer, rows, config)
        rule_start = time.perf_counter()
        if rows.statistics is None:
            rule_config = replace(config, engine=rows.form) if method.gpfq_family else config  # the form, chosen once
            quantized_weight = method.from_rows(weight, analog_g, quantized_g, alphabet, rule_config)
            quantized_weight = shard.agree_on(quantized_weight, f"{label}: broadcast Q")
        elif shard.active:  # Q on rank 0, broadcast (or on every rank)
            quantized_weight = shard.run_rule(
                lambda: method.from_statistics(weight, rows.statistics, alphabet, config), weight, label)
        else:  # the rule called here: the default path is five frames (docs/design.md)
            quantized_weight = method.from_statistics(weight, rows.statistics, alphabet, config)
        result = LayerResult(weight, quantized_weight, analog_g, quantized_g, alphabet, radius,
                             time.perf_counter() - rule_start)
        write_weight(quantized_model, layer, quantized_weight)
        report, width = report_layer(index, layer, config, rows, result, quantized_model, started)
        reports.append(report)
        log(log_line(report, config, len(names), width))
        if hooks.after_layer is not None:
            hooks.after_layer(LayerStep(report, owner_module(analog_model, layer), owner_module(quantized_model, layer),
                                        analog_model, quantized_model, analog_g, quantized_g, weight, quantized_weight,
                                        rows.statistics))
        if checkpoint is not None:
            state.save(checkpoint, index)
    if checkpoint is not None and checkpoint.written:
        log(checkpoint_summary(checkpoint, time.perf_counter() - loop_start))
    reports.coverage = Coverage.of(discovery, [layer.parameter for layer in layers
                                               if layer.name in {r.name for r in reports}])
    log(reports.coverage.summary())
    return quantized_model, reports
