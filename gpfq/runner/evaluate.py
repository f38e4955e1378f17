"""Top-1 / top-5 accuracy."""
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
