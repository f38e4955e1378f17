"""What several tests share, built on the public surface only: hashes, alphabet checks, accuracy, tiny models."""
import hashlib
import json

import torch
from torch.utils.data import DataLoader, TensorDataset


def state_hash(state: dict) -> str:
    """sha256 over a state dict: for each key in sorted order, its name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def off_alphabet(model, reports) -> dict:
    """{parameter: entries not on the layer's alphabet} for every quantized layer that has any (an empty dict
    when every quantized weight is one of its alphabet's levels, per channel where the alphabet is)."""
    parameters = dict(model.named_parameters())
    bad = {}
    for report in reports:
        weight = parameters[report.parameter].detach().cpu().float()
        if report.input_major:
            weight = weight.t()
        rows = weight.reshape(weight.shape[0], -1)
        levels = report.alphabet.float()
        if levels.dim() == 1:
            hits = (rows.unsqueeze(-1) == levels).any(-1)
        else:  # (G, N1, L) per group and channel: the groups' channels stack along N1
            per_row = levels.reshape(-1, levels.shape[-1])
            hits = (rows.unsqueeze(-1) == per_row.unsqueeze(1)).any(-1)
        if not bool(hits.all()):
            bad[report.parameter] = int((~hits).sum())
    return bad


@torch.no_grad()
def top1(model, dataset, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` (eval mode) over a dataset of (image, label)."""
    correct = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        correct += int((model(images).argmax(1) == labels).sum())
        total += labels.numel()
    return correct / total


def resnet18_calibration():
    """ResNet-18 (torchvision, random weights of seed 0) and 8 random 48-px calibration images (seed 1)."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    images = torch.randn(8, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    return model, TensorDataset(images, torch.zeros(8, dtype=torch.long))


def worst_relative_gap(errors: list, recorded: list) -> float:
    """max over layers of |error / recorded − 1|: how far a run's per-layer errors are from a recorded run's."""
    assert len(errors) == len(recorded), (len(errors), len(recorded))
    return max(abs(e / r - 1) for e, r in zip(errors, recorded))


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (C order), what a quantized file's header records per tensor."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def safetensors_metadata(raw: bytes) -> dict:
    """The "__metadata__" of a safetensors file's bytes: an 8-byte little-endian header length, then JSON."""
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length].decode("utf-8")).get("__metadata__") or {}
