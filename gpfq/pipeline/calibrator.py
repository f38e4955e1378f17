"""Each layer's calibration data: its inputs X and X̃ (fresh, fixed or sharded), turned into rows or Gram sums.

Calibration modes: 'fresh' (the paper) draws m new images for every layer and runs both networks up to that
layer, so forward cost grows with depth²; 'fixed' draws one set of m images and runs it once through both
networks, layer by layer (`cached_forward.CachedForward`), so forward cost is linear in depth. With several
processes (`distributed.Shard`), each rank draws its share of the images and the layer's sums are all-reduced,
or its rows gathered in the single-process order.

Rows flow chunk by chunk. For a Gram form (`Method.form`: the cheaper form, or the one whose memory does not
grow with m), the chunks are summed into `engine.GramStatistics` (rows kept only when asked, `keep_rows`; the
same sums give Q either way), so a layer's peak memory is flat in m.
"""
import math
from dataclasses import dataclass

import torch

from gpfq.errors import bad_hyperparameter
from gpfq.methods import method_of
from gpfq.methods.gpfq.engine import DEFAULT_ROWS_BUDGET, GramStatistics
from gpfq.pipeline import distributed
from gpfq.pipeline.cached_forward import CachedForward, trace_graph
from gpfq.pipeline.capture import capture_uses, check_finite
from gpfq.pipeline.inputs import floating_dtype, move
from gpfq.pipeline.rows import flat_weight, grouped, layer_rows, patch_grid, patch_indices

CALIBRATIONS = ("fresh", "fixed")


@dataclass(frozen=True)
class Calibration:
    """How each layer's rows are drawn: m = `batch_size` images (fresh per layer, or one fixed draw), patches kept
    at `retain_rate` with `patch_stride`, the patch generator seeded with `seed`.

    keep_rows: keep every layer's rows for an after_layer hook instead of streaming (None: exactly when there is
    one). rows_budget: bytes of rows above which engine 'auto' streams. shard: a `distributed.Shard` (None: the
    initialized process group, if any)."""
    batch_size: int
    retain_rate: float
    seed: int
    mode: str = "fresh"
    patch_stride: str = "kernel"
    keep_rows: bool = None
    rows_budget: float = DEFAULT_ROWS_BUDGET
    device: object = "cpu"
    shard: object = None


@dataclass
class LayerRows:
    """A layer's calibration data: rows X, X̃ (m, G·N0), None when streamed; Gram sums, None unless the form sums
    them; the form the layer is computed in ('residual', 'gram', 'columns' or the method's name)."""
    analog: torch.Tensor
    quantized: torch.Tensor
    statistics: GramStatistics
    form: str


def sharded(calibration: Calibration, stream):
    """(shard, stream): the run's shard and this rank's share of `stream` (the stream itself with one process)."""
    if calibration.mode not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration.mode!r}")
    shard = distributed.current() if calibration.shard is None else calibration.shard
    if shard.active:
        stream = shard.stream(stream)
        if calibration.batch_size < shard.world_size:
            raise bad_hyperparameter(f"batch_size (m) {calibration.batch_size} is smaller than the world size "
                                     f"{shard.world_size}; every rank needs at least one calibration image")
    return shard, stream


def layer_form(config, rows: int, n_inputs: int, n_neurons: int, n_groups: int,
               rows_budget: float = DEFAULT_ROWS_BUDGET) -> str:
    """How a layer is computed under `config` (`Method.form`): 'residual', 'gram', 'columns' or the method's name."""
    return method_of(config.method).form(config, rows, n_inputs, n_neurons, n_groups, rows_budget)


def new_statistics(config, weight: torch.Tensor, device) -> GramStatistics:
    """Empty Gram sums, in the method's `statistics_dtype`, for the rows of a layer with grouped weight (G, N1, N0)."""
    n_groups, _, n_inputs = weight.shape
    return GramStatistics(n_groups, n_inputs, weight=weight, device=device,
                          dtype=method_of(config.method).statistics_dtype)


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


def skip_patches(layer_input, n_images, retain_rate, generator, patch_stride) -> None:
    """Advance the patch generator over `n_images` images shaped like `layer_input` (a capture.LayerInput),
    as `layer_rows` would when turning them into rows (no-op where it draws nothing). A convolution
    weight used several times (shared) draws per use and chunk, so its patches may differ from one
    process's."""
    if n_images <= 0 or retain_rate == 1.0:
        return
    for use in layer_input.uses:
        if use.geometry is not None:
            grid = patch_grid(use.geometry, use.input.shape[2:], patch_stride)
            patch_indices(n_images, math.prod(grid), retain_rate, generator)


