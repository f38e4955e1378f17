"""The 2022 code's first-column rule (gpfq_first_column = "code2022") in the specification, the per-column
loop, both engine forms and both in-block implementations."""
import pytest
import torch

import gpfq
from gpfq import QuantConfig
from gpfq.methods.alphabet import make_alphabet, round_to_alphabet
from gpfq.methods.gpfq.engine import GramStatistics, RoundingSettings, gpfq_gram, gpfq_residual
from gpfq.methods.gpfq.reference import gpfq_columns, gpfq_reference
from helpers import check_point, grid_points, method_options, script_header

LEVELS = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64)


def _error(weight, quantized_weight, analog, quantized):
    return float(torch.linalg.norm(analog.double() @ weight.double().T - quantized.double() @ quantized_weight.T))


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_the_documented_example(compiled):
    """X = [[1], [1]], X̃ = 2X, w = 0.4: the 2022 rule rounds w itself (0.5, error 0.849); the paper's rule
    rounds <X̃, wX>/||X̃||² = 0.2 (0, error 0.566)."""
    analog = torch.tensor([[1.0], [1.0]])
    quantized = 2 * analog
    weight = torch.tensor([[0.4]])
    for rule, level, error in (("code2022", 0.5, 0.849), ("paper", 0.0, 0.566)):
        settings = RoundingSettings(code2022=rule == "code2022", compiled=compiled)
        q = gpfq_reference(weight, analog, quantized, LEVELS, first_column=rule)
        assert q.item() == level
        assert _error(weight, q, analog, quantized) == pytest.approx(error, abs=5e-4)
        assert gpfq_columns(weight[None], analog[None], quantized[None], LEVELS, first_column=rule).item() == level
        statistics = GramStatistics(1, 1).add(analog[None], quantized[None])
        assert gpfq_gram(weight[None], statistics.cross, statistics.quantized_gram, LEVELS,
                         rounding=settings).item() == level
        assert gpfq_residual(weight[None], analog[None], quantized[None], LEVELS,
                             rounding=settings).item() == level


def _layer(groups, rows, inputs, neurons, seed, per_neuron=False):
    """X̃'s first column is X's scaled by 1.6 (the mismatch the shortcut ignores), one column of X̃ is empty
    (where <X̃_t, u> = 0 too), the rest perturbed."""
    generator = torch.Generator().manual_seed(seed)
    analog = torch.randn(groups, rows, inputs, generator=generator).relu()
    quantized = (analog + 0.2 * torch.randn(groups, rows, inputs, generator=generator)).relu()
    quantized[:, :, 0] = 1.6 * analog[:, :, 0]
    quantized[:, :, 5] = 0.0
    weight = torch.randn(groups, neurons, inputs, generator=generator) / inputs ** 0.5
    unit = make_alphabet("gpfq2022", 3, 1.2, 1.0)
    radius = weight.abs().amax(dim=2, keepdim=True).double() if per_neuron else float(weight.abs().amax())
    return weight, analog, quantized, unit * radius


LAYERS = [(1, 120, 40, 16, False, 16), (3, 80, 20, 6, True, 8), (2, 60, 9, 4, False, 4)]


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("groups,rows,inputs,neurons,per_neuron,block", LAYERS)
def test_engine_reproduces_the_2022_rule(groups, rows, inputs, neurons, per_neuron, block, compiled):
    weight, analog, quantized, alphabet = _layer(groups, rows, inputs, neurons, seed=inputs, per_neuron=per_neuron)
    statistics = GramStatistics(groups, inputs, dtype=torch.float64).add(analog, quantized)
    settings = RoundingSettings(code2022=True, compiled=compiled)
    exact = {"residual": gpfq_residual(weight.double(), analog, quantized, alphabet, block, torch.float64, settings),
             "gram": gpfq_gram(weight.double(), statistics.cross, statistics.quantized_gram, alphabet, block,
                               torch.float64, settings)}
    fast = gpfq_residual(weight, analog, quantized, alphabet, block, rounding=settings)
    columns = gpfq_columns(weight.double(), analog, quantized, alphabet, torch.float64, first_column="code2022")
    changed_first = 0
    for g in range(groups):
        levels = alphabet[g] if per_neuron else alphabet
        expected = gpfq_reference(weight[g], analog[g], quantized[g], levels, first_column="code2022")
        paper = gpfq_reference(weight[g], analog[g], quantized[g], levels)
        for result in (*exact.values(), columns):
            assert torch.equal(result[g], expected)
        assert (fast[g] == expected.float()).double().mean() >= 0.995
        # the shortcut rounds w_1 itself at the first column, and w_t at the empty column
        assert torch.equal(expected[:, 0], round_to_alphabet(weight[g, :, 0].double(), levels))
        assert torch.equal(expected[:, 5], round_to_alphabet(weight[g, :, 5].double(), levels))
        changed_first += int((expected[:, 0] != paper[:, 0]).sum())
    assert changed_first > 0  # the two rules differ on this layer


def test_default_is_the_paper_rule_and_the_option_reaches_the_layer():
    weight, analog, quantized, _ = _layer(1, 100, 30, 8, seed=1)
    # the layer's alphabet, independently: C = 1.2 times the mean over neurons of max |w| (percentile 1.0)
    levels = make_alphabet("gpfq2022", 3, 1.2, float(weight[0].double().abs().amax(dim=1).mean()))
    results = {}
    for rule in ("paper", "code2022"):
        q = gpfq.quantize_layer(weight[0], analog[0], quantized[0],
                                QuantConfig(method="gpfq", bits=3, mlp_scalar=1.2, gpfq_first_column=rule))
        expected = gpfq_reference(weight[0], analog[0], quantized[0], levels, first_column=rule)
        assert (q == expected.float()).double().mean() >= 0.995
        results[rule] = q
    assert torch.equal(results["paper"], gpfq.quantize_layer(weight[0], analog[0], quantized[0],
                                                             QuantConfig(method="gpfq", bits=3, mlp_scalar=1.2)))
    assert not torch.equal(results["paper"], results["code2022"])


def test_header_option_is_validated_and_logged():
    point = grid_points(dict(script_header("quantization_scripts"), gpfq_first_column="code2022"))[0]
    check_point(point)
    assert method_options(point) == "first column code2022"
    assert method_options(grid_points("quantization_scripts")[0]) == ""  # the default point logs as before
    with pytest.raises(ValueError, match="gpfq_first_column"):
        check_point(grid_points(dict(script_header("quantization_scripts"), gpfq_first_column="2022"))[0])
