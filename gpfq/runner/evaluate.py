"""Top-1 / top-5 accuracy, and the warnings of an accuracy near chance."""
from typing import Optional

import torch
from tqdm import tqdm

from gpfq.pipeline import distributed


@torch.no_grad()
def evaluate(model, loader, device="cpu", progress=True, desc="evaluate", shard=None):
    """(top-1, top-5) accuracy of `model` over `loader`, as fractions.

    shard: a `distributed.Shard` (default: the initialized process group, if any): each rank scores
    its contiguous share of the loader's dataset and the counts are summed, so the fractions are
    exactly those of one process.
    """
    shard = distributed.current() if shard is None else shard
    if shard.active:
        loader = shard.evaluation_loader(loader)
    model.eval().to(device)
    correct1 = correct5 = total = 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not (progress and shard.writer)):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(labels.unsqueeze(1))
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += labels.numel()
    if shard.active:
        counts = torch.tensor([correct1, correct5, total], dtype=torch.int64,
                              device=device if shard.backend == "nccl" else "cpu")
        correct1, correct5, total = (int(c) for c in shard.all_reduce_(counts, f"{desc}: sum the correct counts"))
    return correct1 / total, correct5 / total


# A final top-1 this close to guessing (1 / number of classes), or below it, means the quantized model is broken.
CHANCE_MARGIN = 0.02


def classes_in(dataset) -> Optional[int]:
    """The number of distinct labels in an evaluation set, when its labels can be read without loading the
    images: `targets` (torchvision, ImageFolder) or a TensorDataset's second tensor, through Subsets; else None."""
    indices = None
    while isinstance(dataset, torch.utils.data.Subset):
        indices = list(dataset.indices) if indices is None else [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    labels = getattr(dataset, "targets", None)
    if labels is None and isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) > 1:
        labels = dataset.tensors[1]
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        return None
    if labels.dim() != 1 or labels.is_floating_point() or labels.numel() == 0:
        return None
    return int(torch.unique(labels if indices is None else labels[indices]).numel())


def chance_warnings(top1: float, n_classes: int, counted: str = "classes") -> list:
    """A warning when top-1 is within CHANCE_MARGIN of chance (1 / n_classes), another when it is below that.
    counted: what n_classes counts ('classes' of the evaluation data, or the model's 'outputs')."""
    chance = 1.0 / n_classes
    level = f"chance ({chance:.4f} for {n_classes} {counted})"
    if abs(top1 - chance) <= CHANCE_MARGIN:
        return [f"final top-1 {top1:.4f} is within {CHANCE_MARGIN * 100:.0f} points of {level}"]
    if top1 < chance:
        return [f"final top-1 {top1:.4f} is below {level}: worse than guessing"]
    return []
