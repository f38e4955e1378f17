import numpy as np
import pytest
import torch

from gpfq.methods.alphabet import layer_radius, make_alphabet, round_to_alphabet


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_gpfq2022_alphabet_is_scaled_linspace_with_zero(bits):
    levels = make_alphabet("gpfq2022", bits, scalar=1.5, radius=0.4)
    expected = sorted(set(np.round(np.linspace(-1, 1, 2 ** bits) * 0.6, 12)) | {0.0})
    assert levels.numel() == 2 ** bits + 1
    np.testing.assert_allclose(levels.numpy(), expected, rtol=0, atol=1e-12)
    without_zero = make_alphabet("gpfq2022", bits, 1.5, 0.4, include_zero=False)
    assert without_zero.numel() == 2 ** bits and 0.0 not in without_zero.tolist()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_midtread_and_strict_grids(bits):
    half = 2 ** (bits - 1)
    delta = 2.0 * 0.5 / half
    midtread = make_alphabet("midtread", bits, 2.0, 0.5)
    assert midtread.numel() == 2 ** bits + 1
    np.testing.assert_allclose(midtread.numpy(), np.arange(-half, half + 1) * delta, atol=1e-12)
    strict = make_alphabet("strict", bits, 2.0, 0.5)
    assert strict.numel() == 2 ** bits
    np.testing.assert_allclose(strict.numpy(), np.arange(-half, half) * delta, atol=1e-12)


def test_radius_is_mean_of_row_quantiles():
    torch.manual_seed(0)
    weight = torch.randn(7, 50)
    for percentile in (0.5, 0.9, 0.999):
        expected = np.mean([np.quantile(np.abs(row), percentile) for row in weight.numpy().astype(np.float64)])
        assert layer_radius(weight, percentile) == pytest.approx(expected, rel=1e-9)
    assert layer_radius(weight, 1.0) == pytest.approx(weight.abs().max(dim=1).values.double().mean().item(), rel=1e-9)
    with pytest.raises(ValueError):
        layer_radius(weight, 0.0)


def test_round_to_alphabet_is_nearest_level():
    torch.manual_seed(1)
    alphabet = make_alphabet("gpfq2022", 3, 1.0, 1.0)
    values = torch.randn(1000, dtype=torch.float64) * 1.5
    brute = alphabet[(values[:, None] - alphabet[None, :]).abs().argmin(dim=1)]
    assert torch.equal(round_to_alphabet(values, alphabet), brute)
    # per-row alphabets (G, N1, L): each row rounds to its own scaled grid
    scales = torch.tensor([[0.5, 2.0, 1.0]], dtype=torch.float64)
    rows = scales[..., None] * alphabet
    values = torch.randn(1, 3, 20, dtype=torch.float64)
    rounded = round_to_alphabet(values, rows)
    for j in range(3):
        grid = rows[0, j]
        expected = grid[(values[0, j][:, None] - grid[None, :]).abs().argmin(dim=1)]
        assert torch.equal(rounded[0, j], expected)
