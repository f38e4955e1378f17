"""Retraining variant (docs/variants.md): quantize layer by layer in place, fine-tuning what is still float.

The network is quantized in place (`gpfq.quantize(..., in_place=True)`), so every layer's X̃ = X:
its input comes from the network as it is now, earlier layers quantized and later ones fine-tuned.
After each quantized layer (from the `retrain_start`-th on), that layer is frozen and every parameter
that does not belong to a quantized layer (later Conv2d/Linear layers, every BatchNorm's scale and
shift) is fine-tuned with Adam and cross-entropy on labelled training images, so the later layers
learn to compensate for the quantization error before they are quantized themselves.

Frozen means requires_grad=False and absent from the optimizer, so neither the gradient step nor
Adam's weight decay can move a quantized weight off its alphabet.

BatchNorm during fine-tuning (`retrain_batchnorm`): 'frozen' runs the network in eval mode (running
statistics fixed, used as at test time; scale and shift still trained), 'update' in train mode (batch
statistics, running statistics updated; dropout, where a model has it, on).
"""
import copy
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from gpfq.api import quantize as quantize_model
from gpfq.errors import bad_hyperparameter
from gpfq.runner.evaluate import evaluate
from gpfq.runner.experiment import Variant
from gpfq.runner.logs import EXTRA_COLUMNS, PAPER_COLUMNS

RETRAIN_LOG = "Quantization_Log_Retrain.csv"
LOGS = {RETRAIN_LOG: PAPER_COLUMNS + [
    "Retrain Start", "Retrain Samples", "Retrain Batch Size", "Retrain Epochs", "Retrain Learning Rate",
    "Retrain Weight Decay", "Retrain BatchNorm", "Retrain Seconds", "Per-Step Top1"] + EXTRA_COLUMNS}
BATCHNORM_MODES = ("frozen", "update")
RETRAIN_SEED_OFFSET = 2_000_003  # the retraining images and their order are seeded with seed + this
# Keys of the retraining header that expand into the grid (beside the plain ones).
GRID_KEYS = ("retrain_start", "retrain_samples", "retrain_batch_size", "retrain_epochs", "retrain_lr",
             "retrain_weight_decay", "retrain_batchnorm")
# Every key the retraining header adds to the plain one.
HEADER_KEYS = GRID_KEYS + ("evaluate_each_step",)


@dataclass(frozen=True)
class RetrainOptions:
    """The retraining header keys of a grid point (`RunConfig.options`), named without their `retrain_` prefix."""
    start: int  # fine-tune after the start-th quantized layer and every later one
    samples: Optional[int]  # training images drawn per fine-tuning (None: the whole set)
    batch_size: int
    epochs: int
    lr: float
    weight_decay: float
    batchnorm: str  # one of BATCHNORM_MODES
    evaluate_each_step: bool  # evaluate top-1 after each fine-tuning (the Per-Step Top1 column)


def parse_options(point: dict) -> RetrainOptions:
    """The retraining options of a grid point, checked."""
    def fail(message):
        raise bad_hyperparameter(message)

    options = RetrainOptions(*(point.get(key) for key in HEADER_KEYS))  # the fields are in HEADER_KEYS' order
    for key, low in (("start", 1), ("batch_size", 1), ("epochs", 0), ("samples", 1)):
        value = getattr(options, key)
        if key == "samples" and value is None:  # the whole train set
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            fail(f"retrain_{key} must be an integer ≥ {low}, got {value!r}")
    lr, decay = options.lr, options.weight_decay
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        fail(f"retrain_lr must be a number > 0, got {lr!r}")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0:
        fail(f"retrain_weight_decay must be a number ≥ 0, got {decay!r}")
    if options.batchnorm not in BATCHNORM_MODES:
        fail(f"retrain_batchnorm must be one of {BATCHNORM_MODES}, got {options.batchnorm!r}")
    if not isinstance(options.evaluate_each_step, bool):
        fail(f"evaluate_each_step must be True or False, got {options.evaluate_each_step!r}")
    calibration = point.get("calibration", "fresh")
    if calibration != "fresh":
        # 'fixed' caches activations as it walks the network; fine-tuning changes layers it has passed
        fail(f"retraining needs calibration='fresh' (fine-tuning changes layers whose outputs 'fixed' has "
             f"cached), got {calibration!r}")
    return options


