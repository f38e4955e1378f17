"""Top-1 / top-5 accuracy."""
import torch
from tqdm import tqdm


@torch.no_grad()
def evaluate(model, loader, device="cpu", progress=True, desc="evaluate"):
    """(top-1, top-5) accuracy of `model` over `loader`, as fractions."""
    model.eval().to(device)
    correct1 = correct5 = total = 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not progress):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(labels.unsqueeze(1))
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += labels.numel()
    return correct1 / total, correct5 / total
