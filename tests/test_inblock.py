"""The in-block sequential step: the compiled kernel against the torch version and a plain loop, and its rounding
against the one vectorized definition, `gpfq.methods.rounding`, which the kernel mirrors."""
import pytest
import torch

from gpfq.methods.alphabet import channel_alphabets, make_alphabet, round_to_alphabet
from gpfq.methods.gpfq.inblock import LINEAR_SEARCH_MAX_MIDPOINTS, RoundingSettings, block_rounder, compiled_available
from gpfq.methods.rounding import (StochasticRounding, ThresholdedRounding, alphabet_midpoints, nearest_rounding,
                                   seeded_uniforms)


def _plain_loop(numerators, quantized_gram, alphabet):
    """The rule written out per group, column and neuron in float64: q_t = Q(a_t/d_t − Σ_{j<t} H[j,t]/d_t q_j)."""
    n_groups, n_columns, n_neurons = numerators.shape
    q = torch.zeros(n_groups, n_columns, n_neurons, dtype=torch.float64)
    for g in range(n_groups):
        for t in range(n_columns):
            d = float(quantized_gram[g, t, t])
            for n in range(n_neurons):
                levels = alphabet if alphabet.dim() == 1 else alphabet[g, n]
                if d <= 0:
                    argument = 0.0
                else:
                    argument = float(numerators[g, t, n]) / d
                    for j in range(t):
                        argument -= float(quantized_gram[g, j, t]) / d * float(q[g, j, n])
                q[g, t, n] = levels[torch.argmin((levels - argument).abs())]
    return q


