"""The public entry points: `quantize` a network, `quantize_layer` one weight matrix.

    import gpfq
    result = gpfq.quantize(model, images, gpfq.QuantConfig(bits=4, batch_size=256))
    result.model      # the quantized copy
    result.reports    # one gpfq.LayerReport per quantized layer (relative error, levels, zeros, time)
"""
import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from gpfq.pipeline.activations import ActivationQuantizers, calibrate
from gpfq.pipeline.coverage import Coverage
from gpfq.pipeline.discovery import find_layers, layers_in_execution_order
from gpfq.config import PER_LAYER_FIELDS, QuantConfig, layer_seed
from gpfq.pipeline.streams import CalibrationStream, ImageStream
from gpfq.errors import bad_hyperparameter
from gpfq.pipeline.folding import fold_batchnorm, foldable_pairs
from gpfq.pipeline.inputs import as_inputs, check_model_runs, dtypes, floating_dtype, move
from gpfq.pipeline.calibrator import Calibration
from gpfq.pipeline.hooks import Hooks
from gpfq.pipeline.reports import LayerReport
from gpfq.pipeline import network
from gpfq.pipeline.network import quantize_layer as _quantize_grouped_layer


@dataclass
class QuantizedResult:
    """What `quantize` returns: the quantized model and a report per quantized layer (execution order)."""
    model: nn.Module
    reports: list = field(default_factory=list)  # [LayerReport]
    config: QuantConfig = None
    coverage: Coverage = None  # which parameters were quantized and which stayed float, and why
    # with config.act_bits: the activation grids, installed on `model` as forward pre-hooks (gpfq.pipeline.activations)
    activations: ActivationQuantizers = None

    @property
    def relative_errors(self) -> dict:
        """{layer name: ‖XW − X̃Q‖_F / ‖XW‖_F on the calibration rows}."""
        return {report.name: report.relative_error for report in self.reports}


