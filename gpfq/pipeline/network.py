"""Quantize a whole network layer by layer (the paper's procedure).

For each layer (a weight the model multiplies with an activation: Linear, Conv1d/2d/3d, matmul,
attention projections; `capture.find_layers`) in order of first use: draw a fresh batch of m
calibration images, capture what the weight is multiplied with in the float ("analog") network (X)
and in the network whose earlier layers are already quantized (X̃), turn both into rows (conv
patches, subsampled with the same indices), and replace the weight by its quantization.
BatchNorm, pooling, activations and every other parameter stay float (`capture.Coverage`).

Calibration modes: 'fresh' (the paper) draws m new images for every layer and runs both
networks up to that layer, so forward cost grows with depth²; 'fixed' draws one set of m
images and runs it once through both networks, layer by layer (`capture.CachedForward`),
so forward cost is linear in depth.

Rows flow chunk by chunk. For GPFQ with the Gram form (`engine.choose_form`: the cheaper
form, or the one whose memory does not grow with m), the chunks are summed into
`engine.GramStatistics` (rows kept only for an `after_layer` that asks, `keep_rows`; the same sums give Q
either way), so a layer's peak memory is flat in m.

Extension points used by the variants:
- `layer_config(index, name, n_layers)` gives each layer's QuantConfig (`QuantConfig.for_layer`: method, bits,
  alphabet, the layer's seed), or None to leave the layer float (skip lists, mixed precision);
- `gpfq.methods.METHODS` maps a method name to its `Method` object (gpfq, msq, gptq, spfq, sparse_gpfq, qronos):
  the layer rule on rows and on Gram sums, what it needs, its form; this module never checks a method's name;
- `after_layer(step)` runs after each quantized layer (bias correction, retraining);
- `in_place=True` quantizes `analog_model` itself, so X̃ = X (the retraining variant).
"""
import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from tqdm import tqdm

from gpfq.errors import bad_hyperparameter
from gpfq.methods import method_of
from gpfq.methods.alphabet import channel_alphabets, make_alphabet, row_radii
from gpfq.methods.codes import code_entropy, encode, layer_codebook, stored_bits
from gpfq.methods.gpfq.engine import DEFAULT_ROWS_BUDGET, GramStatistics
from gpfq.methods.gpfq.reference import relative_error
from gpfq.pipeline import distributed
from gpfq.pipeline.cached_forward import CachedForward, trace_graph
from gpfq.pipeline.capture import capture_uses, check_finite, is_conv
from gpfq.pipeline.coverage import Coverage
from gpfq.pipeline.discovery import find_layers
from gpfq.pipeline.rows import flat_weight, grouped, layer_rows, owner_module, write_weight
from gpfq.pipeline.checkpoint import reports_from_state, reports_state, summary as checkpoint_summary
from gpfq.pipeline.inputs import as_inputs, floating_dtype, move

CALIBRATIONS = ("fresh", "fixed")


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
    relative_error: float  # NaN when ‖XWᵀ‖ = 0 on the calibration rows (undefined)
    seconds: float
    zero_weights: int = 0  # quantized weights equal to 0 (sparsity)
    form: str = ""  # how the layer was computed: "residual", "gram", "columns" or the method's name
    streamed: bool = False  # rows summed into Gram statistics chunk by chunk, never held
    rule_seconds: float = 0.0  # of `seconds`, the time in the layer rule alone (no forward passes, no rows)
    stored_bits: int = 0  # ⌈log2 levels⌉: bits per weight of its packed integer code
    code_entropy: float = 0.0  # empirical entropy of the codes, bits per weight
    parameter: str = ""  # the weight's parameter name ('layer1.0.conv1.weight', '…in_proj_weight')
    input_major: bool = False  # the parameter is stored (N0, N1) and multiplied as x @ W (an output per column)
    # the layer's alphabet, (L,) or (G, N1, L) per channel: the codebook of the saved codes (not in the JSON record)
    alphabet: torch.Tensor = field(default=None, repr=False, compare=False)
    warnings: list = field(default_factory=list)  # signs of a degenerate result (`layer_warnings`)


# A layer is flagged when most of its weights quantize to 0 or its relative error is this large: with
# either, the network's output is mostly lost, whatever the other layers do.
ZERO_WARNING = 0.99
ERROR_WARNING = 0.5


