"""Every listed torchvision classifier quantizes end to end (random weights, tiny inputs)."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gpfq import QuantConfig
from gpfq.pipeline.streams import CalibrationStream
from gpfq.io.models import load_model
from gpfq.pipeline.network import Calibration, Hooks, layer_alphabet, quantize_network

pytestmark = pytest.mark.slow  # every test here runs whole models (see docs/testing.md)

ARCHITECTURES = ["alexnet", "vgg16", "resnet18", "resnet50", "googlenet", "mobilenet_v2", "efficientnet_b1"]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architecture_quantizes(name):
    torch.manual_seed(0)
    model = load_model(name, "random")
    images = TensorDataset(torch.randn(4, 3, 64, 64), torch.zeros(4, dtype=torch.long))
    settings = QuantConfig(method="gpfq", bits=3, mlp_scalar=1.2, cnn_scalar=1.2)
    quantized, reports = quantize_network(model, CalibrationStream(images, seed=0, chunk_size=2),
                                          lambda i, n, layer: settings, Calibration(2, 0.25, 0),
                                          Hooks(log=lambda *_: None))
    called = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if name == "googlenet":  # auxiliary heads do not run in eval mode and stay float
        called = [n for n in called if not n.startswith("aux")]
    assert sorted(r.name for r in reports) == sorted(called)
    depthwise = [r for r in reports if isinstance(model.get_submodule(r.name), nn.Conv2d)
                 and model.get_submodule(r.name).groups > 1]
    if name in ("mobilenet_v2", "efficientnet_b1"):
        assert depthwise, "depthwise convolutions must be quantized per group"
    for report in reports:
        layer = quantized.get_submodule(report.name)
        alphabet, _ = layer_alphabet(model.get_submodule(report.name), settings)
        on_alphabet = torch.isin(layer.weight.detach().double(), alphabet.float().double())
        assert on_alphabet.all(), report.name
        assert 0.0 <= report.relative_error < 1.0, (report.name, report.relative_error)