class Calibrator:
    """The inputs and rows of each layer in turn, for a float model and its partly quantized copy.

    models: (analog, quantized), quantized None when the model is quantized in place (X̃ = X). The patch
    generator (`generator`) is the loop's state a checkpoint saves.
    """

    def __init__(self, calibration: Calibration, stream, models, keep_rows: bool, shard):
        self.calibration, self.stream, self.keep_rows, self.shard = calibration, stream, keep_rows, shard
        self.analog_model, self.quantized_model = models
        self.forwards = None
        self.generator = None

    def fix(self, example, layers) -> None:
        """Fixed calibration: one draw of m images, run through both models layer by layer. Fails here, before
        any work, if torch.fx cannot run the model."""
        graph = trace_graph(self.analog_model, example, layers)
        dtype, device = floating_dtype(self.analog_model), self.calibration.device
        chunks = [move(images, device, dtype) for images in self.stream.draw(self.calibration.batch_size)]
        analog = CachedForward(self.analog_model, graph, chunks)
        quantized = analog if self.quantized_model is None else CachedForward(self.quantized_model, graph, chunks)
        self.forwards = analog, quantized

    def start(self) -> None:
        """The patch generator, seeded (after any fixed draw: the order a checkpoint restores)."""
        self.generator = torch.Generator().manual_seed(self.calibration.seed)

    def inputs(self, layer):
        """(X input, X̃ input) chunks of `layer`: fresh images (one chunk held at a time) or the fixed ones."""
        if self.forwards is None:
            pairs = fresh_inputs(self.analog_model, self.quantized_model, layer,
                                 self.stream.chunks(self.calibration.batch_size), self.calibration.device)
        else:
            analog_inputs = self.forwards[0].inputs_of(layer)
            quantized_inputs = analog_inputs if self.quantized_model is None else self.forwards[1].inputs_of(layer)
            pairs = zip(analog_inputs, quantized_inputs)
        return checked_inputs(layer.name, pairs)

    def rows(self, layer, config, label: str) -> LayerRows:
        """The layer's rows or Gram sums (across ranks with several processes), and its form."""
        if self.shard.active:
            return self.sharded_rows(layer, config, self.inputs(layer), label)
        return self.gather_rows(layer, config, self.inputs(layer))

    def gather_rows(self, layer, config, input_pairs) -> LayerRows:
        """Turn a layer's input chunks into rows (m, G·N0) and, for the Gram form, into GramStatistics.

        The form is decided at the first chunk (every image gives the same number of rows). The Gram form always
        sums the chunks into GramStatistics, and keeps the rows only with `keep_rows`: the layer's Q then comes
        from the same sums, bit for bit, whether its rows are kept or not.
        """
        c = self.calibration
        flat = flat_weight(layer)
        weight = grouped(layer, flat)
        n_groups, n_neurons, n_inputs = weight.shape
        analog_parts, quantized_parts, statistics, form = [], [], None, None
        for analog, quantized in input_pairs:
            x, xq = layer_rows(layer, analog, quantized, c.retain_rate, self.generator, c.patch_stride)
            if form is None:
                rows = x.shape[0] // analog.images * c.batch_size
                form = layer_form(config, rows, n_inputs, n_neurons, n_groups, c.rows_budget)
                if form == "gram" and method_of(config.method).from_statistics is not None:
                    statistics = new_statistics(config, weight, x.device)
            if statistics is not None:
                statistics.add(grouped(layer, flat, x)[1], grouped(layer, flat, xq)[1])
            if statistics is None or self.keep_rows:
                analog_parts.append(x)
                quantized_parts.append(xq)
        if statistics is not None and not self.keep_rows:
            return LayerRows(None, None, statistics, form)
        return LayerRows(torch.cat(analog_parts), torch.cat(quantized_parts), statistics, form)

    def sharded_rows(self, layer, config, input_pairs, label: str) -> LayerRows:
        """`gather_rows` across ranks: input_pairs hold this rank's share of the m images.

        The layer takes the form one process would (`layer_form` on all m images' rows): a streamed layer's sums
        are all-reduced; a layer computed from rows (the residual form, GPTQ from rows, the per-column loop, or
        `keep_rows`) gathers every rank's rows, in the single-process order. MSQ needs neither and streams, for its
        relative error. The patch generator advances over the other ranks' images, so every image gets the patch
        indices one process would give it.
        """
        c, shard, method = self.calibration, self.shard, method_of(config.method)
        flat = flat_weight(layer)
        weight = grouped(layer, flat)
        n_groups, n_neurons, n_inputs = weight.shape
        lo, hi = shard.span(c.batch_size)
        statistics, streamed = None, None
        analog_parts, quantized_parts, first = [], [], None
        with shard.step(f"{label}: forward passes and rows"):
            for analog, quantized in input_pairs:
                if first is None:
                    first = analog
                    skip_patches(first, lo, c.retain_rate, self.generator, c.patch_stride)
                x, xq = layer_rows(layer, analog, quantized, c.retain_rate, self.generator, c.patch_stride)
                if streamed is None:  # empty sums if the layer streams (the form one process would take)
                    rows = x.shape[0] // analog.images * c.batch_size
                    streamed = not self.keep_rows and method.from_statistics is not None and (
                        not method.needs_rows or
                        layer_form(config, rows, n_inputs, n_neurons, n_groups, c.rows_budget) == "gram")
                    statistics = new_statistics(config, weight, x.device) if streamed else None
                if streamed:
                    statistics.add(grouped(layer, flat, x)[1], grouped(layer, flat, xq)[1])
                else:
                    analog_parts.append(x)
                    quantized_parts.append(xq)
            if first is None:
                raise ValueError(f"rank {shard.rank} received no calibration images for {label}")
            skip_patches(first, c.batch_size - hi, c.retain_rate, self.generator, c.patch_stride)
        if streamed:
            statistics = shard.all_reduce_statistics(statistics, label)
            analog_rows = quantized_rows = None
            n_rows = statistics.rows
        else:
            analog_rows = shard.gather_rows(torch.cat(analog_parts), f"{label}: X")
            quantized_rows = shard.gather_rows(torch.cat(quantized_parts), f"{label}: X̃")
            n_rows = analog_rows.shape[0]
        form = layer_form(config, n_rows, n_inputs, n_neurons, n_groups, c.rows_budget)
        return LayerRows(analog_rows, quantized_rows, statistics, form)
