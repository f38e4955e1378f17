"""Seeing a layer's weight where it is multiplied, and capturing what it is multiplied with (docs/capture.md).

A layer is a weight Parameter that the forward pass multiplies with an activation: the weight of an
`F.linear`, `F.conv1d/2d/3d`, `matmul`/`mm`/`addmm` call, or the in- and out-projection of
`F.multi_head_attention_forward` (nn.MultiheadAttention). A `torch.overrides.TorchFunctionMode`
(`WeightUses`) sees each such call, whatever module or function makes it, and records the tensor the
op actually receives (for a convolution: after any padding done before it, with the call's own
padding, stride, dilation and groups). The other jobs sit beside this module: `discovery` (the layers, in order
of first use), `rows` (X and X̃ from the captured inputs), `coverage` (what stays float, and why) and
`cached_forward` (fixed calibration's node-by-node forward pass).
"""
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from gpfq.errors import BadInputError
from gpfq.pipeline.inputs import run

CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
MATMUL_FUNCTIONS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
ADDMM_FUNCTIONS = {torch.addmm, torch.Tensor.addmm}
TRANSPOSED_CONV_FUNCTIONS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


class StopForward(Exception):
    """Raised by a capture once it has what it needs, to end the forward pass early."""


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


def owner_of(parameter: str):
    """(owning module's name, leaf): 'layer1.0.conv1.weight' -> ('layer1.0.conv1', 'weight')."""
    module, _, leaf = parameter.rpartition(".")
    return module, leaf


# ---------------------------------------------------------------- capturing a layer's inputs
def use_collector(parameter: str, captured: list, count: int):
    def on_use(name, use):
        if name == parameter:
            captured.append(use)
            if len(captured) == count:
                raise StopForward
    return on_use


@torch.no_grad()
def capture_uses(model: nn.Module, layer: Layer, images: torch.Tensor) -> LayerInput:
    """What `layer`'s weight is multiplied with, at each of its uses, when `model` runs on `images`.
    The forward pass stops after the layer's last use."""
    captured = []
    try:
        with WeightUses(model, use_collector(layer.parameter, captured, layer.uses)):
            run(model, images)
    except StopForward:
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
        raise StopForward

    handle = module.register_forward_pre_hook(stop)
    try:
        run(model, images)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"layer {layer_name!r} was not called by the forward pass")
    return captured[0]
