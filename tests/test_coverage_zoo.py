"""Coverage: every matmul weight of the transformers and modern CNNs is quantized (random weights, m = 4).

The expectation is independent of the capture's own bookkeeping: every weight of every nn.Linear, ConvNd
and nn.MultiheadAttention (its in-projection and out-projection) that the forward pass reads must be on
the layer's alphabet after quantization, unless ALLOWED_FLOAT names it with a reason.
"""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gpfq import QuantConfig
from gpfq.pipeline.discovery import find_layers
from gpfq.pipeline.streams import CalibrationStream
from gpfq.pipeline.network import Calibration, Hooks, layer_alphabet, quantize_network

# parameter name -> why it may stay float. Empty: every matmul weight of these models is quantized.
ALLOWED_FLOAT = {}


class TiedHead(nn.Module):
    """A language-model-like toy: the output projection's weight is the embedding table (tied), and one
    Linear is applied twice."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(12, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, x):
        tokens = (x.flatten(1)[:, :6] > 0).long() * torch.arange(6)  # (n, 6) token ids from the image
        h = torch.relu(self.mix(self.embedding(tokens)))
        h = torch.relu(self.mix(h))
        return self.head(h).mean(1)


def build(name):
    """(model, image size, calibration)."""
    from torchvision import models
    from torchvision.models.maxvit import MaxVit
    torch.manual_seed(0)
    if name == "vit_b_32":
        return models.vit_b_32(image_size=64), 64, "fixed"
    if name == "maxvit_t":
        # MaxViT-T's blocks, channels and heads; partition size 2 instead of 7 so that 64×64 images fit
        # (224×224 is the smallest the 7×7 partition takes). fx cannot trace it: fresh calibration, whose forward
        # cost grows with layers × depth, so one block per stage instead of 2, 2, 5, 2: every kind of layer stays
        # (each stage's first block, the downsampling one, with its MBConv, squeeze-excitation, block and grid
        # attention and MLPs), the repeats of the same block go.
        return MaxVit(input_size=(64, 64), stem_channels=64, partition_size=2, block_channels=[64, 128, 256, 512],
                      block_layers=[1, 1, 1, 1], head_dim=32, stochastic_depth_prob=0.2), 64, "fresh"
    if name == "tied":
        return TiedHead(), 4, "fixed"
    if name == "swin_t":
        return models.swin_t(), 64, "fixed"
    return models.get_model(name, weights=None), 32, "fixed"


def weights_that_must_be_quantized(model, example):
    """Names of the weights of the Linear/ConvNd/MultiheadAttention modules that one forward pass calls, found
    with plain forward pre-hooks."""
    called = set()
    handles = [module.register_forward_pre_hook(lambda m, i, name=name: called.add(name))
               for name, module in model.named_modules()]
    with torch.no_grad():
        model(example)
    for handle in handles:
        handle.remove()
    canonical = {id(p): n for n, p in model.named_parameters()}  # a tied weight has one name
    names = set()
    for module_name, module in model.named_modules():
        if module_name not in called:
            continue
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            names.add(canonical[id(module.weight)])
        if isinstance(module, nn.MultiheadAttention):
            names.add(canonical[id(module.in_proj_weight)])
            names.add(canonical[id(module.out_proj.weight)])  # read by the attention function, never called
    return names


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_32", "swin_t", "maxvit_t", "convnext_tiny", "efficientnet_b0",
                                  "mobilenet_v3_small", "tied"])
def test_every_matmul_weight_is_quantized(name):
    model, size, calibration = build(name)
    model.eval()
    images = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(images, torch.zeros(8, dtype=torch.long))
    settings = QuantConfig(bits=4, mlp_scalar=1.3, cnn_scalar=1.3)
    quantized, reports = quantize_network(model, CalibrationStream(data, 0, chunk_size=4), lambda i, n, l: settings,
                                          Calibration(4, 0.25, 0, mode=calibration), Hooks(log=lambda *a: None))
    required = weights_that_must_be_quantized(model, images[:1]) - set(ALLOWED_FLOAT)
    layers = {layer.parameter: layer for layer in find_layers(model, images[:1]).layers}
    assert required <= set(layers), sorted(required - set(layers))
    coverage = reports.coverage
    assert {n for n, _, _ in coverage.unsupported} <= set(ALLOWED_FLOAT)
    assert coverage.chosen_float == []
    assert {n for n, _, _ in coverage.quantized} == set(layers)
    quantized_parameters = dict(quantized.named_parameters())
    for parameter, layer in layers.items():
        alphabet, _ = layer_alphabet(layer, settings)
        values = quantized_parameters[parameter].detach().double()
        assert torch.isin(values, alphabet.float().double()).all(), parameter
        original = layer.weight.detach().double()
        if not torch.isin(original, alphabet.float().double()).all():  # (ViT's head starts at zero: stays so)
            assert not torch.equal(values, original), parameter
    zero_weights = {parameter for parameter, layer in layers.items() if not layer.weight.detach().any()}
    for report in reports:  # an all-zero weight (ViT's head) has output 0: its relative error is undefined
        if report.parameter in zero_weights:
            assert math.isnan(report.relative_error), report.name
        else:
            assert 0.0 <= report.relative_error < 1.0, report.name
    if name == "tied":
        assert [(l.name, l.kind, l.uses) for l in layers.values()] == [("mix", "Linear", 2),
                                                                       ("embedding", "Embedding", 1)]