# ---------------------------------------------------------------- calibration data
class _FirstItem(torch.utils.data.Dataset):
    """A dataset of bare tensors seen as (x,) items, as CalibrationStream expects."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        return item if isinstance(item, (tuple, list)) else (item,)


class _DictItems(torch.utils.data.Dataset):
    """A dict of tensors {name: (N, …)} seen as N items ({name: tensor},): keyword inputs, model(**item)."""

    def __init__(self, tensors: dict):
        self.tensors = tensors
        self.length = as_inputs(tensors).shape[0]  # CalibrationInputError if the first dimensions differ

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return ({name: tensor[index] for name, tensor in self.tensors.items()},)


def _inputs_of(batch):
    """The inputs x of a batch that is x or (x, y, …): a tensor, or gpfq.pipeline.inputs.ModelInputs for a tuple or dict x."""
    return as_inputs(batch[0] if isinstance(batch, (tuple, list)) else batch)


def _loader_size(loader):
    """Images in one pass of a DataLoader, or None where it cannot tell without loading them (an IterableDataset,
    a batch_sampler of its own)."""
    if loader.batch_size is None or isinstance(loader.dataset, torch.utils.data.IterableDataset):
        return None
    try:
        images = len(loader.sampler)
    except TypeError:
        return None
    return images // loader.batch_size * loader.batch_size if loader.drop_last else images


def _loader_too_small(m: int, images: int):
    return bad_hyperparameter(f"batch_size {m} is larger than the calibration DataLoader ({images} images in one "
                              f"pass), so one draw would repeat images; give at least {m} images or lower batch_size")


class LoaderStream(ImageStream):
    """Calibration images taken in order from a user's DataLoader (cycled when it runs out).

    Each layer's `chunks(m)` continues where the previous one stopped, so with fresh calibration
    every layer sees new images for as long as the loader has them. A loader with fewer than m images in
    one pass is refused (one draw would repeat images): by `quantize` before any work when its length is
    known (`size`), else when the first pass runs out. Under torch.distributed every rank
    draws the same m and keeps its share, so the loader must yield the same images in the same order on
    every rank (no sampler that splits the data by rank).
    """

    def __init__(self, loader):
        super().__init__()
        self.loader = loader
        self._iterator = None
        first = next(iter(loader), None)
        if first is None:
            raise ValueError("the calibration DataLoader yields no batches")
        self.dataset = [(_inputs_of(first)[0],)]  # what `dataset[0][0]` (an example image) reads
        self.size = _loader_size(loader)  # images per pass, None if unknown
        self._m, self._taken = None, 0  # the draw size; images taken in the current pass

    def chunks(self, m: int):
        self._m = m
        yield from super().chunks(m)

    def _next_chunk(self):
        for attempt in range(2):
            if self._iterator is None:
                self._iterator, self._taken = iter(self.loader), 0
            try:
                chunk = _inputs_of(next(self._iterator))
                self._taken += chunk.shape[0]
                return chunk
            except StopIteration:
                self._iterator = None
                if self._m is not None and 0 < self._taken < self._m:  # a loader of unknown length, found short
                    raise _loader_too_small(self._m, self._taken)
        raise ValueError("the calibration DataLoader yields no batches")


def calibration_stream(calibration_data, seed: int, chunk_size: int = 256):
    """A stream of calibration images from a DataLoader, a Dataset or a tensor of inputs (N, …).

    A Dataset or tensor is drawn from in a seeded shuffle (`streams.CalibrationStream`); a DataLoader in its
    own order. A dict of tensors {name: (N, …)} gives keyword inputs (model(**x)); items and batches may hold
    a tuple or dict x (gpfq.pipeline.inputs). A stream (anything with `chunks` and `draw`) is used as it is.
    """
    if hasattr(calibration_data, "chunks") and hasattr(calibration_data, "draw"):
        return calibration_data
    if isinstance(calibration_data, torch.utils.data.DataLoader):
        return LoaderStream(calibration_data)
    if isinstance(calibration_data, torch.Tensor):
        if calibration_data.dim() < 2:
            raise ValueError(f"calibration_data: a tensor of inputs (N, …) needs a batch dimension, got shape "
                             f"{tuple(calibration_data.shape)}")
        calibration_data = torch.utils.data.TensorDataset(calibration_data)
    if isinstance(calibration_data, dict):
        calibration_data = _DictItems(calibration_data)
    if not hasattr(calibration_data, "__getitem__") or not hasattr(calibration_data, "__len__"):
        raise TypeError(f"calibration_data must be a DataLoader, a Dataset or a tensor of inputs, got "
                        f"{type(calibration_data).__name__}")
    if len(calibration_data) == 0:
        raise ValueError("calibration_data is empty")
    if not isinstance(calibration_data[0], (tuple, list)):
        calibration_data = _FirstItem(calibration_data)
    return CalibrationStream(calibration_data, seed, chunk_size=chunk_size)


def _dataset_size(stream):
    dataset = getattr(stream, "dataset", None)
    return None if isinstance(stream, LoaderStream) or dataset is None else len(dataset)


def _check_sizes(stream, m: int) -> None:
    """Refuse a batch_size (m) larger than the calibration set, before any work."""
    size = _dataset_size(stream)
    if size is not None and m > size:
        raise bad_hyperparameter(f"batch_size {m} is larger than the calibration set ({size} images)")
    if isinstance(stream, LoaderStream) and stream.size is not None and m > stream.size:
        raise _loader_too_small(m, stream.size)


def _state(model: nn.Module):
    """What quantize changes on the caller's model: every submodule's training flag, every tensor's device."""
    modes = [(module, module.training) for module in model.modules()]
    places = [(module, kind, name, tensor.device) for module in model.modules()
              for kind in ("_parameters", "_buffers") for name, tensor in getattr(module, kind).items()
              if tensor is not None]
    return modes, places


@torch.no_grad()
def _restore(state) -> None:
    modes, places = state
    for module, training in modes:
        module.training = training
    for module, kind, name, device in places:
        tensor = getattr(module, kind)[name]
        if tensor.device != device:
            if kind == "_parameters":  # the same Parameter object, as Module.to keeps it
                tensor.data = tensor.data.to(device)
            else:
                module._buffers[name] = tensor.to(device)


# ---------------------------------------------------------------- per-layer choices
def _check_layers(config: QuantConfig, layers, names: list) -> None:
    """Refuse, before any work, a `layers` argument that `QuantConfig.with_layers` cannot apply: not a dict
    {index or name pattern: None (float) | bits | {per-layer field: value}} or a list of indices or patterns, or
    an entry that matches no layer, or one that gives a bad value (checked as `config` with its changes)."""
    if isinstance(layers, (list, tuple, set)):
        _refuse_unmatched([key for key in layers if not any(_matches(key, name, names) for name in names)], names)
        return
    if not isinstance(layers, dict):
        raise TypeError(f"layers must be a dict {{index or name pattern: None, bits or {{field: value}}}} or a "
                        f"list of indices or name patterns, got {type(layers).__name__}")
    unmatched = []
    for key, value in layers.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise ValueError(f"layers keys are layer indices (int) or name patterns (str), got {key!r}")
        if value is not None and not isinstance(value, dict):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"layers[{key!r}] must be None (leave float), bits (int) or a dict of "
                                 f"QuantConfig fields, got {value!r}")
        if isinstance(value, dict):
            fixed = [name for name in value if name not in PER_LAYER_FIELDS]
            if fixed:
                raise ValueError(f"layers[{key!r}]: {fixed} cannot differ between layers; per-layer fields are "
                                 f"{PER_LAYER_FIELDS}")
        if not any(_matches(key, name, names) for name in names):
            unmatched.append(key)
    _refuse_unmatched(unmatched, names)
    for value in layers.values():
        if value is not None:
            config.replace(**(value if isinstance(value, dict) else {"bits": value}))


