"""Layer discovery and layer-input capture.

Layers are found from the model itself: forward pre-hooks on every Conv2d and
Linear record the order in which one forward pass first calls them. Inputs are
captured with a pre-hook that stops the forward pass at the layer, so nothing
after it is computed.
"""
import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import BadInputError
from .threads import single_thread

QUANTIZABLE = (nn.Conv2d, nn.Linear)


class _StopForward(Exception):
    pass


class NonFiniteError(BadInputError, ValueError):
    """A weight, buffer or layer input holds NaN or Inf."""


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError saying `what` holds how many NaN and Inf values."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"{what} contains {int(torch.isnan(tensor).sum())} NaN and "
                             f"{int(torch.isinf(tensor).sum())} Inf values")


@torch.no_grad()
def check_model_finite(model: nn.Module, example_input: torch.Tensor) -> None:
    """NonFiniteError naming the first parameter or buffer, or else the first Conv2d/Linear input on
    `example_input`, that holds NaN or Inf (a NaN BatchNorm statistic shows up at the next layer's input)."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        check_finite(tensor, f"{name} of the float model")
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZABLE):
            def check(_module, inputs, name=name):
                check_finite(inputs[0], f"the input of layer {name} in the float model (on one calibration image)")
            handles.append(module.register_forward_pre_hook(check))
    try:
        output = model(example_input)
        if isinstance(output, torch.Tensor):
            check_finite(output, "the float model's output (on one calibration image)")
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def layers_in_execution_order(model: nn.Module, example_input: torch.Tensor) -> list:
    """Names of the Conv2d/Linear modules in the order one forward pass first calls them.

    Modules the forward pass never calls (e.g. GoogLeNet's auxiliary heads in eval mode)
    are left out, so they stay float.
    """
    order = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZABLE):
            def record(_module, _inputs, name=name):
                if name not in order:
                    order.append(name)
            handles.append(module.register_forward_pre_hook(record))
    try:
        model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return order


@torch.no_grad()
def capture_input(model: nn.Module, layer_name: str, images: torch.Tensor) -> torch.Tensor:
    """The input tensor that `layer_name` receives when `model` runs on `images`."""
    module = model.get_submodule(layer_name)
    captured = []

    def stop(_module, inputs):
        captured.append(inputs[0].detach())
        raise _StopForward

    handle = module.register_forward_pre_hook(stop)
    try:
        model(images)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"layer {layer_name!r} was not called by the forward pass")
    return captured[0]


def _conv_padding(conv: nn.Conv2d):
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return conv.padding


def conv_patches(inputs: torch.Tensor, conv: nn.Conv2d, stride: str = "kernel") -> torch.Tensor:
    """Unfold (n, C_in, H, W) into patches (n, L, C_in·kh·kw), channel-major like conv.weight.

    stride='kernel' uses non-overlapping patches (stride = kernel size, the paper's
    choice); stride='layer' uses the layer's own stride.
    """
    if stride not in ("kernel", "layer"):
        raise ValueError(f"patch stride must be 'kernel' or 'layer', got {stride!r}")
    step = conv.kernel_size if stride == "kernel" else conv.stride
    patches = F.unfold(inputs, conv.kernel_size, dilation=conv.dilation, padding=_conv_padding(conv), stride=step)
    return patches.transpose(1, 2)


def patch_indices(n_images: int, n_patches: int, retain_rate: float, generator: torch.Generator) -> torch.Tensor:
    """(n_images, k) patch indices per image: k = int(p·L + 1) drawn with replacement, or all L if p = 1."""
    if not 0.0 < retain_rate <= 1.0:
        raise ValueError(f"retain_rate must be in (0, 1], got {retain_rate}")
    if retain_rate == 1.0:
        return torch.arange(n_patches).expand(n_images, n_patches)
    k = int(retain_rate * n_patches + 1)
    return torch.randint(0, n_patches, (n_images, k), generator=generator)


def patch_grid(conv: nn.Conv2d, height: int, width: int, stride: str = "kernel"):
    """Patches per column and per row, (n_h, n_w), of an unpadded height × width input."""
    step_h, step_w = conv.kernel_size if stride == "kernel" else conv.stride
    pad_h, pad_w = _conv_padding(conv)
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    return ((height + 2 * pad_h - dh * (kh - 1) - 1) // step_h + 1,
            (width + 2 * pad_w - dw * (kw - 1) - 1) // step_w + 1)


def selected_patches(inputs: torch.Tensor, conv: nn.Conv2d, index: torch.Tensor, stride: str = "kernel"):
    """Rows of the patches `index` (n, k) of each image: (n·k, C_in·kh·kw), as `conv_patches` orders them.

    Reads the patches through a strided view of the padded input, so only the k kept patches
    are copied (`conv_patches` unfolds all L of them first).
    """
    step_h, step_w = conv.kernel_size if stride == "kernel" else conv.stride
    pad_h, pad_w = _conv_padding(conv)
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    n_h, n_w = patch_grid(conv, inputs.shape[2], inputs.shape[3], stride)
    padded = F.pad(inputs, (pad_w, pad_w, pad_h, pad_h)) if pad_h or pad_w else inputs.contiguous()
    n, channels = padded.shape[:2]
    s_n, s_c, s_h, s_w = padded.stride()
    # (n, n_h, n_w, C, kh, kw): patch (i, j) starts at row i·step_h, column j·step_w.
    patches = padded.as_strided((n, n_h, n_w, channels, kh, kw),
                                (s_n, s_h * step_h, s_w * step_w, s_c, s_h * dh, s_w * dw))
    images = torch.arange(n, device=index.device).unsqueeze(1)
    return patches[images, index // n_w, index % n_w].reshape(-1, channels * kh * kw)


def layer_rows(layer: nn.Module, analog: torch.Tensor, quantized: torch.Tensor, retain_rate: float,
               generator: torch.Generator, patch_stride: str = "kernel"):
    """Turn captured layer inputs into the rows X, X̃ (rows, N0_total) the quantizer sees.

    Conv2d: patches, subsampled per image with the same indices for X and X̃.
    Linear: every leading position is a row.
    """
    if isinstance(layer, nn.Conv2d):
        if patch_stride not in ("kernel", "layer"):
            raise ValueError(f"patch stride must be 'kernel' or 'layer', got {patch_stride!r}")
        n_h, n_w = patch_grid(layer, analog.shape[2], analog.shape[3], patch_stride)
        index = patch_indices(analog.shape[0], n_h * n_w, retain_rate, generator).to(analog.device)
        with single_thread():  # memory-bound copies
            analog_rows = selected_patches(analog, layer, index, patch_stride)
            quantized_rows = selected_patches(quantized, layer, index, patch_stride)
        return analog_rows, quantized_rows
    width = layer.in_features
    return analog.reshape(-1, width), quantized.reshape(-1, width)


def grouped(layer: nn.Module, weight: torch.Tensor, rows: torch.Tensor = None):
    """Split a layer's reshaped weight (N1_total, N0) and rows (m, G·N0) per group.

    Returns weight (G, N1, N0) and rows (G, m, N0); group g owns output channels
    [g·N1, (g+1)·N1) and input columns [g·N0, (g+1)·N0).
    """
    groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
    n_out, width = weight.shape
    weight_groups = weight.reshape(groups, n_out // groups, width)
    if rows is None:
        return weight_groups
    rows_groups = rows.reshape(rows.shape[0], groups, width).permute(1, 0, 2)
    return weight_groups, rows_groups


def flat_weight(layer: nn.Module) -> torch.Tensor:
    """Weight as (N1_total, N0) with N0 = C_in/groups·kh·kw for convolutions."""
    return layer.weight.detach().reshape(layer.weight.shape[0], -1)


def trace_graph(model: nn.Module):
    """The torch.fx graph of `model`'s forward pass; ValueError if fx cannot trace it."""
    try:
        return fx.symbolic_trace(model).graph
    except Exception as error:  # fx raises several kinds (TraceError, TypeError, …) on dynamic control flow
        raise ValueError(f"calibration='fixed' runs the model layer by layer through its torch.fx graph, and "
                         f"{type(model).__name__} cannot be traced ({type(error).__name__}: {error}); "
                         f"use calibration='fresh'") from error


class CachedForward:
    """One model's forward pass over fixed image chunks, run node by node up to each layer in turn.

    `inputs_of(name)` advances from where the last call stopped to the layer's call and returns
    its input for every chunk. The values later nodes still need stay cached, so visiting all
    layers costs one forward pass (linear in depth) instead of one partial pass per layer. The
    layer itself runs on the next advance, so a weight written in between (its quantization) is
    what the following layers see.
    """

    def __init__(self, model: nn.Module, graph, chunks):
        self.model = model
        self.nodes = list(graph.nodes)
        self.position = 0
        order = {node: i for i, node in enumerate(self.nodes)}
        # A value can be dropped once the last node that reads it has run.
        self.last_reader = {node: max((order[user] for user in node.users), default=order[node])
                            for node in self.nodes}
        placeholders = [node for node in self.nodes if node.op == "placeholder"]
        self.environments = []
        for images in chunks:
            environment = {placeholders[0]: images}
            for extra in placeholders[1:]:  # further forward arguments keep their defaults
                environment[extra] = extra.args[0] if extra.args else None
            self.environments.append(environment)

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
            value = self.model
            for part in node.target.split("."):
                value = getattr(value, part)
            return value
        raise RuntimeError(f"unexpected fx node {node.format_node()}")

    @torch.no_grad()
    def inputs_of(self, layer_name: str) -> list:
        """The input of `layer_name` for every chunk, after running every node before its call."""
        stop = next((i for i in range(self.position, len(self.nodes))
                     if self.nodes[i].op == "call_module" and self.nodes[i].target == layer_name), None)
        if stop is None:
            raise RuntimeError(f"layer {layer_name!r} is not called after the layers already visited")
        for environment in self.environments:
            for index in range(self.position, stop):
                node = self.nodes[index]
                if node.op in ("placeholder", "output"):
                    continue
                environment[node] = self._run(node, environment)
                for read in list(node.all_input_nodes) + [node]:
                    if self.last_reader[read] <= index and read.op != "placeholder":
                        environment.pop(read, None)
            # placeholders are read by the first nodes; drop them once those have run
            for node in [n for n in environment if n.op == "placeholder" and self.last_reader[n] < stop]:
                environment.pop(node)
        self.position = stop
        layer_input = self.nodes[stop].args[0]
        return [environment[layer_input] for environment in self.environments]