def freeze(layer: nn.Module) -> None:
    """Take a quantized layer out of every later optimization: the parameters of the module that holds its
    weight (weight and bias), not those of its submodules (MultiheadAttention's out_proj is quantized, and
    frozen, after its in-projection, and is fine-tuned until then)."""
    for parameter in layer.parameters(recurse=False):
        parameter.requires_grad_(False)


def fine_tune(model: nn.Module, dataset, indices, options: RetrainOptions, generator: torch.Generator, device="cpu",
              num_workers: int = 0, desc="retrain"):
    """Adam on cross-entropy over `dataset[indices]` for `options.epochs`, on the parameters with requires_grad
    (`options`: batch size, epochs, lr, weight decay, batchnorm mode; `start`, `samples` are the caller's).

    Returns (mean loss of the last epoch, number of optimizer steps). The model is left in eval mode.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=options.lr, weight_decay=options.weight_decay)
    loader = DataLoader(Subset(dataset, indices), batch_size=options.batch_size, shuffle=True, generator=generator,
                        num_workers=num_workers)
    loss_fn = nn.CrossEntropyLoss()
    model.train(options.batchnorm == "update")
    mean_loss, steps = float("nan"), 0
    try:
        for epoch in range(options.epochs):
            total, count = 0.0, 0
            for images, labels in loader:
                images, labels = images.to(device), labels.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(images), labels)
                loss.backward()
                optimizer.step()
                total, count, steps = total + float(loss.detach()) * labels.numel(), count + labels.numel(), steps + 1
            mean_loss = total / count
    finally:
        model.eval()
    return mean_loss, steps


def quantize(context):
    """Quantize a copy of the float model in place with fine-tuning between layers.

    Returns (model, [LayerReport], extra log columns).
    """
    options, log, device = context.run.options, context.log, context.device
    model = copy.deepcopy(context.analog_model).eval().to(device)  # the shared float model stays float
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    generator = torch.Generator().manual_seed(context.config.seed + RETRAIN_SEED_OFFSET)
    train_set = context.calibration
    samples = len(train_set) if options.samples is None else min(options.samples, len(train_set))
    quantized_count, per_step, retrain_seconds = 0, [], 0.0

    def after_layer(step):
        nonlocal quantized_count, retrain_seconds
        freeze(step.quantized_layer)
        quantized_count += 1
        if quantized_count < options.start or options.epochs == 0:
            return
        trainable = [q for q in model.parameters() if q.requires_grad]
        if not trainable:
            log("    retrain: no float parameters left")
            return
        start = time.time()
        indices = torch.randperm(len(train_set), generator=generator)[:samples].tolist()
        loss, steps = fine_tune(model, train_set, indices, options, generator, device, context.run.num_workers)
        retrain_seconds += time.time() - start
        message = (f"    retrain after {step.report.name}: {steps} Adam steps on {samples} images × "
                   f"{options.epochs} epochs, {sum(q.numel() for q in trainable)} float parameters, "
                   f"loss {loss:.4f}, {time.time() - start:.1f}s")
        if options.evaluate_each_step:
            top1, _ = evaluate(model, context.loader(), device=device, desc=f"after {step.report.name}")
            per_step.append(f"{step.report.name}={top1:.4f}")
            message += f"; test top-1 {top1:.4f}"
        log(message)

    result = quantize_model(model, context.stream(), context.config, device=device, after_layer=after_layer,
                            in_place=True, log=log)
    model, reports = result.model, result.reports
    model.requires_grad_(False)
    extra = dict(variant_columns(context.point), **{"Retrain Samples": samples, "Retrain Seconds": round(retrain_seconds, 2),
                                        "Per-Step Top1": " ".join(per_step)})
    return model, reports, extra


def variant_columns(point) -> dict:
    """The retraining hyperparameter columns of a point's row (with the plain ones, they identify it for
    `resume`). Retrain Samples None (the whole train set) is logged as the set's size, so it never matches:
    such a point is run again."""
    options = point.run.options
    return {
        "Retrain Start": options.start, "Retrain Samples": options.samples,
        "Retrain Batch Size": options.batch_size, "Retrain Epochs": options.epochs,
        "Retrain Learning Rate": options.lr, "Retrain Weight Decay": options.weight_decay,
        "Retrain BatchNorm": options.batchnorm,
    }


RETRAIN = Variant(name="retrain", quantize=quantize, logs=LOGS, header_keys=HEADER_KEYS, grid_keys=GRID_KEYS,
                  columns=variant_columns, result_columns=frozenset({"Retrain Seconds", "Per-Step Top1"}),
                  options=parse_options, layer_checkpoints=False)
