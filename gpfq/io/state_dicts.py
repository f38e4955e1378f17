"""Loading a saved state dict into a model the way the scripts changed it (used by every model loader)."""
import torch
from torch import nn

from gpfq.errors import BadInputError

# How many key names a mismatch message shows of each kind (the counts are always given).
SHOWN_KEYS = 4


class StateDictMismatchError(BadInputError, ValueError):
    """A saved state dict whose keys or shapes are not the model's (another architecture)."""


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


def _first(keys: list) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (", …" if len(keys) > SHOWN_KEYS else "")


def mismatch(own: dict, state: dict) -> str:
    """What keeps `state` from loading strictly into a model whose state dict is `own` ('' if nothing): the
    first few missing and unexpected keys and wrong shapes, with their counts, in one line."""
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    wrong = [f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
             for key, value in own.items() if key in state and tuple(state[key].shape) != tuple(value.shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(own)} keys are missing ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} of the file's {len(state)} keys are unexpected ({_first(unexpected)})")
    if wrong:
        parts.append(f"{len(wrong)} keys have another shape (file vs model: {_first(wrong)})")
    return "; ".join(parts)


def load_state(model: nn.Module, state: dict, source: str = "the state dict", name: str = None) -> nn.Module:
    """Load a saved state dict into `model` (in place, strictly), fitting the model to what the scripts change:
    a Linear or convolution without a bias whose saved state has one gets a (zero) bias first, and a BatchNorm
    none of whose entries were saved (folded into its layer) becomes an Identity. A state of another
    architecture is a StateDictMismatchError naming `source`, the model `name` and the first keys."""
    unfitted = model.state_dict()
    add_missing_biases(model, state)
    for module_name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module_name:
            entries = [f"{module_name}.{key}" for key in module.state_dict()]
            if entries and not any(entry in state for entry in entries):
                parent, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    own = model.state_dict()
    # Checked here, since torch's own error is many lines and names no file. A state sharing no key with the
    # model is another architecture: compared with the model as built, not with its BatchNorms folded away.
    problem = mismatch(own if set(own) & set(state) else unfitted, state)
    if problem:
        raise StateDictMismatchError(f"{source} does not fit model {name or type(model).__name__!r}: {problem}")
    model.load_state_dict(state)
    return model