def layer_warnings(rows: int, n_inputs: int, zeros: int, size: int, error: float, input_kind: str = None) -> list:
    """Warnings for a quantized layer: fewer calibration rows than weights per neuron (GPFQ's error bound
    needs m large compared with N0; with m < N0 the layer fits its few rows and nothing else), a float input
    that is zero or the same on every row (`input_degeneracy`), ≥ 99 % zeros, relative error ≥ 0.5."""
    warnings = []
    if input_kind == "zero":
        warnings.append(f"its float input is zero on all {rows} calibration rows (all-zero calibration data, or a "
                        f"layer before it whose output is zero?): the data do not constrain its weights")
    elif input_kind == "constant":
        warnings.append(f"its float input is the same on all {rows} calibration rows (constant calibration data?): "
                        f"the data constrain only one direction of each neuron's weights")
    if rows < n_inputs:
        warnings.append(f"{rows} calibration rows < {n_inputs} weights per neuron (GPFQ needs m ≫ N0: raise "
                        f"batch_size or retain_rate)")
    if size and zeros / size >= ZERO_WARNING:
        # with degenerate input the cause is the data, not the alphabet
        guess = "" if input_kind else " (alphabet too coarse for them?)"
        warnings.append(f"{zeros / size:.1%} of the weights quantized to 0{guess}")
    if error >= ERROR_WARNING:
        warnings.append(f"relative error {error:.4f} ≥ {ERROR_WARNING}")
    return warnings


# Rows whose total variance is below this fraction of their second moment count as all the same row
# (float sums of identical rows leave a residue of about 1e-12 of it).
CONSTANT_INPUT_TOLERANCE = 1e-9


def input_degeneracy(rows: int, column_sums: torch.Tensor, square_sum: float) -> str:
    """'zero' when every calibration row of X is 0, 'constant' when all rows are equal, else None.
    column_sums: Σ_i x_i (any shape); square_sum: ‖X‖²_F."""
    square_sum = float(square_sum)
    if square_sum == 0.0:
        return "zero"
    variance = square_sum - float(column_sums.double().pow(2).sum()) / rows  # Σ_i ‖x_i − mean‖²
    if rows > 1 and variance <= CONSTANT_INPUT_TOLERANCE * square_sum:
        return "constant"
    return None


def format_error(error: float) -> str:
    """A relative error for the log; NaN (‖XWᵀ‖ = 0) is undefined, not 0."""
    if math.isnan(error):
        return "undefined (the layer's float output is zero on the calibration data)"
    return f"{error:.4f}"


@dataclass
class LayerStep:
    """What `after_layer` sees once a layer is quantized. Rows and weights are per group (G, …).

    For the Gram form, `statistics` holds the rows' sums (X̃ᵀX, X̃ᵀX̃, column sums, row count); the
    rows themselves are None unless `quantize_network(keep_rows=True)` kept them.
    """
    report: LayerReport
    analog_layer: nn.Module
    quantized_layer: nn.Module
    analog_model: nn.Module
    quantized_model: nn.Module
    analog_rows: torch.Tensor  # (G, m, N0), or None when streamed
    quantized_rows: torch.Tensor  # (G, m, N0), or None when streamed
    weight: torch.Tensor  # (G, N1, N0), float
    quantized_weight: torch.Tensor  # (G, N1, N0)
    statistics: GramStatistics = None


def fresh_inputs(analog_model, quantized_model, layer, chunks, device):
    """Yield the inputs (X, X̃) of `layer` (capture.LayerInput) for each image chunk; quantized_model None: X̃ = X.
    Floating-point images are cast to the model's dtype (an fp16 model on fp32 data)."""
    dtype = floating_dtype(analog_model)
    for images in chunks:
        images = move(images, device, dtype)
        analog = capture_uses(analog_model, layer, images)
        quantized = analog if quantized_model is None else capture_uses(quantized_model, layer, images)
        yield analog, quantized


def checked_inputs(name, input_pairs):
    """Pass the (X input, X̃ input) chunks of layer `name` on; NonFiniteError naming the layer at a NaN or Inf."""
    for analog, quantized in input_pairs:
        for use in analog.uses:
            check_finite(use.input, f"the input of layer {name} in the float model")
        for use in quantized.uses:
            check_finite(use.input, f"the input of layer {name} in the partially quantized model")
        yield analog, quantized


