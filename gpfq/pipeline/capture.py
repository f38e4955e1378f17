"""Layer discovery and layer-input capture, by parameter (design: docs/capture.md).

A layer is a weight Parameter that the forward pass multiplies with an activation: the weight of an
`F.linear`, `F.conv1d/2d/3d`, `matmul`/`mm`/`addmm` call, or the in- and out-projection of
`F.multi_head_attention_forward` (nn.MultiheadAttention). A `torch.overrides.TorchFunctionMode`
(`WeightUses`) sees each such call, whatever module or function makes it, and records the tensor the
op actually receives (for a convolution: after any padding done before it, with the call's own
padding, stride, dilation and groups). Layers are ordered by first use; a weight used several times
is one layer whose rows are stacked over its uses. Every other parameter (norms, embeddings, tokens,
scales, bias tables, biases) stays float by design; `Coverage` counts what was quantized and what not.
"""
import functools
import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from gpfq.errors import BadInputError
from gpfq.pipeline.inputs import placeholder_values, run
from gpfq.threads import single_thread

CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
MATMUL_FUNCTIONS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
ADDMM_FUNCTIONS = {torch.addmm, torch.Tensor.addmm}
TRANSPOSED_CONV_FUNCTIONS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
# A parameter of one of these module types is meant to be a matmul weight: if the forward pass reads it
# some other way (transformed first, sliced, einsum), coverage counts it as a weight that stayed float.
WEIGHT_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)
# LSTM, GRU and RNN multiply their weight_ih_l*, weight_hh_l* (and weight_hr_l*) inside one fused op, whose rows
# gpfq does not build: they are counted as matmul weights that stay float, so a recurrent model is warned about.
RECURRENT_MODULES = (nn.RNNBase,)
RECURRENT_REASON = "recurrent weight of {kind}: multiplied inside its fused op, which gpfq does not quantize"


class _StopForward(Exception):
    pass


class NonFiniteError(BadInputError, ValueError):
    """A weight, buffer or layer input holds NaN or Inf."""


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError saying `what` holds how many NaN and Inf values."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"{what} contains {int(torch.isnan(tensor).sum())} NaN and "
                             f"{int(torch.isinf(tensor).sum())} Inf values")


# ---------------------------------------------------------------- what one call multiplies
def _ntuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


