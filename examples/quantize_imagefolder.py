"""Quantize a torchvision classifier on an image folder (DIR/train/<class>/<image>, DIR/val/<class>/<image>):

    python3 examples/quantize_imagefolder.py DIR [--model resnet18] [--bits 4] [--random]

train/ calibrates; on val/ the quantized model's predictions are compared with the float model's.
--random: untrained weights (offline)."""
import argparse

import torch
from torchvision import datasets, models

import gpfq

parser = argparse.ArgumentParser()
parser.add_argument("folder")
parser.add_argument("--model", default="resnet18")
parser.add_argument("--bits", type=int, default=4)
parser.add_argument("--random", action="store_true")
args = parser.parse_args()

weights = models.get_model_weights(args.model).DEFAULT  # its transforms() are the model's own preprocessing
model = models.get_model(args.model, weights=None if args.random else weights).eval()
train, val = (datasets.ImageFolder(f"{args.folder}/{split}", weights.transforms()) for split in ("train", "val"))

result = gpfq.quantize(model, train, gpfq.QuantConfig(bits=args.bits, batch_size=min(len(train), 512)))
with torch.no_grad():
    same = sum(int((model(x).argmax(1) == result.model(x).argmax(1)).sum())
               for x, _ in torch.utils.data.DataLoader(val, batch_size=64))
print(f"{args.model}: {len(result.reports)} layers at {args.bits} bits; the float model's class on {same}/{len(val)} images")