def _matches(key, name, names) -> bool:
    if isinstance(key, int) and not isinstance(key, bool):
        return -len(names) <= key < len(names) and names[key] == name
    return fnmatch.fnmatchcase(name, key)


def _refuse_unmatched(unmatched, names):
    if unmatched:
        raise ValueError(f"layers entries {unmatched} match no layer; the layers are "
                         f"{', '.join(f'{i}: {n}' for i, n in enumerate(names))}")


# ---------------------------------------------------------------- the network
def quantize(model: nn.Module, calibration_data, config: QuantConfig = QuantConfig(), *, device=None, layers=None,
             after_layer=None, in_place: bool = False, log=tqdm.write, checkpoint=None) -> QuantizedResult:
    """Quantize every weight `model` multiplies with an activation (Linear, Conv1d/2d/3d, matmul, attention
    projections; docs/capture.md), in order of first use, as `config` says.

    calibration_data: a DataLoader, a Dataset, a tensor of inputs (N, …) or a dict of tensors {name: (N, …)};
        a batch or item may be x or (x, y, …), x a tensor (model(x)), a tuple of tensors (model(*x)) or a dict
        (model(**x)). Each layer sees `config.batch_size` images (fresh ones per layer with calibration 'fresh').
    device: where to run (default: the model's device).
    layers: per-layer choices by index (execution order, negative from the end) or fnmatch name pattern:
        {0: None, -1: 8, "stages.2.*": {"method": "msq"}} leaves layer 0 float, gives the last layer 8 bits
        and the matching layers round-to-nearest (the last matching entry wins); a list [0, "fc"] quantizes
        only those layers. An entry that matches no layer is an error.
    after_layer(step: network.LayerStep): runs after each quantized layer (bias correction, retraining);
        step.analog_rows / quantized_rows are None for a layer whose rows were streamed.
    in_place: quantize `model` itself (later layers then see X̃ = X) instead of a copy.
    log: where the per-layer lines go (tqdm.write keeps the progress bar intact).
    checkpoint: a `gpfq.pipeline.checkpoint.LayerCheckpoint`, saved after each layer and continued from (the scripts').

    The caller's `model` comes back in the mode (train/eval, per submodule) and on the device it came in,
    with in_place too (its weights then are the quantized ones); result.model of a copy is in eval mode on
    `device`. Floating-point inputs are cast to the model's dtype (an fp16 model on fp32 data).
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a gpfq.QuantConfig, got {type(config).__name__}")
    if device is None:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else "cpu"
    stream = calibration_stream(calibration_data, config.seed)
    _check_sizes(stream, config.batch_size)
    state = _state(model)
    try:  # the layer loop is called from here, no helper between: the default path is five frames (docs/design.md)
        example = as_inputs(stream.dataset[0][0]).unsqueeze(0)
        dtype = floating_dtype(model)
        if dtype is not None and dtypes(example) - {dtype}:
            log(f"note: the calibration inputs are {', '.join(sorted(map(str, dtypes(example))))} and the model is "
                f"{dtype}: the inputs are cast to {dtype}")
        check_model_runs(model.eval().to(device), move(example, device, dtype))  # one clear error before any work
        if config.fold_batchnorm and foldable_pairs(model):
            if in_place:  # folding builds a new model (BatchNorms become Identity), so `model` itself would stay float
                raise ValueError("in_place=True with fold_batchnorm=True: folding returns a new model, so the model "
                                 "passed in would not be the one quantized; fold first "
                                 "(gpfq.pipeline.folding.fold_batchnorm) and quantize the folded model in place")
            model, pairs = fold_batchnorm(model)
            log(f"folded {len(pairs)} BatchNorm layers into their Conv2d/Linear layers")
        layer_configs = _layer_configs(model, stream, config, layers, device)
        activations = _calibrate_activations(model, stream, config, device, dtype, log)
        calibration = Calibration(config.batch_size, config.retain_rate, config.seed, mode=config.calibration,
                                  patch_stride=config.patch_stride, keep_rows=False, device=device)
        hooks = Hooks(log=log, after_layer=after_layer, checkpoint=checkpoint,
                      prepare_quantized=None if activations is None else activations.install)
        quantized, reports = network.quantize_network(  # looked up here: the documented seam
            model, stream, layer_configs.for_layer, calibration, hooks, list(config.ignore_layers), in_place,
            config.strict_coverage)
        reports.activations = activations  # what save_quantized records, from the result or from the reports alone
        return QuantizedResult(quantized, reports, config, reports.coverage, activations)
    finally:
        _restore(state)


def _calibrate_activations(model, stream, config, device, dtype, log):
    """The activation quantizers (config.act_bits), calibrated on the float model over `batch_size` calibration
    images drawn before any weight is quantized; None for float activations."""
    if config.act_bits is None:
        return None
    example = move(as_inputs(stream.dataset[0][0]).unsqueeze(0), device, dtype)
    chunks = (move(images, device, dtype) for images in stream.draw(config.batch_size))
    activations = calibrate(model, find_layers(model, example).layers, chunks, config.act_bits)
    where = ("tensors between integer ops (torch.fx graph)" if activations.at == "output" else
             "layer inputs (torch.fx cannot trace this model: its adds and pools stay float)")
    log(f"activations: {config.act_bits}-bit grids on {len(activations.scales)} {where}, {config.act_calibration} "
        f"scales from {config.batch_size} calibration images")
    unfolded = foldable_pairs(model) if activations.at == "output" else []  # (untraceable: no pairs to find)
    if unfolded:  # a BatchNorm between a conv and its rounding: the integer model keeps that conv in float
        log(f"WARNING: act_bits with {len(unfolded)} BatchNorm layers not folded: their convs stay float ops in the "
            f"int8 model (ONNX Runtime fuses a conv only when its output is rounded); set fold_batchnorm=True")
    return activations


def _layer_configs(model, stream, config, layers, device):
    """The config whose `for_layer` the network loop asks for each layer's: `config` with `layers`' choices."""
    if layers is None:
        return config
    example = move(as_inputs(stream.dataset[0][0]).unsqueeze(0), device, floating_dtype(model))
    _check_layers(config, layers, layers_in_execution_order(model.eval().to(device), example))
    return config.with_layers(layers)


# ---------------------------------------------------------------- one layer
def quantize_layer(weight: torch.Tensor, analog_rows: torch.Tensor, quantized_rows: torch.Tensor,
                   config: QuantConfig = QuantConfig()) -> torch.Tensor:
    """Quantize one weight from its input rows; returns Q, the shape of `weight`, on the config's alphabet.

    weight: (N1, N0) for a Linear layer (MLP scalar and percentile), or (N1, C, kh, kw) for a Conv2d layer
        (CNN scalar and percentile; N0 = C·kh·kw). analog_rows X and quantized_rows X̃: (m, N0), the layer's
        inputs in the float and in the partially quantized network (X̃ = X for the first layer).
    Per-layer fields of `config` apply (method, bits, alphabet, scalars, engine, …); the seed is layer 0's.
    """
    if weight.dim() not in (2, 4):
        raise ValueError(f"weight must be (N1, N0) or (N1, C, kh, kw), got shape {tuple(weight.shape)}")
    n_inputs = weight[0].numel()
    for what, rows in (("analog_rows", analog_rows), ("quantized_rows", quantized_rows)):
        if rows.dim() != 2 or rows.shape[1] != n_inputs:
            raise ValueError(f"{what} must be (m, {n_inputs}) for a weight of shape {tuple(weight.shape)}, got "
                             f"{tuple(rows.shape)}")
    if analog_rows.shape != quantized_rows.shape:
        raise ValueError(f"analog_rows {tuple(analog_rows.shape)} and quantized_rows {tuple(quantized_rows.shape)} "
                         f"differ in shape")
    if weight.dim() == 2:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    else:
        layer = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False)
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    _, quantized_weight, _, _, _, _ = _quantize_grouped_layer(layer, analog_rows, quantized_rows,
                                                              config.replace(seed=layer_seed(config.seed, 0)))
    return quantized_weight.reshape(weight.shape)


__all__ = ["QuantConfig", "QuantizedResult", "LayerReport", "quantize", "quantize_layer"]
