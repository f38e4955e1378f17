"""column_order = "act_order" for the GPFQ family: the reference loop run on the columns in decreasing
||X̃_t||², with Q mapped back."""
import pytest
import torch

import gpfq
from gpfq import QuantConfig
from gpfq.methods.alphabet import channel_alphabets, make_alphabet, row_radii
from gpfq.methods.gpfq.column_order import act_order, gram_in_order, permute_gram, restore_columns, rows_in_order
from gpfq.methods.gpfq.engine import GramStatistics, gpfq_blocked, gpfq_gram
from gpfq.methods import METHODS
from gpfq.methods.gpfq.reference import gpfq_reference
from gpfq.methods.rounding import StochasticScalar, seeded_uniforms
from gpfq.methods.gpfq.variants import spfq
from helpers import check_point, grid_points, method_options, script_header


def _layer(groups=2, rows=80, inputs=30, neurons=6, seed=0, per_channel=False):
    """Columns of very different scales (so the order is far from natural) and a dead column."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(groups, 1, inputs, generator=generator) * 3
    analog = (torch.randn(groups, rows, inputs, generator=generator) * scale).relu()
    quantized = (analog + 0.1 * torch.randn(groups, rows, inputs, generator=generator)).relu()
    quantized[:, :, 4] = 0.0
    weight = torch.randn(groups, neurons, inputs, generator=generator) / inputs ** 0.5
    radii = row_radii(weight.reshape(-1, inputs), 1.0)
    alphabet = (channel_alphabets("gpfq2022", 3, 1.2, radii).reshape(groups, neurons, -1) if per_channel
                else make_alphabet("gpfq2022", 3, 1.2, float(radii.mean())))
    return weight, analog, quantized, alphabet


def _reference_in_act_order(weight, analog, quantized, alphabet, per_channel, rule=None):
    """Per group: sort the columns by decreasing ||X̃_t||² (ties in natural order), run the reference loop on
    them, put each q back in its column."""
    expected = torch.empty(weight.shape, dtype=torch.float64)
    for g in range(weight.shape[0]):
        norms = [float(quantized[g, :, t].double().pow(2).sum()) for t in range(weight.shape[2])]
        order = sorted(range(weight.shape[2]), key=lambda t: (-norms[t], t))
        levels = alphabet[g] if per_channel else alphabet
        if rule is None:
            permuted = gpfq_reference(weight[g][:, order], analog[g][:, order], quantized[g][:, order], levels)
        else:
            permuted = gpfq_reference(weight[g][:, order], analog[g][:, order], quantized[g][:, order],
                                      levels, rule(g))
        expected[g][:, order] = permuted
    return expected


@pytest.mark.parametrize("per_channel", [False, True])
def test_gpfq_act_order_equals_the_reference_on_permuted_columns(per_channel):
    weight, analog, quantized, alphabet = _layer(per_channel=per_channel)
    expected = _reference_in_act_order(weight, analog, quantized, alphabet, per_channel)
    assert not torch.equal(expected, torch.stack([gpfq_reference(weight[g], analog[g], quantized[g],
                                                                 alphabet[g] if per_channel else alphabet)
                                                  for g in range(2)]))  # the order matters here
    for form in ("residual", "gram"):  # float64: exactly the reference's choices
        order, w, x, xq = rows_in_order("act_order", weight, analog, quantized)
        got = restore_columns(gpfq_blocked(w.double(), x, xq, alphabet, form=form, block_size=8, dtype=torch.float64),
                              order)
        assert torch.equal(got, expected)
    statistics = GramStatistics(2, weight.shape[2], dtype=torch.float64).add(analog, quantized)
    order, w, c, h = gram_in_order("act_order", weight, statistics.cross, statistics.quantized_gram)
    got = restore_columns(gpfq_gram(w.double(), c, h, alphabet, 8, torch.float64), order)
    assert torch.equal(got, expected)
    # the layer rules of the network (float32): rows, and streamed sums
    settings = QuantConfig(method="gpfq", column_order="act_order", mlp_scalar=1.0, cnn_scalar=1.0)
    for engine in ("columns", "residual", "gram"):
        got = METHODS["gpfq"].from_rows(weight, analog, quantized, alphabet, QuantConfig(
            method="gpfq", column_order="act_order", engine=engine, mlp_scalar=1.0, cnn_scalar=1.0))
        assert (got == expected.float()).double().mean() >= 0.995
    streamed = GramStatistics(2, weight.shape[2]).add(analog, quantized)
    got = METHODS["gpfq"].from_statistics(weight, streamed, alphabet, settings)
    assert (got == expected.float()).double().mean() >= 0.995


def test_spfq_act_order_equals_the_reference_on_permuted_columns():
    """SPFQ's column t of the walk uses uniforms[..., t]: the walk's t, so the reference run on permuted
    columns uses them as drawn."""
    weight, analog, quantized, alphabet = _layer(seed=3)
    uniforms = seeded_uniforms(weight.shape, 9)
    expected = _reference_in_act_order(weight, analog, quantized, alphabet, False,
                                       rule=lambda g: StochasticScalar(uniforms[g]))
    order, w, x, xq = rows_in_order("act_order", weight, analog, quantized)
    got = restore_columns(spfq(w.double(), x, xq, alphabet, seed=9, dtype=torch.float64, engine="residual"), order)
    assert torch.equal(got, expected)


def test_permutation_helpers_round_trip():
    order = act_order(torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 2.0, 1.0]]))
    assert order.tolist() == [[1, 2, 0, 3], [2, 3, 0, 1]]  # decreasing, ties in natural order
    values = torch.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    permuted = values.gather(2, order.unsqueeze(1).expand(2, 3, 4))
    assert torch.equal(restore_columns(permuted, order), values)
    gram = torch.arange(2 * 16.0).reshape(2, 4, 4)
    assert torch.equal(permute_gram(gram, order)[0], gram[0][[1, 2, 0, 3]][:, [1, 2, 0, 3]])


def test_natural_order_is_the_default_and_unchanged():
    weight, analog, quantized, alphabet = _layer(seed=5)
    layer = torch.nn.Linear(30, 6, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight[0])
    assert QuantConfig().column_order == "natural"
    config = QuantConfig(mlp_scalar=1.0, cnn_scalar=1.0)
    plain = gpfq.quantize_layer(weight[0], analog[0], quantized[0], config)
    # the layer's alphabet, as gpfq.quantize reports it (it depends on the weight and the config only)
    [report] = gpfq.quantize(layer, analog[0], config.replace(batch_size=len(analog[0])), log=lambda *_: None).reports
    levels = report.alphabet
    # the per-column specification, in natural order (the engine's criterion: ≥ 99.5 % of the entries equal)
    expected = gpfq_reference(weight[0].double(), analog[0].double(), quantized[0].double(), levels.double())
    assert (plain == expected.float()).double().mean() >= 0.995


def test_header_option_is_validated_and_logged():
    point = grid_points(dict(script_header("quantization_scripts"), column_order="act_order"))[0]
    check_point(point)
    assert method_options(point) == "act-order"
    assert method_options(dict(point, method="qronos")) == "damping 1e-06, act-order"
    with pytest.raises(ValueError, match="column_order"):
        check_point(grid_points(dict(script_header("quantization_scripts"), column_order="random"))[0])
