"""Qronos: the blocked form from streamed Gram sums against the per-column definition."""
import pytest
import torch
from torch import nn

from gpfq import QuantConfig
from gpfq.methods.alphabet import channel_alphabets, make_alphabet, round_to_alphabet, row_radii
from gpfq.methods.gpfq.column_order import gram_in_order, restore_columns, rows_in_order
from gpfq.methods.gpfq.engine import GramStatistics
from gpfq.methods.gptq import HessianNotPositiveDefinite, gptq_reference
from gpfq.methods.qronos import qronos, qronos_from_gram, qronos_reference, ridge
from gpfq.methods.gpfq.reference import relative_error
from helpers import layer_form, quantized_layer


def _layer(groups, rows, inputs, neurons, seed, per_channel=False, bits=3):
    """ReLU-like X, a perturbed X̃ (X̃ ≠ X: the first step has a mismatch to correct) with a dead column."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(inputs, generator=generator, dtype=torch.float64) * 2
    analog = (torch.randn(groups, rows, inputs, generator=generator, dtype=torch.float64) * scale).relu()
    quantized = (analog + 0.2 * torch.randn(groups, rows, inputs, generator=generator, dtype=torch.float64)).relu()
    quantized[:, :, 3] = 0.0
    weight = torch.randn(groups, neurons, inputs, generator=generator, dtype=torch.float64) / inputs ** 0.5
    if per_channel:
        radii = row_radii(weight.reshape(-1, inputs), 1.0)
        alphabet = channel_alphabets("gpfq2022", bits, 1.2, radii).reshape(groups, neurons, -1)
    else:
        alphabet = make_alphabet("midtread", bits, 1.2, float(row_radii(weight.reshape(-1, inputs), 1.0).mean()))
    return weight, analog, quantized, alphabet


def _streamed(analog, quantized, dtype, chunk=17):
    """X̃ᵀX and X̃ᵀX̃ summed chunk by chunk, as the network streams a layer (no rows kept)."""
    statistics = GramStatistics(analog.shape[0], analog.shape[2], dtype=dtype)
    for start in range(0, analog.shape[1], chunk):
        statistics.add(analog[:, start:start + chunk], quantized[:, start:start + chunk])
    return statistics


CASES = [  # groups, m, N0, N1, per-channel alphabets, damping, block size
    (1, 90, 30, 7, False, 1e-6, 8),  # m > N0, ragged last block
    (2, 40, 50, 5, True, 1e-6, 16),  # m < N0: X̃ᵀX̃ singular, the ridge makes it definite
    (3, 60, 12, 4, False, 1e-2, 128),  # grouped, a stronger ridge, one block
    (4, 50, 9, 2, True, 0.0, 4),  # depthwise-like, no ridge (m > N0; the dead column keeps argument 0)
]


@pytest.mark.parametrize("groups,rows,inputs,neurons,per_channel,damping,block", CASES)
def test_blocked_from_streamed_sums_equals_the_definition(groups, rows, inputs, neurons, per_channel, damping,
                                                          block):
    weight, analog, quantized, alphabet = _layer(groups, rows, inputs, neurons, seed=inputs, per_channel=per_channel)
    if damping == 0.0:
        quantized[:, :, 3] = 0.5 * analog[:, :, 3] + 0.1  # H must be definite without a ridge
    statistics = _streamed(analog, quantized, torch.float64)
    exact = qronos_from_gram(weight, statistics.cross, statistics.quantized_gram, alphabet, damping, block,
                             dtype=torch.float64)
    # float32 rows and column loop; the sums are formed in float64, as the network streams Qronos's layers
    # (with m < N0 the ridge 1e-6·λ_max is below float32's resolution of X̃ᵀX̃)
    fast = qronos_from_gram(weight.float(), *_gram_pair(_streamed(analog.float(), quantized.float(), torch.float64)),
                            alphabet, damping, block)
    for g in range(groups):
        expected = qronos_reference(weight[g], analog[g], quantized[g], alphabet[g] if per_channel else alphabet,
                                    damping)
        assert torch.equal(exact[g], expected)  # float64: the same choices everywhere
        assert (fast[g] == expected.float()).double().mean() >= 0.995  # float32 sums and column loop
    gap = (relative_error(weight.float(), fast, analog.float(), quantized.float())
           - relative_error(weight, exact, analog, quantized))
    assert abs(gap) <= 1e-3


def _gram_pair(statistics):
    return statistics.cross, statistics.quantized_gram


def test_rows_form_equals_streamed_form():
    weight, analog, quantized, alphabet = _layer(2, 70, 20, 6, seed=5)
    statistics = _streamed(analog, quantized, torch.float64)
    from_rows = qronos(weight, analog, quantized, alphabet, dtype=torch.float64)
    from_sums = qronos_from_gram(weight, statistics.cross, statistics.quantized_gram, alphabet, dtype=torch.float64)
    assert torch.equal(from_rows, from_sums)


def test_first_step_corrects_the_mismatch_like_gpfq():
    """One input: q = Q_A(<X̃, Xw>/||X̃||²) (no later columns to shape). A worked example: X = [[1], [1]],
    X̃ = 2X, w = 0.4: the argument is 0.2, so q = 0 (round-to-nearest of w would give 0.5)."""
    analog = torch.tensor([[[1.0], [1.0]]], dtype=torch.float64)
    levels = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    weight = torch.tensor([[[0.4]]], dtype=torch.float64)
    assert qronos(weight, analog, 2 * analog, levels, damping=0.0, dtype=torch.float64).item() == 0.0
    assert qronos_reference(weight[0], analog[0], 2 * analog[0], levels, 0.0).item() == 0.0


def test_with_identical_inputs_qronos_is_gptq():
    """X̃ = X: the first step rounds w_1 itself and every update is the OBS one, so Qronos without a ridge is
    GPTQ without damping (an independent per-column loop with the explicit inverse)."""
    weight, analog, _, alphabet = _layer(1, 80, 25, 6, seed=11)
    analog[:, :, 3] += 0.3  # no dead column: GPTQ would zero its weight
    got = qronos(weight, analog, analog, alphabet, damping=0.0, block_size=8, dtype=torch.float64)[0]
    assert torch.equal(got, gptq_reference(weight[0], analog[0], alphabet, damping=0.0))


def test_ridge_is_relative_to_the_largest_eigenvalue():
    gram = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64)).unsqueeze(0)
    assert ridge(gram, 1e-3).item() == pytest.approx(4e-3, rel=1e-12)
    assert ridge(gram, 0.0).item() == 0.0
    with pytest.raises(ValueError, match="damping"):
        ridge(gram, -1.0)


def test_singular_gram_without_ridge_fails_clearly():
    weight, analog, quantized, alphabet = _layer(1, 10, 30, 3, seed=2)  # m < N0 and a dead column
    with pytest.raises(HessianNotPositiveDefinite, match="qronos_damping"):
        qronos(weight, analog, quantized, alphabet, damping=0.0)


def test_act_order_equals_the_definition_on_permuted_columns():
    weight, analog, quantized, alphabet = _layer(1, 60, 24, 5, seed=4, per_channel=True)
    order = sorted(range(24), key=lambda t: -float(quantized[0, :, t].pow(2).sum()))  # decreasing ||X̃_t||²
    expected = torch.empty_like(weight[0])
    expected[:, order] = qronos_reference(weight[0][:, order], analog[0][:, order], quantized[0][:, order],
                                          alphabet[0])
    statistics = _streamed(analog, quantized, torch.float64)
    order, w, c, h = gram_in_order("act_order", weight, statistics.cross, statistics.quantized_gram)
    from_sums = restore_columns(qronos_from_gram(w, c, h, alphabet, dtype=torch.float64), order)
    order, w, x, xq = rows_in_order("act_order", weight, analog, quantized)
    from_rows = restore_columns(qronos(w, x, xq, alphabet, dtype=torch.float64), order)
    assert torch.equal(from_sums[0], expected) and torch.equal(from_rows[0], expected)
    assert not torch.equal(expected, qronos_reference(weight[0], analog[0], quantized[0], alphabet[0]))


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_layer_rule_through_the_network_settings(granularity):
    """A grouped conv quantized as gpfq quantizes a layer (float32) against the definition per group; Q lies on the
    layer's (or each channel's) alphabet."""
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, groups=2)
    analog_rows = torch.randn(200, 36).relu()
    quantized_rows = (analog_rows + 0.1 * torch.randn(200, 36)).relu()
    settings = QuantConfig(method="qronos", bits=3, mlp_scalar=1.1, cnn_scalar=1.1, alphabet_granularity=granularity)
    weight, q, analog, quantized, alphabet, _ = quantized_layer(conv, analog_rows, quantized_rows, settings)
    for g in range(2):
        expected = qronos_reference(weight[g], analog[g], quantized[g], alphabet[g] if alphabet.dim() == 3 else alphabet)
        assert (q[g] == expected.float()).double().mean() >= 0.995
        on_alphabet = round_to_alphabet(q[g].double(), alphabet[g].double() if alphabet.dim() == 3 else alphabet)
        assert torch.allclose(on_alphabet, q[g].double())
    assert layer_form(settings, 200, 18, 3, 2) == "qronos"
    assert layer_form(QuantConfig(method="qronos", engine="gram", mlp_scalar=1.0, cnn_scalar=1.0), 200, 18, 3, 2) == "gram"


@pytest.mark.parametrize("damping", [1e-6, 1e-2])
def test_all_zero_quantized_input_gives_the_definitions_zero_arguments(damping):
    """X̃ = 0 in one group: every argument is 0 (the reference's least-squares future is the minimum-norm 0),
    so Q is the level nearest 0 there; the other group is unaffected."""
    weight, analog, quantized, alphabet = _layer(2, 40, 12, 5, seed=3)
    quantized[1] = 0.0
    fast = qronos(weight, analog, quantized, alphabet, damping=damping, dtype=torch.float64)
    expected = torch.stack([qronos_reference(weight[g], analog[g], quantized[g], alphabet, damping)
                            for g in range(2)])
    assert torch.equal(fast, expected)
    assert torch.all(fast[1] == round_to_alphabet(torch.zeros(()), alphabet.double()))
