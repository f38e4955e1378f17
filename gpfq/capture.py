"""Layer discovery and layer-input capture.

Layers are found from the model itself: forward pre-hooks on every Conv2d and
Linear record the order in which one forward pass first calls them. Inputs are
captured with a pre-hook that stops the forward pass at the layer, so nothing
after it is computed.
"""
import torch
import torch.nn.functional as F
from torch import nn

QUANTIZABLE = (nn.Conv2d, nn.Linear)


class _StopForward(Exception):
    pass


class NonFiniteError(ValueError):
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


def layer_rows(layer: nn.Module, analog: torch.Tensor, quantized: torch.Tensor, retain_rate: float,
               generator: torch.Generator, patch_stride: str = "kernel"):
    """Turn captured layer inputs into the rows X, X̃ (rows, N0_total) the quantizer sees.

    Conv2d: patches, subsampled per image with the same indices for X and X̃.
    Linear: every leading position is a row.
    """
    if isinstance(layer, nn.Conv2d):
        analog_patches = conv_patches(analog, layer, patch_stride)
        quantized_patches = conv_patches(quantized, layer, patch_stride)
        n_images, n_patches, width = analog_patches.shape
        index = patch_indices(n_images, n_patches, retain_rate, generator)
        index = index.unsqueeze(2).expand(-1, -1, width)
        analog_rows = analog_patches.gather(1, index).reshape(-1, width)
        quantized_rows = quantized_patches.gather(1, index).reshape(-1, width)
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
