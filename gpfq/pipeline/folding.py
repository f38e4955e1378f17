"""BatchNorm folding before quantization (the 2023 code's option), with torch's own fusion.

Conv2d→BatchNorm2d and Linear→BatchNorm1d pairs are found in the model's traced graph
(torch.fx): a normalization whose input is a layer's output that nothing else reads. Each
pair is fused by torch.nn.utils.fusion (the layer gains the folded bias) and the normalization
becomes an Identity, so module names, and hence layer names and order, stay as they were.
"""
import copy
from collections import Counter

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

FUSIONS = ((nn.Conv2d, nn.BatchNorm2d, fuse_conv_bn_eval), (nn.Linear, nn.BatchNorm1d, fuse_linear_bn_eval))


def foldable_pairs(model: nn.Module) -> list:
    """[(layer name, norm name)] of the layer→BatchNorm pairs that can be folded, in graph order."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as error:  # control flow fx cannot trace
        raise ValueError(f"fold_batchnorm: torch.fx could not trace {type(model).__name__} to find the "
                         f"layer→BatchNorm pairs ({type(error).__name__}: {error}); set fold_batchnorm=False") from error
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        # a module called twice would be folded for both uses: leave it alone
        if calls[node.target] != 1 or calls[source.target] != 1:
            continue
        norm, layer = modules[node.target], modules[source.target]
        if any(type(layer) is layer_type and type(norm) is norm_type and norm.track_running_stats
               for layer_type, norm_type, _ in FUSIONS):
            pairs.append((source.target, node.target))
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fold_batchnorm(model: nn.Module):
    """A copy of `model` (eval mode) with every foldable BatchNorm folded into its layer.

    Returns (folded model, [(layer name, norm name)] folded).
    """
    folded = copy.deepcopy(model).eval()
    pairs = foldable_pairs(folded)
    for layer_name, norm_name in pairs:
        layer, norm = folded.get_submodule(layer_name), folded.get_submodule(norm_name)
        fuse = next(f for layer_type, norm_type, f in FUSIONS if type(layer) is layer_type)
        _set_submodule(folded, layer_name, fuse(layer, norm))
        _set_submodule(folded, norm_name, nn.Identity())
    return folded, pairs