def _block(n_groups, n_columns, n_neurons, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(n_groups, 3 * n_columns, n_columns, generator=generator, dtype=torch.float64).relu()
    rows[:, :, 1] = 0.0  # an empty column: argument 0
    quantized_gram = rows.transpose(1, 2) @ rows
    numerators = torch.randn(n_groups, n_columns, n_neurons, generator=generator, dtype=torch.float64)
    numerators *= torch.diagonal(quantized_gram, dim1=1, dim2=2).unsqueeze(2) / 3
    return numerators.to(dtype), quantized_gram.to(dtype)



def test_the_compiled_kernel_is_available():
    """numba is a requirement: the in-block kernel must compile here, not fall back silently."""
    assert compiled_available()


@pytest.mark.parametrize("bits", [2, 4, 8])  # 8 bits: 257 levels, past the linear search
@pytest.mark.parametrize("per_neuron", [False, True])

def test_compiled_kernel_equals_the_plain_loop_in_float64(bits, per_neuron):
    n_groups, n_columns, n_neurons = 3, 12, 5
    numerators, quantized_gram = _block(n_groups, n_columns, n_neurons, seed=bits, dtype=torch.float64)
    unit = make_alphabet("gpfq2022", bits, 1.0, 1.0)
    alphabet = unit * torch.linspace(0.5, 1.5, n_groups * n_neurons, dtype=torch.float64).reshape(
        n_groups, n_neurons, 1) if per_neuron else unit
    expected = _plain_loop(numerators, quantized_gram, alphabet)
    compiled = block_rounder(alphabet, n_groups, n_neurons, RoundingSettings(compiled=True))(numerators.clone(), quantized_gram)
    in_torch = block_rounder(alphabet, n_groups, n_neurons, RoundingSettings(compiled=False))(numerators.clone(), quantized_gram)
    assert torch.equal(compiled, expected)
    assert torch.equal(in_torch, expected)
    assert torch.all(expected[:, 1] == round_to_alphabet(torch.zeros(n_groups, n_neurons, dtype=torch.float64),
                                                          alphabet))
    assert (unit.numel() - 1 > LINEAR_SEARCH_MAX_MIDPOINTS) == (bits == 8)


def test_compiled_kernel_equals_torch_in_float32_on_a_large_block():
    numerators, quantized_gram = _block(2, 64, 96, seed=7, dtype=torch.float32)
    alphabet = make_alphabet("gpfq2022", 4, 1.0, 1.0).float()
    compiled = block_rounder(alphabet, 2, 96, RoundingSettings(compiled=True))(numerators.clone(), quantized_gram)
    in_torch = block_rounder(alphabet, 2, 96, RoundingSettings(compiled=False))(numerators.clone(), quantized_gram)
    assert compiled.dtype == torch.float32
    # the same operations in the same order; only a fused multiply-add could split a tie
    assert (compiled == in_torch).double().mean().item() >= 0.999


@pytest.mark.parametrize("per_neuron", [False, True])
def test_ties_go_to_the_smaller_level(per_neuron):
    """A value exactly between two levels rounds down, as `round_to_alphabet` (torch.bucketize) does."""
    alphabet = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    if per_neuron:
        alphabet = alphabet.expand(1, 4, 5).contiguous()
    numerators = torch.tensor([[[0.25, -0.25, 0.75, 2.0]]], dtype=torch.float64)  # d = 1: arguments as given
    quantized_gram = torch.ones(1, 1, 1, dtype=torch.float64)
    q = block_rounder(alphabet, 1, 4, RoundingSettings(compiled=True))(numerators, quantized_gram)
    assert q.tolist() == [[[0.0, -0.5, 0.5, 1.0]]]


def test_compiled_kernel_refuses_other_devices_clearly():
    alphabet = torch.tensor([-1.0, 0.0, 1.0], device="meta")
    with pytest.raises(ValueError, match="runs on the CPU"):
        block_rounder(alphabet, 1, 1, RoundingSettings(compiled=True))


# ---------------------------------------------------------------- the kernel mirrors the vectorized rounding module
def _edge_values(levels, lam):
    """Values (K,) that probe a rounding of `levels` (L,): the levels and their midpoints (ties) with the next
    floats either side, ±λ and its neighbours, ±0, the edges and far beyond them. NaN-free, finite."""
    up = lambda x: torch.nextafter(x, torch.full_like(x, float("inf")))  # noqa: E731
    down = lambda x: torch.nextafter(x, torch.full_like(x, -float("inf")))  # noqa: E731
    midpoints = alphabet_midpoints(levels)
    top = levels.abs().max()
    lams = torch.stack([lam, -lam])
    special = torch.stack([torch.zeros_like(top), -torch.zeros_like(top), top, -top, 2 * top + 1, -(2 * top + 1),
                           torch.full_like(top, 1e30), torch.full_like(top, -1e30)])
    return torch.cat([levels, up(levels), down(levels), midpoints, up(midpoints), down(midpoints), lams, up(lams),
                      down(lams), special, up(special[:2])])


ALPHABETS = [("gpfq2022", True), ("gpfq2022", False), ("midtread", True), ("strict", True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_neuron", [False, True])
@pytest.mark.parametrize("bits", [1, 3, 8])  # 8 bits: the kernel's binary search
@pytest.mark.parametrize("kind,include_0", ALPHABETS)
def test_the_kernel_rounds_as_the_vectorized_module(kind, include_0, bits, per_neuron, dtype):
    """The compiled kernel (and its torch twin) round as `gpfq.methods.rounding` defines it: nearest (ties to the
    smaller level), thresholded (soft, hard) and stochastic, on ties, at the alphabet's edges and beyond. The
    block's Gram is the identity, so each column's argument is its numerator, exactly."""
    n_groups, n_neurons, relative = 2, 3, 0.3
    if per_neuron:  # one alphabet per neuron, one of them of radius 0 (all levels 0)
        radii = torch.tensor([0.7, 0.0, 1.3, 0.25, 2.0, 1.0], dtype=torch.float64)
        alphabet = channel_alphabets(kind, bits, 1.0, radii, include_0).reshape(n_groups, n_neurons, -1).to(dtype)
        rows = [[alphabet[g, n] for n in range(n_neurons)] for g in range(n_groups)]
    else:
        alphabet = make_alphabet(kind, bits, 1.0, 0.7, include_0).to(dtype)
        rows = [[alphabet] * n_neurons for _ in range(n_groups)]
    values = torch.stack([torch.stack([_edge_values(levels, relative * levels.abs().max()) for levels in row], dim=1)
                          for row in rows])  # (G, K, N1)
    n_columns = values.shape[1]
    identity = torch.eye(n_columns, dtype=dtype).expand(n_groups, n_columns, n_columns).contiguous()
    uniforms = seeded_uniforms((n_groups, n_neurons, n_columns), 5).to(dtype)
    uniforms[:, :, ::7] = 0.0
    uniforms[:, :, 3::7] = torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype))
    rules = {"nearest": nearest_rounding, "soft": ThresholdedRounding(relative, "soft"),
             "hard": ThresholdedRounding(relative, "hard"), "stochastic": StochasticRounding(uniforms)}
    for name, rule in rules.items():
        expected = torch.stack([rule(values[:, t].contiguous(), alphabet, t) for t in range(n_columns)], dim=1)
        for compiled in (True, False):
            q = block_rounder(alphabet, n_groups, n_neurons, RoundingSettings(rule, compiled=compiled))(
                values.clone(), identity)
            assert torch.equal(q, expected), (name, compiled)
