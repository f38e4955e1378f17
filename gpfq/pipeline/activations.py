"""Quantized activations: every tensor between integer ops rounded onto a calibrated grid (fake quantization).

With `QuantConfig(act_bits=b)`, a tensor is rounded onto an unsigned b-bit grid with a zero point (ONNX
QuantizeLinear's uint8 convention at b = 8):

    q = clamp(round(x / s) + z, 0, 2^b − 1),   x̂ = (q − z) · s

one (s, z) per tensor. The scale is calibrated on the float network before any weight is quantized, from the min
and max of the tensor over the calibration images ('minmax'): the grid spans [min(lo, 0), max(hi, 0)], so 0 is
exact (zero padding stays 0, and after a ReLU z = 0, which ONNX Runtime folds the ReLU into).

Where. The points are found from the model's torch.fx graph: every value that an integer op reads is rounded
where it is made — the network's input, a ReLU's output, a residual add's output, a pool's output, a conv's
output that feeds an add. The integer ops are convs, linear layers, adds, max and average pools and concats;
shape-only ops (flatten, reshape, dropout, identity) are looked through, so the value is rounded before them. The
quantized model's forward is that graph with a rounding node after each point (`install`), and the export
(gpfq.io.qdq_export) is the same graph, whose roundings become QuantizeLinear → DequantizeLinear pairs: torch and
the integer model round at the same points, and GPFQ's X̃ is what the integer model sees. Torch's own
quantization flow (torch.ao) is not used because it replaces the modules GPFQ quantizes and exports through a
path ONNX Runtime's fuser does not read; ONNX Runtime's `quantize_static` picks its own points and scales on the
ONNX graph, which the torch model could then not reproduce.

A model torch.fx cannot trace (data-dependent control flow, most language models) falls back to rounding the
input of each quantized Linear/Conv module only (forward pre-hooks): its adds and pools stay float ops.
"""
import importlib
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from gpfq.pipeline.inputs import run

