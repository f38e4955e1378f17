"""The vectorized layer quantizer against the per-column specification."""
import pytest
import torch
from torch import nn

from gpfq import QuantConfig
from gpfq.methods.alphabet import layer_radius, make_alphabet
from gpfq.methods.gpfq.reference import gpfq_columns, gpfq_reference, relative_error
from helpers import layer_input_rows, quantized_layer


def _alphabet(weight, bits=3):
    return make_alphabet("gpfq2022", bits, 1.2, layer_radius(weight, 1.0))


def test_linear_equals_reference():
    torch.manual_seed(0)
    weight = torch.randn(12, 40)
    analog = torch.randn(60, 40)
    quantized = analog + 0.1 * torch.randn(60, 40)
    quantized[:, 7] = 0.0  # ||X̃_t|| = 0: the argument is 0 by definition
    alphabet = _alphabet(weight)
    expected = gpfq_reference(weight, analog, quantized, alphabet)
    exact = gpfq_columns(weight.double()[None], analog[None], quantized[None], alphabet, dtype=torch.float64)[0]
    assert torch.equal(exact, expected)
    fast = gpfq_columns(weight[None], analog[None], quantized[None], alphabet)[0]
    assert (fast == expected.float()).float().mean() >= 0.995
    error_fast = relative_error(weight[None], fast[None], analog[None], quantized[None])
    error_ref = relative_error(weight[None], expected[None].float(), analog[None], quantized[None])
    assert abs(error_fast - error_ref) < 1e-4
    # the argument of a zero column is 0: its quantized weight is the level nearest 0
    assert torch.all(expected[:, 7] == 0.0)


@pytest.mark.parametrize("padding,dilation,stride,groups,patch_stride", [
    (0, 1, 1, 1, "kernel"),
    (1, 1, 2, 1, "kernel"),
    (2, 2, 1, 1, "layer"),
    (1, 1, 1, 2, "kernel"),
    (1, 1, 2, 6, "layer"),  # depthwise
])
def test_conv_equals_reference_per_group(padding, dilation, stride, groups, patch_stride):
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 6 if groups == 6 else 4 * (groups if groups > 1 else 1), 3, stride=stride,
                     padding=padding, dilation=dilation, groups=groups)
    analog_images = torch.randn(3, 6, 11, 11)
    quantized_images = analog_images + 0.1 * torch.randn_like(analog_images)
    analog_rows, quantized_rows = layer_input_rows(conv, analog_images, quantized_images, 0.5,
                                                   torch.Generator().manual_seed(0), patch_stride)
    settings = QuantConfig(method="gpfq", bits=3, mlp_scalar=1.2, cnn_scalar=1.2)
    _, q, _, _, alphabet, _ = quantized_layer(conv, analog_rows, quantized_rows, settings)
    weight = conv.weight.detach().reshape(conv.out_channels, -1)
    n_in, n_out = weight.shape[1], conv.out_channels // groups
    q = q.reshape(conv.out_channels, -1)
    agreement = []
    for g in range(groups):
        cols = slice(g * n_in, (g + 1) * n_in)
        expected = gpfq_reference(weight[g * n_out:(g + 1) * n_out], analog_rows[:, cols], quantized_rows[:, cols],
                                  alphabet)
        agreement.append((q[g * n_out:(g + 1) * n_out] == expected.float()).float().mean())
    assert min(agreement) >= 0.995
