"""The in-block sequential step: the compiled kernel against the torch version and a plain loop."""
import pytest
import torch

from gpfq.methods.alphabet import make_alphabet, round_to_alphabet
from gpfq.methods.gpfq.inblock import LINEAR_SEARCH_MAX_MIDPOINTS, block_rounder, compiled_available


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
    compiled = block_rounder(alphabet, n_groups, n_neurons, compiled=True)(numerators.clone(), quantized_gram)
    in_torch = block_rounder(alphabet, n_groups, n_neurons, compiled=False)(numerators.clone(), quantized_gram)
    assert torch.equal(compiled, expected)
    assert torch.equal(in_torch, expected)
    assert torch.all(expected[:, 1] == round_to_alphabet(torch.zeros(n_groups, n_neurons, dtype=torch.float64),
                                                          alphabet))
    assert (unit.numel() - 1 > LINEAR_SEARCH_MAX_MIDPOINTS) == (bits == 8)


def test_compiled_kernel_equals_torch_in_float32_on_a_large_block():
    numerators, quantized_gram = _block(2, 64, 96, seed=7, dtype=torch.float32)
    alphabet = make_alphabet("gpfq2022", 4, 1.0, 1.0).float()
    compiled = block_rounder(alphabet, 2, 96, compiled=True)(numerators.clone(), quantized_gram)
    in_torch = block_rounder(alphabet, 2, 96, compiled=False)(numerators.clone(), quantized_gram)
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
    q = block_rounder(alphabet, 1, 4, compiled=True)(numerators, quantized_gram)
    assert q.tolist() == [[[0.0, -0.5, 0.5, 1.0]]]


def test_compiled_kernel_refuses_other_devices_clearly():
    alphabet = torch.tensor([-1.0, 0.0, 1.0], device="meta")
    with pytest.raises(ValueError, match="runs on the CPU"):
        block_rounder(alphabet, 1, 1, compiled=True)