ACT_CALIBRATIONS = ("minmax",)
ACT_GRANULARITIES = ("tensor",)
MODULE_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# ops ONNX Runtime runs on uint8 tensors (QLinearConv, QGemm, QLinearAdd, QLinearConcat, pooling): their inputs
# are the points
INTEGER_MODULES = MODULE_KINDS + (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                                  nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
INTEGER_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.cat, F.linear, F.conv1d, F.conv2d, F.conv3d,
                     F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                     F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
INTEGER_METHODS = {"add", "add_"}
# of those, the ones whose first argument is their one activation (a conv's or linear's weight is not one)
ONE_INPUT_FUNCTIONS = INTEGER_FUNCTIONS - {operator.add, operator.iadd, torch.add, torch.cat}
# ops that only move values: a point is taken at the value they pass on
SHAPE_MODULES = (nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, F.dropout}
SHAPE_METHODS = {"flatten", "view", "reshape", "contiguous"}


@dataclass(frozen=True)
class ActScale:
    """One tensor's grid: x̂ = (q − zero_point) · scale, q an integer in [0, 2^bits − 1]."""
    scale: float
    zero_point: int
    bits: int


def grid_of(low: float, high: float, bits: int) -> ActScale:
    """The unsigned `bits`-bit grid through 0 that covers [low, high] (min-max calibration)."""
    top = 2 ** bits - 1
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    # float32: the scale the exported graph stores, so torch and ONNX Runtime round with the same number
    scale = float(torch.tensor((high - low) / top, dtype=torch.float32)) if high > low else 1.0
    zero_point = int(min(max(round(-low / scale), 0), top))
    return ActScale(scale, zero_point, bits)


def fake_quantize(x: torch.Tensor, grid: ActScale) -> torch.Tensor:
    """x rounded onto `grid` (any shape; round half to even, as QuantizeLinear)."""
    q = torch.clamp(torch.round(x / grid.scale) + grid.zero_point, 0, 2 ** grid.bits - 1)
    return (q - grid.zero_point) * grid.scale


def round_point(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """The rounding node of a point: `fake_quantize` (a straight-through gradient when training through it);
    under export, torch's decomposed quantize and dequantize ops, which the ONNX exporter writes as QuantizeLinear
    → DequantizeLinear (uint8; torch's fake-quantize op does not export with a dynamic batch axis)."""
    if torch.compiler.is_exporting():
        importlib.import_module("torch.ao.quantization.fx._decomposed")  # registers torch.ops.quantized_decomposed
        ops, top = torch.ops.quantized_decomposed, 2 ** bits - 1
        q = ops.quantize_per_tensor(x, scale, zero_point, 0, top, torch.uint8)
        return ops.dequantize_per_tensor(q, scale, zero_point, 0, top, torch.uint8)
    rounded = fake_quantize(x, ActScale(scale, zero_point, bits))
    if torch.is_grad_enabled() and x.requires_grad:  # retraining: d(x̂)/dx = 1
        rounded = x + (rounded - x).detach()
    return rounded



def _module(traced, node):
    return traced.get_submodule(node.target) if node.op == "call_module" else None


def _is_integer_op(traced, node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(traced, node), INTEGER_MODULES)
    if node.op == "call_function":
        return node.target in INTEGER_FUNCTIONS
    return node.op == "call_method" and node.target in INTEGER_METHODS


def _is_shape_op(traced, node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(traced, node), SHAPE_MODULES)
    if node.op == "call_function":
        return node.target in SHAPE_FUNCTIONS
    return node.op == "call_method" and node.target in SHAPE_METHODS


def _source(traced, node):
    """The node that makes the value `node` passes on, looking through shape-only ops."""
    while _is_shape_op(traced, node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _activation_inputs(traced, node) -> list:
    """The tensor inputs of an integer op that are activations (a conv's or linear's weight is not)."""
    if node.op == "call_module" or node.target in ONE_INPUT_FUNCTIONS:
        return [node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else []
    if node.target is torch.cat:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", [])
        return [t for t in tensors if isinstance(t, fx.Node)]
    return [a for a in node.args[:2] if isinstance(a, fx.Node)]  # add: both operands (a constant is not a point)


def trace(model: nn.Module):
    """torch.fx's GraphModule of `model`, or None when torch.fx cannot trace it."""
    try:
        return fx.symbolic_trace(model)
    except Exception:  # control flow on values, unsupported ops: fall back to layer inputs
        return None


def graph_points(traced) -> list:
    """The names of the nodes whose outputs an integer op reads (through shape-only ops), in graph order."""
    points = set()
    for node in traced.graph.nodes:
        if _is_integer_op(traced, node):
            points.update(_source(traced, value).name for value in _activation_inputs(traced, node))
    return [node.name for node in traced.graph.nodes if node.name in points]


def layer_inputs(traced) -> dict:
    """{Linear/Conv module name: the point its input is rounded at} of a traced model."""
    return {node.target: _source(traced, node.args[0]).name for node in traced.graph.nodes
            if node.op == "call_module" and isinstance(_module(traced, node), MODULE_KINDS)}


def quantizable_modules(model: nn.Module, layers) -> dict:
    """{module name: module} of the layers (capture.Layer) whose weight is a Linear/Conv module's `weight`."""
    modules = {}
    for layer in layers:
        if layer.parameter.endswith(".weight") or layer.parameter == "weight":
            name = layer.parameter[:-len(".weight")] if "." in layer.parameter else ""
            module = model.get_submodule(name)
            if isinstance(module, MODULE_KINDS):
                modules[name] = module
    return modules


class _Range:
    """Running min and max of the values seen (a calibration observer)."""

    def __init__(self):
        self.low, self.high = float("inf"), float("-inf")

    def __call__(self, x):
        x = x.detach()
        self.low, self.high = min(self.low, float(x.min())), max(self.high, float(x.max()))
        return x


def _observing(observe):
    """A forward pre-hook that shows the module's input to `observe` and leaves it as it is."""
    def hook(module, args):
        observe(args[0])
    return hook


class _Observed(fx.Interpreter):
    """Runs a traced model, feeding each point's output to its _Range."""

    def __init__(self, traced, ranges):
        super().__init__(traced)
        self.ranges = ranges

    def run_node(self, node):
        value = super().run_node(node)
        if node.name in self.ranges:
            self.ranges[node.name](value)
        return value


@torch.no_grad()
def calibrate(model: nn.Module, layers, chunks, bits: int) -> "ActivationQuantizers":
    """The grids of `model`'s points from the min and max of each over the image `chunks`, run in the float model.
    layers: the quantized layers (capture.Layer); used only when the model cannot be traced (layer-input points)."""
    traced = trace(model)
    if traced is not None:
        ranges = {name: _Range() for name in graph_points(traced)}
        interpreter = _Observed(traced, ranges)
        for images in chunks:
            run(lambda *inputs: interpreter.run(*inputs), images)
        at = "output"
    else:
        ranges, handles = {}, []
        for name, module in quantizable_modules(model, layers).items():
            ranges[name] = _Range()
            handles.append(module.register_forward_pre_hook(_observing(ranges[name])))
        try:
            for images in chunks:
                run(model, images)
        finally:
            for handle in handles:
                handle.remove()
        at = "input"
    return ActivationQuantizers({name: grid_of(r.low, r.high, bits) for name, r in ranges.items()
                                 if r.low <= r.high}, at)


class ActivationQuantizers:
    """A quantized model's activation grids and where they round: at = 'output' (torch.fx node names: the model's
    forward becomes its graph with a rounding after each point) or 'input' (Linear/Conv module names: forward
    pre-hooks). `install(model)` / `remove()`."""

    def __init__(self, scales: dict, at: str = "input"):
        self.scales = dict(scales)  # {point: ActScale}
        self.at = at
        self.handles, self.models = [], []

    def rounded_graph(self, model: nn.Module) -> fx.GraphModule:
        """`model`'s fx graph with a rounding node after each point (its modules are `model`'s own)."""
        traced = fx.symbolic_trace(model)
        graph = traced.graph
        for node in list(graph.nodes):
            grid = self.scales.get(node.name)
            if grid is None:
                continue
            with graph.inserting_after(node):
                rounded = graph.call_function(round_point, (node, grid.scale, grid.zero_point, grid.bits))
            node.replace_all_uses_with(rounded, delete_user_cb=lambda user: user is not rounded)
        graph.lint()
        return fx.GraphModule(model, graph, class_name=type(model).__name__)

    def install(self, model: nn.Module) -> "ActivationQuantizers":
        if self.at == "output":  # fx traces type(model).forward: an earlier install is not traced into this one
            model.forward = self.rounded_graph(model).forward
            self.models.append(model)
            return self
        for name, grid in self.scales.items():
            def hook(module, args, grid=grid):
                return (round_point(args[0], grid.scale, grid.zero_point, grid.bits),) + tuple(args[1:])
            self.handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        return self

    def remove(self) -> None:
        for model in self.models:
            if "forward" in vars(model):
                del model.forward
        for handle in self.handles:
            handle.remove()
        self.handles, self.models = [], []

    def input_grids(self, model: nn.Module) -> dict:
        """{Linear/Conv module name: the grid its input is rounded on} (the bias scale of an integer layer)."""
        if self.at == "input":
            return dict(self.scales)
        # fx traces type(model).forward: the model's own graph, whether or not the rounded forward is installed
        points = layer_inputs(fx.symbolic_trace(model))
        return {name: self.scales[point] for name, point in points.items() if point in self.scales}

    @classmethod
    def from_dict(cls, entries: dict) -> "ActivationQuantizers":
        """The inverse of `as_dict` (a file written before the graph points rounds at layer inputs)."""
        at = {e.get("at", "input") for e in entries.values()} or {"input"}
        return cls({name: ActScale(float(e["scale"]), int(e["zero_point"]), int(e["bits"]))
                    for name, e in entries.items()}, at.pop())

    def as_dict(self) -> dict:
        """{point: {scale, zero_point, bits, at}}, JSON-ready (the model file's header)."""
        return {name: {"scale": g.scale, "zero_point": g.zero_point, "bits": g.bits, "at": self.at}
                for name, g in self.scales.items()}
