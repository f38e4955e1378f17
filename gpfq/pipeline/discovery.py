"""Layer discovery: which of a model's parameters are layers, in order of first use (docs/capture.md).

Layers are ordered by first use; a weight used several times is one layer whose rows are stacked over its uses.
Every other parameter (norms, embeddings, tokens, scales, bias tables, biases) stays float by design;
`coverage.Coverage` counts what was quantized and what not, from the `Discovery` made here.
"""
from dataclasses import dataclass

import torch
from torch import nn

from gpfq.pipeline.capture import Layer, WeightUses, check_finite, owner_of
from gpfq.pipeline.inputs import run

# A parameter of one of these module types is meant to be a matmul weight: if the forward pass reads it
# some other way (transformed first, sliced, einsum), coverage counts it as a weight that stayed float.
WEIGHT_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)
# LSTM, GRU and RNN multiply their weight_ih_l*, weight_hh_l* (and weight_hr_l*) inside one fused op, whose rows
# gpfq does not build: they are counted as matmul weights that stay float, so a recurrent model is warned about.
RECURRENT_MODULES = (nn.RNNBase,)
RECURRENT_REASON = "recurrent weight of {kind}: multiplied inside its fused op, which gpfq does not quantize"


@dataclass
class Discovery:
    """What one forward pass does with a model's parameters."""
    layers: list  # [Layer], in order of first use
    unsupported: dict  # parameter name -> why it is multiplied but not quantized
    other_uses: dict  # parameter name -> {op names} for parameters read but not multiplied as a weight
    sizes: dict  # parameter name -> number of elements (every parameter, shared ones once)
    weight_parameters: set  # parameters of WEIGHT_MODULES named 'weight' or '*_proj_weight'


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
        module_name, leaf = owner_of(name)
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
