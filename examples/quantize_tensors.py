"""Quantize a small CNN of your own on your own tensors: python3 examples/quantize_tensors.py"""
import argparse

import torch
from torch import nn

import gpfq

argparse.ArgumentParser(description=__doc__).parse_args()  # no options: only --help
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
    nn.Flatten(), nn.Linear(32, 10)).eval()
images = torch.randn(512, 3, 32, 32)  # your calibration inputs: a tensor, a Dataset or a DataLoader

config = gpfq.QuantConfig(bits=4, batch_size=256)  # GPFQ, 4-bit alphabets, m = 256 images per layer
result = gpfq.quantize(model, images, config)  # a quantized copy: `model` keeps its float weights

for report in result.reports:
    print(f"{report.name:4s} relative error {report.relative_error:.4f}")
test_inputs = torch.randn(256, 3, 32, 32)
with torch.no_grad():
    same = (model(test_inputs).argmax(1) == result.model(test_inputs).argmax(1)).float().mean()
print(f"the quantized model picks the float model's class on {same:.0%} of new inputs")
