"""The `strict` alphabet (2^b levels: exactly b stored bits) with every method, granularity and variant."""
import pytest
import torch

from gpfq.methods.alphabet import GRANULARITIES
from gpfq.methods.codes import encode, layer_codebook
import gpfq
from gpfq.io.model_file import load_quantized, save_quantized
from gpfq.methods import METHOD_NAMES

from helpers import quantize_point

BITS = 3


def _check_strict(model, reports, bits_of=lambda report: BITS):
    """Every quantized layer: 2^b levels k·δ (k = -2^(b-1) … 2^(b-1)-1), b stored bits, codes < 2^b."""
    assert reports
    for report in reports:
        bits = bits_of(report)
        weight = model.get_submodule(report.name).weight
        codebook = layer_codebook(report.alphabet, weight)
        assert report.levels == codebook.shape[-1] == 2 ** bits and report.stored_bits == bits
        rows = codebook.double().reshape(-1, 2 ** bits)
        delta = rows[:, 1:2] - rows[:, :1]
        k = torch.arange(-2 ** (bits - 1), 2 ** (bits - 1), dtype=torch.float64)
        assert torch.allclose(rows, k * delta, rtol=1e-6, atol=0), report.name  # the signed b-bit grid
        assert int(encode(weight, codebook).max()) < 2 ** bits


@pytest.mark.slow  # quantizes the default model
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_and_granularity(default_data, method, granularity):
    calibration, _, model = default_data
    config = gpfq.QuantConfig(method=method, bits=BITS, alphabet="strict", alphabet_granularity=granularity,
                              batch_size=32, sparsity_threshold=0.05)
    result = gpfq.quantize(model, calibration, config, log=lambda *_: None)
    quantized, reports = result.model, result.reports
    _check_strict(quantized, reports)


@pytest.mark.slow  # quantizes the default model
def test_ad_hoc_variant_bias_correction_skip_and_mixed_bits(make_context, tmp_path):
    point = dict(bias_correction="all", bias_batch_size=64, skip_layers="first", bits_map={-1: 4}, saved_model=None)
    context = make_context("adhoc_quantization_scripts", alphabet="strict", alphabet_granularity="channel",
                           batch_size=32, **point)  # the ad hoc options are checked as the script checks them
    model, reports, _ = quantize_point("adhoc_quantization_scripts", context)
    _check_strict(model, reports, lambda report: 4 if report.name == "fc" else BITS)
    assert reports[0].index == 1  # the first layer was left float
    save_quantized(model, reports, tmp_path / "adhoc.safetensors", model_name="fashion_resnet")
    loaded = load_quantized(tmp_path / "adhoc.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.slow  # quantizes the default model
def test_retraining_variant(make_context):
    point = dict(retrain_start=1, retrain_samples=128, retrain_batch_size=64, retrain_epochs=1, retrain_lr=1e-4,
                 retrain_weight_decay=0.0, retrain_batchnorm="frozen", evaluate_each_step=False)
    context = make_context("retraining_scripts", alphabet="strict", batch_size=32, **point)
    model, reports, _ = quantize_point("retraining_scripts", context)
    _check_strict(model, reports)