def layer_form(config, rows: int, n_inputs: int, n_neurons: int, n_groups: int,
               rows_budget: float = DEFAULT_ROWS_BUDGET) -> str:
    """How a layer is computed under `config` (`Method.form`): 'residual', 'gram', 'columns' or the method's name."""
    return method_of(config.method).form(config, rows, n_inputs, n_neurons, n_groups, rows_budget)


def gather_layer(layer, config, input_pairs, n_images, retain_rate, generator, patch_stride, keep_rows,
                 rows_budget=DEFAULT_ROWS_BUDGET):
    """Turn a layer's input chunks into rows (m, G·N0) and, for the Gram form, into GramStatistics.

    input_pairs: (X input, X̃ input) per chunk of the `n_images` calibration images. The form is
    decided at the first chunk (every image gives the same number of rows). The Gram form always sums
    the chunks into GramStatistics, and keeps the rows only with `keep_rows`: the layer's Q then comes
    from the same sums, bit for bit, whether its rows are kept or not. Returns
    (analog_rows, quantized_rows, statistics, form): rows None when not kept, statistics None if not Gram.
    """
    flat = flat_weight(layer)
    weight = grouped(layer, flat)
    n_groups, n_neurons, n_inputs = weight.shape
    analog_parts, quantized_parts, statistics, form = [], [], None, None
    for analog, quantized in input_pairs:
        x, xq = layer_rows(layer, analog, quantized, retain_rate, generator, patch_stride)
        if form is None:
            rows = x.shape[0] // analog.images * n_images
            form = layer_form(config, rows, n_inputs, n_neurons, n_groups, rows_budget)
            if form == "gram" and method_of(config.method).from_statistics is not None:
                statistics = new_statistics(config, weight, x.device)
        if statistics is not None:
            statistics.add(grouped(layer, flat, x)[1], grouped(layer, flat, xq)[1])
        if statistics is None or keep_rows:
            analog_parts.append(x)
            quantized_parts.append(xq)
    if statistics is not None and not keep_rows:
        return None, None, statistics, form
    return torch.cat(analog_parts), torch.cat(quantized_parts), statistics, form


def new_statistics(config, weight: torch.Tensor, device) -> GramStatistics:
    """Empty Gram sums, in the method's `statistics_dtype`, for the rows of a layer with grouped weight (G, N1, N0)."""
    n_groups, _, n_inputs = weight.shape
    return GramStatistics(n_groups, n_inputs, weight=weight, device=device,
                          dtype=method_of(config.method).statistics_dtype)


def distributed_layer(shard, layer, config, input_pairs, n_images, retain_rate, generator, patch_stride,
                      keep_rows, label, rows_budget=DEFAULT_ROWS_BUDGET):
    """`gather_layer` across ranks: input_pairs hold this rank's share of the `n_images` images.

    The layer takes the form one process would (`layer_form` on all m images' rows): a streamed
    layer's sums are all-reduced; a layer computed from rows (the residual form, GPTQ from rows, the
    per-column loop, or `keep_rows`) gathers every rank's rows, in the single-process order. MSQ needs
    neither and streams, for its relative error.
    """
    flat = flat_weight(layer)
    n_groups, n_neurons, n_inputs = grouped(layer, flat).shape
    method = method_of(config.method)

    def streams(rows, weight, device):
        """Empty sums if the layer streams (the form one process would take), else None (its rows are gathered)."""
        summed = not keep_rows and method.from_statistics is not None and (
            not method.needs_rows or layer_form(config, rows, n_inputs, n_neurons, n_groups, rows_budget) == "gram")
        return new_statistics(config, weight, device) if summed else None

    analog_rows, quantized_rows, statistics = shard.gather_layer(
        layer, input_pairs, n_images, retain_rate, generator, patch_stride, streams, label)
    rows = statistics.rows if statistics is not None else analog_rows.shape[0]
    form = layer_form(config, rows, n_inputs, n_neurons, n_groups, rows_budget)
    return analog_rows, quantized_rows, statistics, form


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


