"""Rows: X and X̃ (rows, N0) from a layer's captured inputs, and the layer's weight as the rules see it.

Convolution: patches, subsampled per image with the same indices for X and X̃ (docs/capture.md);
linear map: every leading position is a row. Weights are flat (N1_total, N0) and grouped (G, N1, N0).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from gpfq.pipeline.capture import ConvGeometry, Layer, LayerInput, Use, is_conv, owner_of
from gpfq.threads import single_thread


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
    return model.get_submodule(owner_of(layer.parameter)[0])
