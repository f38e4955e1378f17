"""Loading a saved state dict into a model the way the scripts changed it (used by every model loader)."""
import torch
from torch import nn


def add_missing_biases(model: nn.Module, state: dict) -> None:
    """Give each Linear or convolution of `model` that has no bias, but whose saved `state` has one (bias
    correction adds it), a zero bias, so that the state fits."""
    own = model.state_dict()
    for key, value in state.items():
        if not key.endswith(".bias") or key in own:
            continue
        try:
            module = model.get_submodule(key[: -len(".bias")])
        except AttributeError:  # no such module: the caller's strict load names the key
            continue
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(value), requires_grad=module.weight.requires_grad)


def load_state(model: nn.Module, state: dict) -> nn.Module:
    """Load a saved state dict into `model` (in place, strictly), fitting the model to what the scripts change:
    a Linear or convolution without a bias whose saved state has one gets a (zero) bias first, and a BatchNorm
    none of whose entries were saved (folded into its layer) becomes an Identity."""
    add_missing_biases(model, state)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and name:
            entries = [f"{name}.{key}" for key in module.state_dict()]
            if entries and not any(entry in state for entry in entries):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    model.load_state_dict(state)
    return model