def quantize_network(analog_model: nn.Module, stream, layer_config, batch_size: int, retain_rate: float,
                     seed: int, ignore_layers=(), patch_stride: str = "kernel", device="cpu", log=tqdm.write,
                     after_layer=None, in_place: bool = False, calibration: str = "fresh", keep_rows=None,
                     rows_budget: float = DEFAULT_ROWS_BUDGET, shard=None, strict_coverage: bool = False,
                     checkpoint=None, prepare_quantized=None):
    """Quantize a copy of `analog_model` (or the model itself, `in_place`); returns (model, [LayerReport]).

    The layer loop behind `gpfq.quantize`, public as the seam for what `quantize` does not expose: a stream
    of one's own (its chunk_size), a function giving each layer's config, keep_rows, rows_budget, shard.
    `gpfq.quantize` calls it as `network.quantize_network`, so replacing that attribute (a test's
    monkeypatch) intercepts every quantization.

    stream: a CalibrationStream. calibration 'fresh': each layer draws `batch_size` new images
    from it (the paper); 'fixed': one draw of `batch_size` images serves every layer.
    layer_config(index, name, n_layers) -> the layer's QuantConfig (`QuantConfig.for_layer`), or None to leave that
    layer float.
    ignore_layers: indices (execution order, negative counts from the end) left float.
    keep_rows: keep every layer's rows for `after_layer` instead of streaming (default: True
    exactly when after_layer is given). rows_budget: bytes of rows above which engine 'auto' streams.
    shard: a `distributed.Shard` (default: the initialized process group, if any): each rank draws its
    share of every layer's images and the layer's sums are all-reduced (`gpfq.pipeline.distributed`).
    Coverage (`capture.Coverage`) is logged, and returned as `reports.coverage`; more than 5 % of the
    matmul parameters that cannot be quantized gives a warning, or with strict_coverage a ValueError.
    checkpoint: a `checkpoint.LayerCheckpoint`: its state is saved after each quantized layer, and a
    matching saved state is continued from (not with in_place, after_layer or several ranks, whose state
    lives outside this loop).
    prepare_quantized(quantized_model): runs once on the copy before the first layer (with in_place, on the model
    itself): `gpfq.quantize` installs the activation quantizers there, so every X̃ is the fake-quantized input.
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    keep_rows = after_layer is not None if keep_rows is None else keep_rows
    shard = distributed.current() if shard is None else shard
    if shard.active:
        stream = shard.stream(stream)
        if batch_size < shard.world_size:
            raise bad_hyperparameter(f"batch_size (m) {batch_size} is smaller than the world size "
                                     f"{shard.world_size}; every rank needs at least one calibration image")
    analog_model = analog_model.eval().to(device)
    quantized_model = analog_model if in_place else copy.deepcopy(analog_model)
    if prepare_quantized is not None:
        prepare_quantized(quantized_model)
    dtype = floating_dtype(analog_model)
    example = move(as_inputs(stream.dataset[0][0]).unsqueeze(0), device, dtype)
    discovery = find_layers(analog_model, example)
    layers = discovery.layers
    names = [layer.name for layer in layers]
    check_layer_indices("ignore_layers", ignore_layers, names)
    ignored = {i % len(names) for i in ignore_layers}
    check_coverage(Coverage.of(discovery), strict_coverage, log)
    if calibration == "fixed":
        graph = trace_graph(analog_model, example, layers)  # fails here, before any work, if fx cannot run it
        fixed_chunks = [move(images, device, dtype) for images in stream.draw(batch_size)]
        analog_forward = CachedForward(analog_model, graph, fixed_chunks)
        quantized_forward = analog_forward if in_place else CachedForward(quantized_model, graph, fixed_chunks)
    generator = torch.Generator().manual_seed(seed)
    reports = LayerReports()
    if checkpoint is not None and (in_place or after_layer is not None or shard.active):
        log("checkpoint: off (in_place, after_layer or several ranks keep state outside the layer loop)")
        checkpoint = None
    start_index = _resume(checkpoint, names, quantized_model, generator, stream, reports, log)
    loop_start = time.perf_counter()
    for index, layer in enumerate(tqdm(layers, desc="layers", disable=not shard.writer)):  # one bar: rank 0's
        if index < start_index:
            continue
        name = layer.name
        config = None if index in ignored else layer_config(index, name, len(names))
        if config is None:
            log(f"[{index + 1}/{len(names)}] {name}: left float")
            continue
        method = method_of(config.method)
        start = time.time()
        if calibration == "fresh":
            input_pairs = fresh_inputs(analog_model, None if in_place else quantized_model, layer,
                                       stream.chunks(batch_size), device)  # one chunk of images held at a time
        else:
            analog_inputs = analog_forward.inputs_of(layer)
            quantized_inputs = analog_inputs if in_place else quantized_forward.inputs_of(layer)
            input_pairs = zip(analog_inputs, quantized_inputs)
        check_finite(layer.weight, f"the weight of layer {name}")
        input_pairs = checked_inputs(name, input_pairs)
        if shard.active:
            analog_rows, quantized_rows, statistics, form = distributed_layer(
                shard, layer, config, input_pairs, batch_size, retain_rate, generator, patch_stride, keep_rows,
                f"layer {index + 1} ({name})", rows_budget)
        else:
            analog_rows, quantized_rows, statistics, form = gather_layer(
                layer, config, input_pairs, batch_size, retain_rate, generator, patch_stride, keep_rows,
                rows_budget)
        if statistics is not None:
            alphabet, radius = layer_alphabet(layer, config)
            weight = grouped(layer, flat_weight(layer))
            rule_start = time.perf_counter()
            if shard.active:  # Q on rank 0, broadcast (or on every rank)
                quantized_weight = shard.run_rule(
                    lambda: method.from_statistics(weight, statistics, alphabet, config), weight,
                    f"layer {index + 1} ({name})")
            else:  # the rule called here: the default path is five frames (docs/design.md)
                quantized_weight = method.from_statistics(weight, statistics, alphabet, config)
            rule_seconds = time.perf_counter() - rule_start
            error = statistics.relative_error(weight, quantized_weight)
            analog_g = quantized_g = None
            if analog_rows is not None:  # kept for after_layer
                analog_g, quantized_g = grouped(layer, flat_weight(layer), analog_rows)[1], \
                    grouped(layer, flat_weight(layer), quantized_rows)[1]
            n_rows, width = statistics.rows, weight.shape[0] * weight.shape[2]
            input_kind = input_degeneracy(n_rows, statistics.analog_sum, statistics.analog_square_sum)
        else:
            weight, analog_g, quantized_g, alphabet, radius = layer_problem(layer, analog_rows, quantized_rows, config)
            rule_config = replace(config, engine=form) if method.gpfq_family else config  # the form, chosen once
            rule_start = time.perf_counter()
            quantized_weight = method.from_rows(weight, analog_g, quantized_g, alphabet, rule_config)
            quantized_weight = shard.agree_on(quantized_weight, f"layer {index + 1} ({name}): broadcast Q")
            rule_seconds = time.perf_counter() - rule_start
            error = relative_error(weight, quantized_weight, analog_g, quantized_g)
            n_rows, width = analog_rows.shape
            rows64 = analog_rows.double()
            input_kind = input_degeneracy(n_rows, rows64.sum(dim=0), rows64.pow(2).sum())
        write_weight(quantized_model, layer, quantized_weight)
        zeros = int((quantized_weight == 0).sum())
        stored = quantized_model.get_parameter(layer.parameter)
        stored = stored.t().contiguous() if layer.input_major else stored  # (N1, …): a row per output
        codes = encode(stored, layer_codebook(alphabet, stored), f"layer {name}")
        report = LayerReport(index, name, layer.kind, tuple(layer.weight.shape), n_rows, config.bits,
                             alphabet.shape[-1], radius, error, time.time() - start, zero_weights=zeros, form=form,
                             streamed=statistics is not None and analog_rows is None, rule_seconds=rule_seconds,
                             stored_bits=stored_bits(alphabet.shape[-1]),
                             code_entropy=code_entropy(codes, alphabet.shape[-1]), alphabet=alphabet.detach().cpu(),
                             parameter=layer.parameter, input_major=layer.input_major,
                             warnings=layer_warnings(n_rows, weight.shape[2], zeros, quantized_weight.numel(), error,
                                                     input_kind))
        reports.append(report)
        log(f"[{index + 1}/{len(names)}] {name} {report.kind} W{report.weight_shape} X({report.rows}, {width}) "
            f"{config.method} ({form}{', streamed' if report.streamed else ''}) {config.bits} bits, "
            f"{report.levels} levels{' per channel' if config.alphabet_granularity == 'channel' else ''} "
            f"({report.stored_bits} stored bits, entropy {report.code_entropy:.2f}): "
            f"rel. error {format_error(error)}, {zeros / quantized_weight.numel():.1%} zeros, {report.seconds:.1f}s"
            + "".join(f"; WARNING: {warning}" for warning in report.warnings))
        if after_layer is not None:
            after_layer(LayerStep(report, owner_module(analog_model, layer), owner_module(quantized_model, layer),
                                  analog_model, quantized_model, analog_g, quantized_g, weight, quantized_weight,
                                  statistics))
        if checkpoint is not None:
            checkpoint.after_layer(index, lambda: {
                "next_index": index + 1, "layers": names, "model": quantized_model.state_dict(),
                "generator": generator.get_state(), "stream": stream.state() if hasattr(stream, "state") else None,
                "reports": reports_state(reports)})
    if checkpoint is not None and checkpoint.written:
        log(checkpoint_summary(checkpoint, time.perf_counter() - loop_start))
    reports.coverage = Coverage.of(discovery, [layer.parameter for layer in layers
                                               if layer.name in {r.name for r in reports}])
    log(reports.coverage.summary())
    return quantized_model, reports


def _resume(checkpoint, names, quantized_model, generator, stream, reports, log) -> int:
    """Restore a matching checkpoint into the loop's state; the index of the layer to go on at (0: afresh)."""
    state = checkpoint.load(names) if checkpoint is not None else None
    if state is None:
        return 0
    if state["stream"] is not None:
        if not hasattr(stream, "restore"):
            log(f"checkpoint: ignoring {checkpoint.path} (this calibration stream cannot be restored)")
            return 0
        before = stream.state()
        try:
            stream.restore(state["stream"])
        except (ValueError, KeyError, RuntimeError) as error:
            stream.restore(before)
            log(f"checkpoint: ignoring {checkpoint.path} ({type(error).__name__}: {error}); starting the point afresh")
            return 0
    quantized_model.load_state_dict(state["model"])
    generator.set_state(state["generator"])
    reports.extend(reports_from_state(state["reports"], LayerReport))
    index = state["next_index"]
    log(f"checkpoint: layers 1-{index} of {len(names)} restored from {checkpoint.path}; continuing from layer "
        f"{index} ({names[index - 1]}) with layer {index + 1}")
    return index


