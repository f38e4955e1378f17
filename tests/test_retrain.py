"""Retraining variant: in-place quantization with fine-tuning of the float layers."""
import math

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from gpfq.methods.alphabet import make_alphabet
from helpers import (check_options, quantize_point, retraining_fine_tune, retraining_freeze, scored, script_points,
                     watching_layers)

# Settings every hyperparameter test starts from (valid ones).
VALID = dict(retrain_start=1, retrain_samples=2048, retrain_batch_size=256, retrain_epochs=1, retrain_lr=1e-4,
             retrain_weight_decay=1e-6, retrain_batchnorm="update", evaluate_each_step=False)


@pytest.fixture(scope="module")
def retrain_defaults():
    """The retraining hyperparameters of retraining_scripts/quantize.py's header (one grid point)."""
    points = script_points("retraining_scripts")
    assert len(points) == 1
    return {k: v for k, v in points[0].items() if k.startswith("retrain_") or k == "evaluate_each_step"}


@pytest.fixture(scope="module")
def retrained(make_context, retrain_defaults):
    """One retraining run on the default test point (3 bits, m = 256), watched at every optimizer step.

    A watch on gpfq.quantize records each layer's weight the moment it is quantized (before the script
    fine-tunes); a global optimizer post-step hook then checks, after every Adam step, that every layer quantized
    so far still holds exactly that weight and that the optimizer does not hold it.
    """
    check_options("retraining_scripts", retrain_defaults)
    context = make_context("retraining_scripts", **retrain_defaults)
    quantized = {}  # name -> (layer, weight when quantized, report)
    watch = {"steps": 0, "checks": 0, "violations": []}

    def record(step):
        layer = step.quantized_layer
        quantized[step.report.name] = (layer, layer.weight.detach().clone(), step.report)

    def check(optimizer, args, kwargs):
        watch["steps"] += 1
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name, (layer, weight, _) in quantized.items():
            watch["checks"] += 1
            if id(layer.weight) in held or not torch.equal(layer.weight, weight):
                watch["violations"].append((watch["steps"], name))

    handle = register_optimizer_step_post_hook(check)
    try:
        with watching_layers(record):
            torch.manual_seed(0)
            model, reports, extra = quantize_point("retraining_scripts", context)
    finally:
        handle.remove()
    top1, _ = scored(model, context.loader())
    return dict(context=context, model=model, reports=reports, extra=extra, top1=top1, quantized=quantized,
                watch=watch)


@pytest.mark.slow
def test_quantized_weights_stay_on_their_alphabet_through_every_step(retrained):
    watch, quantized = retrained["watch"], retrained["quantized"]
    layers = [r.name for r in retrained["reports"]]
    assert len(layers) == 10 and list(quantized) == layers
    # one fine-tuning after each of the 10 quantized layers (retrain_start = 1), ceil(n / batch) Adam steps each
    options = retrained["context"].run.options
    assert options.start == 1 and options.epochs == 1
    per_layer = math.ceil(options.samples / options.batch_size)
    assert watch["steps"] == 10 * per_layer
    assert watch["checks"] == per_layer * sum(range(1, 11))  # a step after layer k's quantization: layers 1..k
    assert watch["violations"] == []
    model = retrained["model"]
    for report in retrained["reports"]:
        layer, weight, _ = quantized[report.name]
        assert layer is model.get_submodule(report.name)
        scalar = 1.3  # the test point's C for both layer kinds
        alphabet = make_alphabet("gpfq2022", report.bits, scalar, report.radius, True).float()
        assert torch.isin(layer.weight, alphabet).all(), report.name
        assert torch.equal(layer.weight, weight), report.name
    # the float parts did train: a BatchNorm after the first quantized layer moved
    trained_bn = model.stem[1].weight
    assert not torch.equal(trained_bn, retrained["context"].analog_model.stem[1].weight)
    assert retrained["extra"]["Retrain Samples"] == options.samples


@pytest.mark.slow
def test_retraining_not_below_plain_gpfq_at_3_bits(retrained, plain_default):
    print(f"retrained top-1 {retrained['top1']:.4f}, plain GPFQ {plain_default['top1']:.4f}")
    assert retrained["top1"] >= plain_default["top1"]


def test_fine_tune_leaves_frozen_parameters_alone():
    """Weight decay and Adam touch only what requires grad; the model comes back in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    retraining_freeze(model[0])
    frozen = model[0].weight.detach().clone()
    trained = model[3].weight.detach().clone()
    mean = model[1].running_mean.clone()
    data = torch.utils.data.TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,)))
    settings = dict(retrain_start=1, retrain_samples=None, retrain_batch_size=16, retrain_epochs=2, retrain_lr=1e-2,
                    retrain_weight_decay=0.5, retrain_batchnorm="update", evaluate_each_step=False)
    loss, steps = retraining_fine_tune(model, data, list(range(64)), settings, torch.Generator().manual_seed(0))
    assert steps == 2 * 4 and math.isfinite(loss)
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[3].weight, trained)
    assert not torch.equal(model[1].running_mean, mean)  # 'update': running statistics follow the batches
    assert not model.training
    mean = model[1].running_mean.clone()
    settings = dict(settings, retrain_epochs=1, retrain_weight_decay=0.0, retrain_batchnorm="frozen")
    retraining_fine_tune(model, data, list(range(64)), settings, torch.Generator().manual_seed(0))
    assert torch.equal(model[1].running_mean, mean)  # 'frozen': they stay


def test_bad_retrain_hyperparameters_fail_early():
    for bad, message in [(dict(retrain_start=0), "retrain_start"), (dict(retrain_lr=0), "retrain_lr"),
                         (dict(retrain_batchnorm="train"), "retrain_batchnorm"),
                         (dict(retrain_samples=0), "retrain_samples"), (dict(retrain_epochs=-1), "retrain_epochs"),
                         (dict(retrain_weight_decay=-1e-6), "weight_decay"),
                         (dict(evaluate_each_step="yes"), "evaluate_each_step")]:
        with pytest.raises(ValueError, match=message):
            check_options("retraining_scripts", dict(VALID, **bad))


def test_freezing_an_attention_in_projection_leaves_its_out_projection_trainable():
    attention = nn.MultiheadAttention(8, 2)
    retraining_freeze(attention)  # what retraining does once attention.in_proj_weight is quantized
    assert not attention.in_proj_weight.requires_grad and not attention.in_proj_bias.requires_grad
    assert attention.out_proj.weight.requires_grad and attention.out_proj.bias.requires_grad
    retraining_freeze(attention.out_proj)
    assert not attention.out_proj.weight.requires_grad and not attention.out_proj.bias.requires_grad
