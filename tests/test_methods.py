"""Methods beside GPFQ: GPTQ, stochastic and sparse GPFQ, per-channel alphabets, BatchNorm folding,
and the orderings that must hold on the default model."""

import pytest
import torch
from torch import nn

from conftest import script_header
from gpfq import QuantConfig
from gpfq.methods.alphabet import channel_alphabets, make_alphabet, round_to_alphabet, row_radii
from gpfq.methods.gptq import gptq, gptq_reference
from gpfq.io.models import load_model
from gpfq.methods.gpfq.reference import gpfq_columns, gpfq_reference
from gpfq.methods.rounding import StochasticScalar, ThresholdedScalar, nearest_scalar, seeded_uniforms, stochastic_round
from gpfq.methods.gpfq.variants import sparse_gpfq, spfq
from helpers import (batchnorm_folded, check_point, grid_points, layer_order, quantized_layer, run_script,
                     saved_record)



def _problem(groups=2, neurons=9, inputs=37, rows=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(groups, neurons, inputs, generator=generator, dtype=torch.float64)
    # columns of different scales, so act-order has an order to find
    scale = torch.rand(inputs, generator=generator, dtype=torch.float64) * 2
    analog = torch.randn(groups, rows, inputs, generator=generator, dtype=torch.float64) * scale
    quantized = analog + 0.1 * torch.randn(groups, rows, inputs, generator=generator, dtype=torch.float64)
    return weight, analog, quantized


def _per_channel(weight, kind="gpfq2022", bits=3):
    groups, neurons, inputs = weight.shape
    radii = row_radii(weight.reshape(-1, inputs), 1.0)
    return channel_alphabets(kind, bits, 1.1, radii).reshape(groups, neurons, -1)


# ---------------------------------------------------------------- GPTQ
@pytest.mark.parametrize("rows,act_order,per_channel", [(50, False, False), (50, True, False), (20, True, True),
                                                         (20, False, True)])
def test_gptq_blocked_equals_per_column_definition(rows, act_order, per_channel):
    """Cholesky + lazy blocks (B = 8, N0 = 37: a ragged last block) against the explicit-inverse OBS loop;
    rows = 20 < N0 leaves X̃ᵀX̃ singular, so damping is what makes it invertible."""
    weight, _, quantized = _problem(rows=rows)
    quantized[1, :, 5] = 0.0  # a dead input in group 1
    alphabet = _per_channel(weight) if per_channel else make_alphabet("gpfq2022", 3, 1.1, 1.5)
    blocked = gptq(weight, quantized, alphabet, block_size=8, damping=0.01, act_order=act_order, dtype=torch.float64)
    for g in range(weight.shape[0]):
        expected = gptq_reference(weight[g], quantized[g], alphabet[g] if per_channel else alphabet, 0.01, act_order)
        assert torch.equal(blocked[g], expected)
    assert torch.all(blocked[1, :, 5] == round_to_alphabet(torch.zeros(weight.shape[1], dtype=torch.float64),
                                                            alphabet[1] if per_channel else alphabet))
    # float32 (the network's dtype) makes the same choices almost everywhere
    fast = gptq(weight.float(), quantized.float(), alphabet, block_size=8, act_order=act_order)
    assert (fast == blocked.float()).float().mean() >= 0.99


# ---------------------------------------------------------------- stochastic and sparse GPFQ
def test_per_column_loop_with_the_nearest_rule_is_the_reference():
    weight, analog, quantized = _problem(groups=1)
    alphabet = make_alphabet("gpfq2022", 3, 1.1, 2.0)
    expected = gpfq_reference(weight[0], analog[0], quantized[0], alphabet, nearest_scalar)
    assert torch.equal(gpfq_reference(weight[0], analog[0], quantized[0], alphabet), expected)  # the default rule
    assert torch.equal(gpfq_columns(weight, analog, quantized, alphabet, dtype=torch.float64)[0], expected)


ENGINES = ["columns", "residual", "gram"]  # the per-column loop and both forms of the blocked engine


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_spfq_equals_reference_and_is_seeded(per_channel, engine):
    weight, analog, quantized = _problem()
    alphabet = _per_channel(weight) if per_channel else make_alphabet("midtread", 3, 1.1, 2.0)
    fast = spfq(weight, analog, quantized, alphabet, seed=7, dtype=torch.float64, engine=engine)
    uniforms = seeded_uniforms(weight.shape, 7)
    for g in range(weight.shape[0]):
        expected = gpfq_reference(weight[g], analog[g], quantized[g], alphabet[g] if per_channel else alphabet,
                                  StochasticScalar(uniforms[g]))
        assert torch.equal(fast[g], expected)
    once = spfq(weight.float(), analog.float(), quantized.float(), alphabet, seed=7, engine=engine)
    assert torch.equal(once, spfq(weight.float(), analog.float(), quantized.float(), alphabet, seed=7, engine=engine))
    other = spfq(weight.float(), analog.float(), quantized.float(), alphabet, seed=8, engine=engine)
    assert (other != once).float().mean() > 0.1
    assert (fast != gpfq_columns(weight, analog, quantized, alphabet, dtype=torch.float64)).float().mean() > 0.1


def test_stochastic_rounding_is_unbiased_between_neighbours():
    alphabet = torch.tensor([-1.0, -0.25, 0.0, 0.5, 1.0], dtype=torch.float64)
    values = torch.tensor([-3.0, -0.4, 0.1, 0.3, 0.5, 0.99, 2.0], dtype=torch.float64)
    draws = 100_000
    uniforms = torch.rand(draws, values.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rounded = stochastic_round(values.expand(draws, -1), alphabet, uniforms)
    clipped = values.clamp(-1.0, 1.0)
    # E q = z inside the range; the standard error of a mean of draws with spread ≤ 0.75 is ≤ 0.0024
    assert torch.allclose(rounded.mean(dim=0), clipped, atol=0.01)
    lower = torch.tensor([-1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 1.0], dtype=torch.float64)
    upper = torch.tensor([-1.0, -0.25, 0.5, 0.5, 0.5, 1.0, 1.0], dtype=torch.float64)
    assert torch.all((rounded == lower) | (rounded == upper))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["soft", "hard"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_sparse_gpfq_equals_reference(kind, per_channel, engine):
    weight, analog, quantized = _problem()
    alphabet = _per_channel(weight, "midtread", 2) if per_channel else make_alphabet("gpfq2022", 3, 1.1, 2.0)
    fast = sparse_gpfq(weight, analog, quantized, alphabet, 0.3, kind, dtype=torch.float64, engine=engine)
    for g in range(weight.shape[0]):
        expected = gpfq_reference(weight[g], analog[g], quantized[g], alphabet[g] if per_channel else alphabet,
                                  ThresholdedScalar(0.3, kind))
        assert torch.equal(fast[g], expected)
    plain = gpfq_columns(weight, analog, quantized, alphabet, dtype=torch.float64)
    assert torch.equal(sparse_gpfq(weight, analog, quantized, alphabet, 0.0, kind, dtype=torch.float64,
                                   engine=engine), plain)
    assert (fast == 0).float().mean() > (plain == 0).float().mean()


# ---------------------------------------------------------------- per-channel alphabets
def test_channel_alphabets_are_each_rows_own_alphabet():
    weight = torch.randn(5, 20, generator=torch.Generator().manual_seed(3))
    radii = row_radii(weight, 0.9)
    for kind in ("gpfq2022", "midtread", "strict"):
        rows = channel_alphabets(kind, 3, 1.2, radii)
        for i in range(5):
            expected = make_alphabet(kind, 3, 1.2, float(torch.quantile(weight[i].abs().double(), 0.9)))
            assert torch.allclose(rows[i], expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["msq", "gpfq", "gptq"])
def test_per_channel_layer_uses_each_channels_alphabet(method):
    """A grouped conv with per-channel radii: every method's Q row i lies on channel i's own alphabet,
    and MSQ's is that row rounded to it (an independent per-row loop)."""
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, groups=2)
    with torch.no_grad():
        conv.weight.mul_(torch.logspace(-1, 1, 6).view(6, 1, 1, 1))  # channels of very different scales
    rows = torch.randn(300, 36)  # (m, G·N0), N0 = 2·3·3
    settings = QuantConfig(method=method, bits=3, mlp_scalar=1.0, cnn_scalar=1.0, alphabet_granularity="channel")
    _, q, _, _, alphabet, _ = quantized_layer(conv, rows, rows, settings)
    weight = conv.weight.detach().reshape(6, -1)
    q = q.reshape(6, -1)
    for i in range(6):
        own = make_alphabet("gpfq2022", 3, 1.0, float(weight[i].abs().max()))
        assert torch.all(torch.isclose(q[i].double().unsqueeze(1), own.unsqueeze(0), rtol=1e-6).any(dim=1))
        if method == "msq":
            assert torch.allclose(q[i].double(), own[(weight[i].double().unsqueeze(1) - own).abs().argmin(dim=1)])


# ---------------------------------------------------------------- BatchNorm folding
def test_fold_batchnorm_keeps_the_function_and_the_layers():
    model = load_model("fashion_resnet")
    folded, pairs = batchnorm_folded(model)
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(norm for _, norm in pairs) == sorted(norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    images = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(images), folded(images)
    assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()))
    assert layer_order(folded, images[:1]) == layer_order(model, images[:1])
    # the folded weight of a pair is W·γ/sqrt(var + eps) per output channel
    conv_name, norm_name = pairs[0]
    conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    assert torch.allclose(folded.get_submodule(conv_name).weight, conv.weight * scale.view(-1, 1, 1, 1), atol=1e-6)


# ---------------------------------------------------------------- hyperparameters
@pytest.mark.parametrize("key,value,message", [
    ("alphabet_granularity", "row", "alphabet_granularity"),
    ("thresholding", "medium", "thresholding"),
    ("sparsity_threshold", -0.1, "sparsity_threshold"),
    ("gptq_damping", -1.0, "gptq_damping"),
    ("gptq_block_size", 0, "gptq_block_size"),
    ("fold_batchnorm", "yes", "fold_batchnorm"),
    ("method", "optq", "method"),
])
def test_bad_method_hyperparameters_fail_early(key, value, message):
    point = grid_points(dict(script_header("quantization_scripts"), **{key: value}))[0]
    with pytest.raises(ValueError, match=message):
        check_point(point)


def test_sparse_gpfq_needs_the_zero_level():
    point = grid_points(dict(script_header("quantization_scripts"), method="sparse_gpfq", include_0=False))[0]
    with pytest.raises(ValueError, match="include_0"):
        check_point(point)


# ---------------------------------------------------------------- the default model
@pytest.fixture(scope="session")
def default_runs(tmp_path_factory):
    """MSQ, GPFQ, GPTQ and soft sparse GPFQ (λ = 0.1) at 3 bits on the default model, m = 128, through the
    script's own entry point; the same seed gives every method the same calibration images."""
    folder = tmp_path_factory.mktemp("methods")
    argv = ["--method", "msq", "gpfq", "gptq", "sparse_gpfq", "--bits", "3", "--batch_size", "128",
            "--sparsity_threshold", "0.1", "--num_threads", "1", "--log_dir", str(folder / "logs"), "--model_dir", str(folder / "models")]
    threads = torch.get_num_threads()
    rows = run_script("quantization_scripts", *argv)
    assert torch.get_num_threads() == threads  # --num_threads holds for the run only, not for the caller after it
    records = {}
    for row in rows:
        record = saved_record(row["Model File"])
        records[row["Method"]] = (row, record, torch.load(row["Model File"], weights_only=True))
    return records


@pytest.mark.slow
def test_gpfq_and_gptq_beat_msq_at_3_bits(default_runs):
    msq_top1 = default_runs["msq"][0]["Quantized Top1 Accuracy"]
    assert default_runs["gpfq"][0]["Quantized Top1 Accuracy"] > msq_top1
    assert default_runs["gptq"][0]["Quantized Top1 Accuracy"] > msq_top1


@pytest.mark.slow
def test_gpfq_layer_error_below_msq_on_every_layer(default_runs):
    gpfq_layers = default_runs["gpfq"][1]["layers"]
    msq_layers = default_runs["msq"][1]["layers"]
    assert [layer["name"] for layer in gpfq_layers] == [layer["name"] for layer in msq_layers]
    assert len(gpfq_layers) == 10  # every Conv2d and the Linear of fashion_resnet
    for gpfq_layer, msq_layer in zip(gpfq_layers, msq_layers):
        assert gpfq_layer["relative_error"] < msq_layer["relative_error"], gpfq_layer["name"]


@pytest.mark.slow
def test_logged_sparsity_is_the_fraction_of_zero_weights(default_runs):
    for method in ("gpfq", "sparse_gpfq"):
        row, record, state = default_runs[method]
        names = [layer["name"] for layer in record["layers"]]
        weights = [state[f"{name}.weight"] for name in names]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert row["Sparsity"] == pytest.approx(zeros, abs=1e-6)
    assert default_runs["sparse_gpfq"][0]["Sparsity"] > default_runs["gpfq"][0]["Sparsity"] + 0.05
    assert default_runs["sparse_gpfq"][0]["Method Options"] == "soft threshold 0.1"
