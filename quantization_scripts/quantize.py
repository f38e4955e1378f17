"""GPFQ post-training quantization (the paper's main experiment).

Edit the hyperparameters below and run `python3 quantize.py` (from this folder or the
repo root). Any name can also be overridden on the command line, e.g.
`python3 quantize.py --bits 3 4 --model resnet18 --dataset imagenet`. List values
expand into a grid: every combination runs and appends one row to
logs/Quantization_Log.csv; each quantized model goes to models/<model_name>/.
"""
import sys
from pathlib import Path

# ------------------------------------------------------------------ hyperparameters
model_name = "fashion_resnet"   # embedded: fashion_resnet, fashion_mobilenet; or a torchvision name: resnet18, ...
dataset = "fashion_mnist"       # "fashion_mnist" (embedded models) or "imagenet" (data/ILSVRC2012)
weights = "DEFAULT"             # "DEFAULT" (shipped / torchvision ImageNet weights), "random", or a state-dict path
method = "gpfq"                 # "gpfq" or "msq" (round to nearest, same alphabet)
bits = [4]                      # bits per weight
batch_size = [512]              # m: calibration images drawn afresh for every layer
mlp_scalar = [1.3]              # C for Linear layers: alphabet radius = C * rad
cnn_scalar = [1.3]              # C for Conv2d layers
mlp_percentile = [1.0]          # rad = mean over neurons of this quantile of |w| (1.0 = max)
cnn_percentile = [1.0]
alphabet = "gpfq2022"           # "gpfq2022" (paper: 2^b + 1 levels), "midtread", "strict" (2^b levels)
include_0 = True                # gpfq2022 alphabet: append the level 0
retain_rate = 0.25              # conv layers: fraction p of each image's patches kept
patch_stride = "kernel"         # conv patches: "kernel" (paper: non-overlapping) or "layer" (the layer's stride)
ignore_layers = []              # layer indices (execution order) left float
seed = 0
author = ""
num_workers = 0                 # data-loading processes
device = "cpu"                  # "cpu" or "cuda"
# ------------------------------------------------------------------------------------

HEADER = dict(model_name=model_name, dataset=dataset, weights=weights, method=method, bits=bits,
              batch_size=batch_size, mlp_scalar=mlp_scalar, cnn_scalar=cnn_scalar, mlp_percentile=mlp_percentile,
              cnn_percentile=cnn_percentile, alphabet=alphabet, include_0=include_0, retain_rate=retain_rate,
              patch_stride=patch_stride, ignore_layers=ignore_layers, seed=seed, author=author,
              num_workers=num_workers, device=device, log_dir=None, model_dir=None, data_dir=None)

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gpfq.experiment import main
    main(HEADER)
