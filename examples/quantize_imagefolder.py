"""Quantize a torchvision classifier on an image folder: python3 examples/quantize_imagefolder.py DIR [--model NAME]

DIR/train/<class>/<image> calibrates; on DIR/val/<class>/<image> the quantized model's predictions are compared
with the float model's. --random: untrained weights (for offline use)."""
import argparse

import torch
from torchvision import datasets, models

import gpfq.runner.cli
import gpfq.io.models

parser = argparse.ArgumentParser()
parser.add_argument("folder")
parser.add_argument("--model", default="resnet18")
parser.add_argument("--random", action="store_true")
args = parser.parse_args()

weights = models.get_model_weights(args.model).DEFAULT  # its transforms() are the model's own preprocessing
model = gpfq.runner.cli.run_script(gpfq.io.models.load_model, args.model, "random" if args.random else "DEFAULT")
train, val = (datasets.ImageFolder(f"{args.folder}/{split}", weights.transforms()) for split in ("train", "val"))

# 4 bits; calibration="fixed": one set of m images and one forward pass per network (the paper redraws per layer)
config = gpfq.QuantConfig(bits=4, batch_size=min(len(train), 512), calibration="fixed")
result = gpfq.quantize(model, train, config)
with torch.no_grad():
    same = sum(int((model(x).argmax(1) == result.model(x).argmax(1)).sum())
               for x, _ in torch.utils.data.DataLoader(val, batch_size=64))
print(f"{args.model}: {len(result.reports)} layers at 4 bits; the float model's class on {same}/{len(val)} images")
