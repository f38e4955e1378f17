import pytest
import torch
from torch import nn

from gpfq.pipeline.discovery import layers_in_execution_order
from gpfq.pipeline.rows import conv_patches, layer_rows, patch_indices


def test_patch_shapes_and_channel_major_order():
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1, dilation=2)
    images = torch.randn(2, 3, 11, 11)
    patches = conv_patches(images, conv)  # stride = kernel size
    side = (11 + 2 * 1 - 2 * (3 - 1) - 1) // 3 + 1
    assert patches.shape == (2, side * side, 3 * 9)
    # patch (0, 0) at stride = kernel: rows -1, 1, 3 and cols -1, 1, 3 of the zero-padded image
    padded = nn.functional.pad(images, (1, 1, 1, 1))
    expected = padded[0, :, 0:5:2, 0:5:2].reshape(-1)
    assert torch.equal(patches[0, 0], expected)


@pytest.mark.parametrize("retain_rate,n_patches", [(0.25, 100), (0.5, 37), (1.0, 49)])
def test_patches_kept_per_image(retain_rate, n_patches):
    index = patch_indices(4, n_patches, retain_rate, torch.Generator().manual_seed(0))
    expected = n_patches if retain_rate == 1.0 else int(retain_rate * n_patches + 1)
    assert index.shape == (4, expected)
    assert int(index.min()) >= 0 and int(index.max()) < n_patches
    if retain_rate == 1.0:
        assert torch.equal(index[0], torch.arange(n_patches))


def test_same_patch_indices_for_analog_and_quantized_inputs():
    conv = nn.Conv2d(2, 4, kernel_size=3, padding=1)
    analog = torch.randn(3, 2, 12, 12)
    quantized = 2.0 * analog  # a row of X̃ must be exactly twice the matching row of X
    rows, rows_q = layer_rows(conv, analog, quantized, 0.25, torch.Generator().manual_seed(0))
    assert rows.shape == (3 * int(0.25 * 16 + 1), 18)
    assert torch.equal(rows_q, 2.0 * rows)


def test_rows_reproduce_the_convolution():
    """With the layer's stride and every patch kept, rows @ Wᵀ are the conv outputs (per group)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=2, dilation=2, groups=2, bias=False)
    images = torch.randn(2, 4, 10, 10)
    rows, _ = layer_rows(conv, images, images, 1.0, torch.Generator(), patch_stride="layer")
    output = conv(images)  # (2, 6, h, w)
    per_group_in = rows.shape[1] // 2
    weight = conv.weight.reshape(6, -1)
    for g in range(2):
        got = rows[:, g * per_group_in:(g + 1) * per_group_in] @ weight[g * 3:(g + 1) * 3].T
        expected = output[:, g * 3:(g + 1) * 3].permute(0, 2, 3, 1).reshape(-1, 3)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_layers_found_in_execution_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)  # declared first, runs last
            self.unused = nn.Linear(3, 3)
            self.body = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.head(self.body(x).flatten(1)[:, :8])

    assert layers_in_execution_order(Net(), torch.randn(1, 1, 5, 5)) == ["body", "head"]
