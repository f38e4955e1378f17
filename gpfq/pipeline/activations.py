"""Quantized activations: a calibrated scale per quantized layer input, and fake quantization there.

With `QuantConfig(act_bits=b)`, the input of every quantized Linear / Conv1d/2d/3d module is rounded onto an
unsigned b-bit grid with a zero point (ONNX QuantizeLinear's uint8 convention at b = 8):

    q = clamp(round(x / s) + z, 0, 2^b − 1),   x̂ = (q − z) · s

one (s, z) per layer input (per tensor: QLinearConv and QLinearMatMul take one activation scale). The scale is
calibrated on the float network before any weight is quantized, from the min and max of the input over the
calibration images ('minmax'): the grid spans [min(lo, 0), max(hi, 0)], so 0 is exact (zero padding stays 0).

The quantizers are forward pre-hooks on the layers' modules: the op's input is the fake-quantized tensor, so
what `capture` records as X̃ in the quantized network is what the deployed integer model sees, while the float
("analog") network keeps X. Weights that are not a Linear/Conv module's `weight` (a bare matmul, attention's
in_proj_weight) keep float inputs.
"""
from dataclasses import dataclass

import torch
from torch import nn

from gpfq.pipeline.inputs import run

ACT_CALIBRATIONS = ("minmax",)
ACT_GRANULARITIES = ("tensor",)
MODULE_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class ActScale:
    """One layer input's grid: x̂ = (q − zero_point) · scale, q an integer in [0, 2^bits − 1]."""
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


@torch.no_grad()
def calibrate(model: nn.Module, module_names, chunks, bits: int) -> dict:
    """{module name: ActScale} from the min and max of each module's input over the image `chunks` in `model`."""
    low, high, handles = {}, {}, []

    def observer(name):
        def hook(module, args):
            x = args[0].detach()
            low[name] = min(low.get(name, float("inf")), float(x.min()))
            high[name] = max(high.get(name, float("-inf")), float(x.max()))
        return hook
    for name in module_names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(observer(name)))
    try:
        for images in chunks:
            run(model, images)
    finally:
        for handle in handles:
            handle.remove()
    return {name: grid_of(low[name], high[name], bits) for name in module_names if name in low}


class ActivationQuantizers:
    """The activation grids of a quantized model, as forward pre-hooks on its modules (`install`, `remove`)."""

    def __init__(self, scales: dict):
        self.scales = dict(scales)  # {module name: ActScale}
        self.handles = []

    def install(self, model: nn.Module) -> "ActivationQuantizers":
        for name, grid in self.scales.items():
            def hook(module, args, grid=grid):
                x = args[0]
                rounded = fake_quantize(x, grid)
                if torch.is_grad_enabled() and x.requires_grad:  # retraining: a straight-through gradient
                    rounded = x + (rounded - x).detach()
                return (rounded,) + tuple(args[1:])
            self.handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        return self

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @classmethod
    def from_dict(cls, entries: dict) -> "ActivationQuantizers":
        """The inverse of `as_dict`."""
        return cls({name: ActScale(float(e["scale"]), int(e["zero_point"]), int(e["bits"]))
                    for name, e in entries.items()})

    def as_dict(self) -> dict:
        """{module name: {scale, zero_point, bits}}, JSON-ready (the model file's header)."""
        return {name: {"scale": g.scale, "zero_point": g.zero_point, "bits": g.bits} for name, g in self.scales.items()}
