"""A model of your own for the scripts:

    python3 quantization_scripts/quantize.py --model examples/my_model.py:build --dataset imagefolder --data_dir DIR

`build` takes no arguments and returns the model. `input_size` tells the ImageFolder reader how to prepare
images (resized and centre-cropped to 32×32, ImageNet mean/std); pass --weights a state-dict file for
trained weights (without it the model keeps its random initialization).
"""
import torch
from torch import nn


class SmallCNN(nn.Module):
    input_size = (3, 32, 32)  # (channels, height, width) of one prepared image

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def build() -> nn.Module:
    torch.manual_seed(0)  # the same random initialization every time, when no --weights are given
    return SmallCNN()