@dataclass(frozen=True)
class ConvGeometry:
    """How a convolution call walks its input: per spatial dimension kernel, stride, (before, after)
    zero padding, dilation; and the groups."""
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int = 1

    @classmethod
    def of_call(cls, weight_shape, stride=1, padding=0, dilation=1, groups=1):
        """The geometry of `F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)`."""
        dims = len(weight_shape) - 2
        kernel, stride, dilation = tuple(weight_shape[2:]), _ntuple(stride, dims), _ntuple(dilation, dims)
        if padding == "valid":
            pads = ((0, 0),) * dims
        elif padding == "same":  # as torch pads it: the odd one of an even total goes after
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pads = tuple((t // 2, t - t // 2) for t in totals)
        else:
            pads = tuple((p, p) for p in _ntuple(padding, dims))
        return cls(kernel, stride, pads, dilation, int(groups))

    @classmethod
    def of_module(cls, conv: nn.Module):
        """The geometry a ConvNd module's own attributes give (zero padding)."""
        return cls.of_call(conv.weight.shape, conv.stride, conv.padding, conv.dilation, conv.groups)


@dataclass
class Use:
    """One call that multiplies a layer's weight: `input` is the tensor the op receives, (…, N0) for a
    linear map, (n, C_in, *spatial) for a convolution (whose `geometry` is set)."""
    input: torch.Tensor
    geometry: ConvGeometry = None
    input_major: bool = False  # x @ W with W stored (N0, N1)


@dataclass
class LayerInput:
    """A layer's uses on one chunk of `images` calibration images."""
    uses: list
    images: int


@dataclass
class Layer:
    """One weight to quantize. name: the owning module's name when the weight is a module's `weight`
    (e.g. 'layer1.0.conv1'), else the parameter's name ('…self_attention.in_proj_weight')."""
    name: str
    parameter: str
    kind: str  # the owner's class ('Conv2d', 'Linear', …), or class.parameter ('MultiheadAttention.in_proj_weight')
    weight: nn.Parameter  # in the model the layer was found in
    conv_dims: int = 0  # 0: linear map; 1, 2, 3: convolution
    groups: int = 1
    input_major: bool = False  # stored (N0, N1), multiplied as x @ W: the flat weight is its transpose
    uses: int = 1  # calls per forward pass

    @property
    def is_conv(self) -> bool:
        return self.conv_dims > 0


def is_conv(layer) -> bool:
    """A convolution layer (a Layer, or a module from the module-call API)."""
    return layer.is_conv if isinstance(layer, Layer) else isinstance(layer, nn.modules.conv._ConvNd)


# ---------------------------------------------------------------- seeing the calls
def _argument(args, kwargs, position, name, default=None):
    if len(args) > position:
        return args[position]
    return kwargs.get(name, default)


@functools.lru_cache(maxsize=None)
def _attention_signature():
    return inspect.signature(F.multi_head_attention_forward)


class WeightUses(TorchFunctionMode):
    """While active, calls on_use(parameter name, Use) for every call that multiplies one of `model`'s
    parameters with an activation (before the op runs; raising there stops the forward pass),
    on_unsupported(name, reason) for a weight multiplied in a way rows are not built for, and
    on_other(name, op name) for every other op that reads a parameter (with track_other)."""

    def __init__(self, model: nn.Module, on_use, on_unsupported=None, on_other=None):
        super().__init__()
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.constants = set(self.names) | {id(b) for b in model.buffers()}
        self.on_use = on_use
        self.on_unsupported = on_unsupported or (lambda name, reason: None)
        self.on_other = on_other

    def _name(self, tensor):
        """The parameter name of `tensor`, or None."""
        return self.names.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None

    def _base_name(self, tensor):
        """The parameter name of `tensor` or of the tensor it is a view of."""
        name = self._name(tensor)
        if name is None and isinstance(tensor, torch.Tensor) and tensor._base is not None:
            name = self._name(tensor._base)
        return name

    def _activation(self, tensor) -> bool:
        return (isinstance(tensor, torch.Tensor) and id(tensor) not in self.constants
                and (tensor._base is None or id(tensor._base) not in self.constants))

    def _linear(self, name, x, seen, input_major=False):
        seen.add(name)
        if self._activation(x):
            self.on_use(name, Use(x.detach(), input_major=input_major))
        else:
            self.on_unsupported(name, "multiplied with a parameter or buffer, not an activation")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = set()
        if func is F.linear:
            name = self._name(_argument(args, kwargs, 1, "weight"))
            if name is not None:
                self._linear(name, _argument(args, kwargs, 0, "input"), seen)
        elif func in CONV_FUNCTIONS:
            weight = _argument(args, kwargs, 1, "weight")
            name = self._name(weight)
            if name is not None:
                seen.add(name)
                x = _argument(args, kwargs, 0, "input")
                if not self._activation(x):
                    self.on_unsupported(name, "convolved with a parameter or buffer, not an activation")
                else:
                    geometry = ConvGeometry.of_call(
                        weight.shape, _argument(args, kwargs, 3, "stride", 1), _argument(args, kwargs, 4, "padding", 0),
                        _argument(args, kwargs, 5, "dilation", 1), _argument(args, kwargs, 6, "groups", 1))
                    unbatched = x.dim() == CONV_FUNCTIONS[func] + 1
                    self.on_use(name, Use((x.unsqueeze(0) if unbatched else x).detach(), geometry))
        elif func in MATMUL_FUNCTIONS or func in ADDMM_FUNCTIONS:
            first = 1 if func in ADDMM_FUNCTIONS else 0
            x, weight = _argument(args, kwargs, first, "mat1"), _argument(args, kwargs, first + 1, "mat2")
            name = self._base_name(weight)
            if name is not None and self._name(x) is None:
                seen.add(name)
                parameter = weight if self._name(weight) else weight._base
                if weight.dim() != 2 or parameter.dim() != 2:
                    self.on_unsupported(name, f"{func.__name__} with a {weight.dim()}-d weight")
                elif weight is parameter:
                    self._linear(name, x, seen, input_major=True)
                elif weight.shape == parameter.shape[::-1] and weight.stride() == parameter.stride()[::-1]:
                    self._linear(name, x, seen)
                else:
                    self.on_unsupported(name, f"{func.__name__} with a slice or view of the weight")
        elif func in TRANSPOSED_CONV_FUNCTIONS:
            name = self._name(_argument(args, kwargs, 1, "weight"))
            if name is not None:
                seen.add(name)
                self.on_unsupported(name, "transposed convolution: GPFQ rows are built for linear maps and "
                                          "convolutions only; left float")
        elif func is F.multi_head_attention_forward:
            return self._attention(func, args, kwargs)
        if self.on_other is not None:
            self._others(func, args, kwargs, seen)
        return func(*args, **kwargs)

    def _others(self, func, args, kwargs, seen):
        op = getattr(func, "__name__", repr(func))
        if op == "__get__":  # attribute reads (.shape, .T, .device) are not uses
            return
        for value in tree_flatten((args, kwargs))[0]:
            name = self._base_name(value)
            if name is not None and name not in seen:
                self.on_other(name, op)

    def _attention(self, func, args, kwargs):
        """nn.MultiheadAttention: the in-projection is a linear map of the query (self-attention) or of
        query, key, value (separate weights); the out-projection one of the attention output, computed
        here by running the attention with an identity out-projection."""
        bound = _attention_signature().bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        seen = set()
        query, key, value = a["query"], a["key"], a["value"]
        if not a["use_separate_proj_weight"]:
            name = self._name(a["in_proj_weight"])
            if name is not None:
                seen.add(name)
                if query is key and key is value:
                    self._linear(name, query, seen)
                else:
                    self.on_unsupported(name, "packed in-projection of cross-attention (query, key and value "
                                              "differ): left float")
        else:
            for weight, x in ((a["q_proj_weight"], query), (a["k_proj_weight"], key), (a["v_proj_weight"], value)):
                name = self._name(weight)
                if name is not None:
                    self._linear(name, x, seen)
        out_weight, out_bias = a["out_proj_weight"], a["out_proj_bias"]
        out_name = self._name(out_weight)
        if self.on_other is not None:
            others = {k: v for k, v in a.items() if k not in ("in_proj_weight", "out_proj_weight", "q_proj_weight",
                                                                 "k_proj_weight", "v_proj_weight")}
            self._others(func, (), others, seen)
        if out_name is None:
            return func(*args, **kwargs)
        embed = out_weight.shape[1]
        a["out_proj_weight"] = torch.eye(embed, dtype=out_weight.dtype, device=out_weight.device)
        a["out_proj_bias"] = torch.zeros(embed, dtype=out_weight.dtype, device=out_weight.device)
        attention, weights = func(**a)
        self._linear(out_name, attention, {out_name})
        return F.linear(attention, out_weight, out_bias), weights


# ---------------------------------------------------------------- discovery
@dataclass
class Discovery:
    """What one forward pass does with a model's parameters."""
    layers: list  # [Layer], in order of first use
    unsupported: dict  # parameter name -> why it is multiplied but not quantized
    other_uses: dict  # parameter name -> {op names} for parameters read but not multiplied as a weight
    sizes: dict  # parameter name -> number of elements (every parameter, shared ones once)
    weight_parameters: set  # parameters of WEIGHT_MODULES named 'weight' or '*_proj_weight'


def _owner(parameter: str):
    module, _, leaf = parameter.rpartition(".")
    return module, leaf


@torch.no_grad()
def find_layers(model: nn.Module, example_input: torch.Tensor) -> Discovery:
    """Run `model` once on `example_input` and find its layers, in order of first use.

    Parameters the forward pass never multiplies (e.g. GoogLeNet's auxiliary heads in eval mode) are
    not layers, so they stay float.
    """
    uses, unsupported, others = {}, {}, {}

    def on_use(name, use):
        uses.setdefault(name, []).append((use.geometry, use.input_major))

    def on_other(name, op):
        others.setdefault(name, set()).add(op)

    with WeightUses(model, on_use, lambda name, reason: unsupported.setdefault(name, reason), on_other):
        run(model, example_input)
    parameters = dict(model.named_parameters())
    layers = []
    for name, calls in uses.items():
        if name in unsupported:
            continue
        kinds = {(g.groups, len(g.kernel_size)) if g is not None else major for g, major in calls}
        if len(kinds) > 1:
            unsupported[name] = "used in different ways (linear map and convolution, different groups or layouts)"
            continue
        weight = parameters[name]
        module_name, leaf = _owner(name)
        owner = model.get_submodule(module_name)
        geometry, input_major = calls[0]
        layers.append(Layer(
            name=module_name if leaf == "weight" and module_name else name, parameter=name,
            kind=type(owner).__name__ if leaf == "weight" else f"{type(owner).__name__}.{leaf}", weight=weight,
            conv_dims=0 if geometry is None else len(geometry.kernel_size),
            groups=1 if geometry is None else geometry.groups, input_major=input_major, uses=len(calls)))
    weight_parameters = set()
    for module_name, module in model.named_modules():
        for leaf, parameter in module.named_parameters(recurse=False):
            name = f"{module_name}.{leaf}" if module_name else leaf
            if isinstance(module, WEIGHT_MODULES) and (leaf == "weight" or leaf.endswith("proj_weight")):
                weight_parameters.add(name)
            elif isinstance(module, RECURRENT_MODULES) and leaf.startswith("weight_") and name not in uses:
                weight_parameters.add(name)
                unsupported.setdefault(name, RECURRENT_REASON.format(kind=type(module).__name__))
    sizes = {name: p.numel() for name, p in parameters.items()}
    return Discovery(layers, unsupported, others, sizes, weight_parameters & set(sizes))


@torch.no_grad()
def layers_in_execution_order(model: nn.Module, example_input: torch.Tensor) -> list:
    """Names of the layers (see `find_layers`) in the order one forward pass first uses them."""
    return [layer.name for layer in find_layers(model, example_input).layers]


@torch.no_grad()
def check_model_finite(model: nn.Module, example_input: torch.Tensor) -> None:
    """NonFiniteError naming the first parameter or buffer, or else the first layer input on
    `example_input`, that holds NaN or Inf (a NaN BatchNorm statistic shows up at the next layer's input)."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        check_finite(tensor, f"{name} of the float model")

    def check(name, use):
        layer = name[: -len(".weight")] if name.endswith(".weight") else name
        check_finite(use.input, f"the input of layer {layer} in the float model (on one calibration image)")
    with WeightUses(model, check):
        output = run(model, example_input)
    if isinstance(output, torch.Tensor):
        check_finite(output, "the float model's output (on one calibration image)")


# ---------------------------------------------------------------- capture
def _collector(parameter: str, captured: list, count: int):
    def on_use(name, use):
        if name == parameter:
            captured.append(use)
            if len(captured) == count:
                raise _StopForward
    return on_use


@torch.no_grad()
def capture_uses(model: nn.Module, layer: Layer, images: torch.Tensor) -> LayerInput:
    """What `layer`'s weight is multiplied with, at each of its uses, when `model` runs on `images`.
    The forward pass stops after the layer's last use."""
    captured = []
    try:
        with WeightUses(model, _collector(layer.parameter, captured, layer.uses)):
            run(model, images)
    except _StopForward:
        pass
    if not captured:
        raise RuntimeError(f"layer {layer.name!r} was not used by the forward pass")
    return LayerInput(captured, images.shape[0])


@torch.no_grad()
def capture_input(model: nn.Module, layer_name: str, images: torch.Tensor) -> torch.Tensor:
    """The input tensor that module `layer_name` receives when `model` runs on `images` (before any
    padding its forward does; for running the module itself on it)."""
    module = model.get_submodule(layer_name)
    captured = []

    def stop(_module, inputs):
        captured.append(inputs[0].detach())
        raise _StopForward

    handle = module.register_forward_pre_hook(stop)
    try:
        run(model, images)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"layer {layer_name!r} was not called by the forward pass")
    return captured[0]


# ---------------------------------------------------------------- rows
def _geometry(conv) -> ConvGeometry:
    return conv if isinstance(conv, ConvGeometry) else ConvGeometry.of_module(conv)


def _steps(geometry: ConvGeometry, stride: str) -> tuple:
    if stride not in ("kernel", "layer"):
        raise ValueError(f"patch stride must be 'kernel' or 'layer', got {stride!r}")
    return geometry.kernel_size if stride == "kernel" else geometry.stride


def patch_grid(conv, spatial_shape, stride: str = "kernel") -> tuple:
    """Patches along each spatial dimension of an input of `spatial_shape` (before the call's padding).
    With stride='layer' this is the convolution's own output grid."""
    g = _geometry(conv)
    return tuple((size + before + after - d * (k - 1) - 1) // s + 1
                 for size, (before, after), d, k, s in zip(spatial_shape, g.padding, g.dilation, g.kernel_size,
                                                           _steps(g, stride)))


def selected_patches(inputs: torch.Tensor, conv, index: torch.Tensor, stride: str = "kernel"):
    """Rows of the patches `index` (n, k) of each image: (n·k, C_in·∏kernel), channel-major like the weight.

    inputs: (n, C_in, *spatial), what the convolution receives; conv: a ConvGeometry or a ConvNd module.
    Patch p sits at grid position unravel(p) (row-major), at stride = kernel size (the paper) or the layer's
    stride. Reads the patches through a strided view of the zero-padded input, so only the kept ones are copied.
    """
    g = _geometry(conv)
    steps = _steps(g, stride)
    grid = patch_grid(g, inputs.shape[2:], stride)
    pads = [p for before_after in reversed(g.padding) for p in before_after]
    padded = F.pad(inputs, pads) if any(pads) else inputs.contiguous()
    n, channels = padded.shape[:2]
    strides = padded.stride()
    spatial = strides[2:]
    # (n, *grid, C, *kernel): patch at grid position i starts at i·step along every dimension.
    patches = padded.as_strided((n, *grid, channels, *g.kernel_size),
                                (strides[0], *(s * t for s, t in zip(spatial, steps)), strides[1],
                                 *(s * d for s, d in zip(spatial, g.dilation))))
    coordinates, rest = [], index
    for size in reversed(grid[1:]):
        coordinates.insert(0, rest % size)
        rest = rest // size
    coordinates.insert(0, rest)
    images = torch.arange(n, device=index.device).unsqueeze(1)
    return patches[(images, *coordinates)].reshape(-1, channels * math.prod(g.kernel_size))


def conv_patches(inputs: torch.Tensor, conv, stride: str = "kernel") -> torch.Tensor:
    """Every patch of a 2-d convolution by F.unfold: (n, L, C_in·kh·kw), channel-major like the weight.
    (The reference that `selected_patches`' strided reads are tested against.)"""
    g = _geometry(conv)
    if len(g.kernel_size) != 2:
        raise ValueError(f"conv_patches unfolds 2-d convolutions, got a {len(g.kernel_size)}-d one")
    (top, bottom), (left, right) = g.padding
    padded = F.pad(inputs, (left, right, top, bottom)) if any((top, bottom, left, right)) else inputs
    patches = F.unfold(padded, g.kernel_size, dilation=g.dilation, stride=_steps(g, stride))
    return patches.transpose(1, 2)


def patch_indices(n_images: int, n_patches: int, retain_rate: float, generator: torch.Generator) -> torch.Tensor:
    """(n_images, k) patch indices per image: k = int(p·L + 1) drawn with replacement, or all L if p = 1."""
    if not 0.0 < retain_rate <= 1.0:
        raise ValueError(f"retain_rate must be in (0, 1], got {retain_rate}")
    if retain_rate == 1.0:
        return torch.arange(n_patches).expand(n_images, n_patches)
    k = int(retain_rate * n_patches + 1)
    return torch.randint(0, n_patches, (n_images, k), generator=generator)


def _as_layer_input(layer, value):
    """A LayerInput from the module-call API's plain tensor input (conv: before the module's padding)."""
    if isinstance(value, LayerInput):
        return value
    return LayerInput([Use(value, ConvGeometry.of_module(layer) if is_conv(layer) else None)], value.shape[0])


def layer_rows(layer, analog, quantized, retain_rate: float, generator: torch.Generator,
               patch_stride: str = "kernel"):
    """Turn a layer's captured inputs (LayerInput, or the module's input tensor) into the rows X, X̃
    (rows, N0_total) the quantizer sees, stacked over the layer's uses.

    Convolution: patches, subsampled per image with the same indices for X and X̃.
    Linear map: every leading position is a row.
    """
    analog, quantized = _as_layer_input(layer, analog), _as_layer_input(layer, quantized)
    analog_rows, quantized_rows = [], []
    for use, quantized_use in zip(analog.uses, quantized.uses):
        if use.geometry is not None:
            grid = patch_grid(use.geometry, use.input.shape[2:], patch_stride)
            index = patch_indices(use.input.shape[0], math.prod(grid), retain_rate, generator).to(use.input.device)
            with single_thread():  # memory-bound copies
                analog_rows.append(selected_patches(use.input, use.geometry, index, patch_stride))
                quantized_rows.append(selected_patches(quantized_use.input, use.geometry, index, patch_stride))
        else:
            width = use.input.shape[-1]
            analog_rows.append(use.input.reshape(-1, width))
            quantized_rows.append(quantized_use.input.reshape(-1, width))
    if len(analog_rows) == 1:
        return analog_rows[0], quantized_rows[0]
    return torch.cat(analog_rows), torch.cat(quantized_rows)


def grouped(layer, weight: torch.Tensor, rows: torch.Tensor = None):
    """Split a layer's reshaped weight (N1_total, N0) and rows (m, G·N0) per group.

    Returns weight (G, N1, N0) and rows (G, m, N0); group g owns output channels
    [g·N1, (g+1)·N1) and input columns [g·N0, (g+1)·N0).
    """
    groups = getattr(layer, "groups", 1)
    n_out, width = weight.shape
    weight_groups = weight.reshape(groups, n_out // groups, width)
    if rows is None:
        return weight_groups
    rows_groups = rows.reshape(rows.shape[0], groups, width).permute(1, 0, 2)
    return weight_groups, rows_groups


def flat_weight(layer) -> torch.Tensor:
    """Weight as (N1_total, N0) with N0 = C_in/groups·∏kernel for convolutions."""
    weight = layer.weight.detach()
    if getattr(layer, "input_major", False):
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


@torch.no_grad()
def write_weight(model: nn.Module, layer: Layer, flat: torch.Tensor) -> None:
    """Set `layer`'s weight in `model` from a flat (N1_total, N0) tensor (or its grouped form)."""
    parameter = model.get_parameter(layer.parameter)
    if layer.input_major:
        parameter.copy_(flat.reshape(parameter.shape[1], parameter.shape[0]).t())
    else:
        parameter.copy_(flat.reshape(parameter.shape))


def layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight of the layer called `name` (see `Layer.name`): a module's `weight`, or a parameter."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_submodule(name).weight


def owner_module(model: nn.Module, layer: Layer) -> nn.Module:
    """The module that holds `layer`'s weight in `model`."""
    return model.get_submodule(_owner(layer.parameter)[0])


# ---------------------------------------------------------------- coverage
@dataclass
class Coverage:
    """Which parameters were quantized and which stayed float, and why. Each list holds (name, size, why)."""
    quantized: list = field(default_factory=list)  # matmul weights quantized
    chosen_float: list = field(default_factory=list)  # matmul weights left float by the settings (ignore_layers, …)
    unsupported: list = field(default_factory=list)  # matmul weights that cannot be quantized
    by_design: list = field(default_factory=list)  # read by the forward pass, but not as a matmul weight
    unused: list = field(default_factory=list)  # never read by the forward pass

    WARN_FRACTION = 0.05

    @classmethod
    def of(cls, discovery: Discovery, quantized_parameters=None):
        """quantized_parameters: names of the weights quantized (None: every layer, the plan)."""
        layer_parameters = {layer.parameter for layer in discovery.layers}
        quantized_parameters = layer_parameters if quantized_parameters is None else set(quantized_parameters)
        coverage = cls()
        for name, size in discovery.sizes.items():
            if name in quantized_parameters:
                coverage.quantized.append((name, size, "quantized"))
            elif name in layer_parameters:
                coverage.chosen_float.append((name, size, "left float by the settings"))
            elif name in discovery.unsupported:
                coverage.unsupported.append((name, size, discovery.unsupported[name]))
            elif name in discovery.other_uses and name in discovery.weight_parameters:
                ops = ", ".join(sorted(discovery.other_uses[name]))
                coverage.unsupported.append((name, size, f"a layer's weight read by {ops}, not as the weight of "
                                                         f"linear/conv/matmul"))
            elif name in discovery.other_uses:
                coverage.by_design.append((name, size, "read by " + ", ".join(sorted(discovery.other_uses[name]))))
            else:
                coverage.unused.append((name, size, "not used by the forward pass"))
        return coverage

    @staticmethod
    def _total(entries) -> int:
        return sum(size for _, size, _ in entries)

    @property
    def matmul_parameters(self) -> int:
        return self._total(self.quantized) + self._total(self.chosen_float) + self._total(self.unsupported)

    @property
    def unsupported_fraction(self) -> float:
        """Fraction of the matmul weights' parameters that cannot be quantized."""
        return self._total(self.unsupported) / self.matmul_parameters if self.matmul_parameters else 0.0

    def floats(self) -> list:
        return self.chosen_float + self.unsupported + self.by_design + self.unused

    def largest_float(self, count: int = 3) -> list:
        return sorted(self.floats(), key=lambda entry: -entry[1])[:count]

    def columns(self) -> dict:
        """The log's coverage columns."""
        tensors = len(self.quantized) + len(self.floats())
        parameters = self._total(self.quantized) + self._total(self.floats())
        return {"Quantized Tensors": f"{len(self.quantized)}/{tensors}",
                "Quantized Parameters": f"{self._total(self.quantized)}/{parameters}",
                "Largest Float": " ".join(f"{name}({size})" for name, size, _ in self.largest_float())}

    def summary(self) -> str:
        matmul = len(self.quantized) + len(self.chosen_float) + len(self.unsupported)
        lines = [f"coverage: {len(self.quantized)} of {matmul} matmul weights quantized "
                 f"({self._total(self.quantized):,} of {self.matmul_parameters:,} parameters); left float: "
                 f"{len(self.chosen_float)} by the settings, {len(self.unsupported)} unsupported "
                 f"({self.unsupported_fraction:.1%} of the matmul parameters), {len(self.by_design)} other "
                 f"tensors by design ({self._total(self.by_design):,} parameters: norms, biases, embeddings, …), "
                 f"{len(self.unused)} unused ({self._total(self.unused):,})"]
        for name, size, why in self.largest_float():
            lines.append(f"  largest float: {name} ({size:,}): {why}")
        return "\n".join(lines)

    def warning(self):
        """The warning when more than 5 % of the matmul parameters cannot be quantized, else None."""
        if self.unsupported_fraction <= self.WARN_FRACTION:
            return None
        names = ", ".join(f"{name} ({why})" for name, _, why in sorted(self.unsupported, key=lambda e: -e[1])[:3])
        return (f"{self.unsupported_fraction:.1%} of this model's matmul parameters cannot be quantized and stay "
                f"float (more than {self.WARN_FRACTION:.0%}): {names}; the reported bits describe only the "
                f"quantized layers (strict_coverage refuses such a model)")


# ---------------------------------------------------------------- fixed calibration: the fx graph
def fresh_message(model: nn.Module, error: BaseException) -> str:
    return (f"calibration='fixed' runs the model layer by layer through its torch.fx graph, and "
            f"{type(model).__name__} cannot be run that way ({type(error).__name__}: {error}); "
            f"use calibration='fresh'")


def trace_graph(model: nn.Module, example_input: torch.Tensor = None, layers=None) -> fx.GraphModule:
    """The torch.fx trace of `model`; ValueError (saying: use calibration='fresh') if fx cannot trace it,
    or, given `example_input`, if the traced graph does not run, or does not use the `layers` in their
    order, or does not give the model's output on it."""
    try:
        traced = fx.symbolic_trace(model)
    except Exception as error:  # fx raises several kinds (TraceError, TypeError, …) on dynamic control flow
        raise ValueError(fresh_message(model, error)) from error
    if example_input is None:
        return traced
    try:
        with torch.no_grad():
            order = []
            forward = CachedForward(model, traced, [example_input])
            environment = forward.environments[0]
            with WeightUses(model, lambda name, use: order.append(name) if name not in order else None):
                for node in forward.nodes:
                    if node.op not in ("placeholder", "output"):
                        environment[node] = forward._run(node, environment)
            output = fx.node.map_arg(forward.nodes[-1].args[0], lambda n: environment[n])
            expected = run(model, example_input)
    except Exception as error:
        raise ValueError(fresh_message(model, error)) from error
    if layers is not None and order != [layer.parameter for layer in layers]:
        raise ValueError(fresh_message(model, RuntimeError("its traced graph uses the weights in another order "
                                                           "than the model")))
    if isinstance(expected, torch.Tensor) and not (isinstance(output, torch.Tensor) and output.shape == expected.shape
                                                   and torch.allclose(output, expected, rtol=1e-4, atol=1e-5)):
        raise ValueError(fresh_message(model, RuntimeError("its traced graph does not give the model's output")))
    return traced


class CachedForward:
    """One model's forward pass over fixed image chunks, run node by node up to each layer in turn.

    `inputs_of(layer)` advances from where the last call stopped to the node that first uses the layer's
    weight and returns what the weight is multiplied with, for every chunk. The values later nodes still
    need stay cached, so visiting all layers costs one forward pass (linear in depth) instead of one
    partial pass per layer. The node that uses the weight runs again on the next advance, so a weight
    written in between (its quantization) is what the following layers see. A weight used in several
    nodes (shared) has its later uses captured by a look-ahead on a copy of the cached values.
    """

    def __init__(self, model: nn.Module, traced, chunks):
        self.model = model
        self.traced = traced if isinstance(traced, fx.GraphModule) else None
        graph = traced.graph if isinstance(traced, fx.GraphModule) else traced
        self.nodes = list(graph.nodes)
        self.position = 0
        order = {node: i for i, node in enumerate(self.nodes)}
        # A value can be dropped once the last node that reads it has run.
        self.last_reader = {node: max((order[user] for user in node.users), default=order[node])
                            for node in self.nodes}
        placeholders = [node for node in self.nodes if node.op == "placeholder"]
        self.environments, self.sizes = [], []
        for images in chunks:  # further forward arguments than the inputs give keep their defaults
            self.environments.append(placeholder_values(placeholders, images))
            self.sizes.append(images.shape[0])

    def _attribute(self, target: str):
        value = self.model
        try:
            for part in target.split("."):
                value = getattr(value, part)
        except AttributeError:
            if self.traced is None:
                raise
            value = self.traced  # a constant the trace made (e.g. '_tensor_constant0')
            for part in target.split("."):
                value = getattr(value, part)
        return value

    def _run(self, node, environment):
        args = fx.node.map_arg(node.args, lambda n: environment[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: environment[n])
        if node.op == "call_module":
            return self.model.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return self._attribute(node.target)
        raise RuntimeError(f"unexpected fx node {node.format_node()}")

    def _advance(self, environment, start: int, mode, drop: bool):
        """Run the nodes from `start` under `mode` until one stops the forward pass; its index (or None)."""
        for index in range(start, len(self.nodes)):
            node = self.nodes[index]
            if node.op in ("placeholder", "output"):
                continue
            try:
                with mode:
                    value = self._run(node, environment)
            except _StopForward:
                return index
            environment[node] = value
            if drop:
                for read in list(node.all_input_nodes) + [node]:
                    if self.last_reader[read] <= index and read.op != "placeholder":
                        environment.pop(read, None)
        return None

    @torch.no_grad()
    def inputs_of(self, layer: Layer) -> list:
        """[LayerInput] per chunk: `layer`'s uses, after running every node before its first use."""
        inputs, stop = [], None
        for environment, size in zip(self.environments, self.sizes):
            captured = []
            stop = self._advance(environment, self.position,
                                 WeightUses(self.model, _collector(layer.parameter, captured, 1)), drop=True)
            if stop is None:
                raise RuntimeError(f"layer {layer.name!r} is not used after the layers already visited")
            if layer.uses > 1:  # the later uses, on a copy that keeps every value
                captured = []
                self._advance(dict(environment), stop,
                              WeightUses(self.model, _collector(layer.parameter, captured, layer.uses)), drop=False)
            # placeholders are read by the first nodes; drop them once those have run
            for node in [n for n in environment if n.op == "placeholder" and self.last_reader[n] < stop]:
                environment.pop(node)
            inputs.append(LayerInput(captured, size))
        self.position = stop
        return inputs