class LayerReports(list):
    """[LayerReport] of the quantized layers, with the run's `coverage` (capture.Coverage)."""
    coverage: Coverage = None
    activations = None  # gpfq.pipeline.activations.ActivationQuantizers, set by gpfq.quantize with act_bits


def check_coverage(coverage: Coverage, strict: bool, log=tqdm.write) -> None:
    """Warn (or, strict, refuse with a ValueError) when more than 5 % of the matmul parameters cannot be quantized."""
    warning = coverage.warning()
    if warning is None:
        return
    if strict:
        raise bad_hyperparameter(f"strict_coverage: {warning}")
    warnings.warn(warning, stacklevel=3)
    log(f"warning: {warning}")


def check_layer_indices(key: str, indices, names: list) -> None:
    """ValueError if a layer index (execution order, negative from the end) of `key` matches no layer."""
    bad = [i for i in indices if not -len(names) <= i < len(names)]
    if bad:
        raise bad_hyperparameter(f"{key} {bad} match no layer; the model has {len(names)} "
                                 f"(0 … {len(names) - 1}): {', '.join(f'{i}: {n}' for i, n in enumerate(names))}")


def reports_as_dicts(reports) -> list:
    """The reports as JSON-ready dicts (without the alphabet tensors); an undefined (NaN) relative error is None
    (JSON null: NaN is not JSON)."""
    dicts = [{k: v for k, v in asdict(replace(r, alphabet=None)).items() if k != "alphabet"} for r in reports]
    for record in dicts:
        if isinstance(record["relative_error"], float) and math.isnan(record["relative_error"]):
            record["relative_error"] = None
    return dicts


def zero_fraction(reports) -> float:
    """Fraction of the quantized layers' weights that are 0."""
    total = sum(math.prod(r.weight_shape) for r in reports)
    return sum(r.zero_weights for r in reports) / total if total else 0.0
