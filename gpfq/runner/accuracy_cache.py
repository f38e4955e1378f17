"""The float model's accuracy, measured once per model, data and machine settings and kept on disk.

Every script run evaluates the float model before it quantizes, which on CPU takes as long as a quantization
(ImageNet's 50,000 images: minutes). A grid run in one process measures it once; separate runs (the rows of
experiments/reproduce.py, a sweep run as several commands, a --resume) measured it again each time. Here the
result is kept under a key of everything that decides it, so a rerun reads it instead:

- the model: every tensor of its state dict (names, dtypes, shapes and bytes), so other weights, a BatchNorm
  fold or a random draw from another seed is another key; and the source files of its module classes, so an
  edited forward is too (code it calls in other files is not seen: GPFQ_CACHE_DIR=off while you edit that);
- the evaluation data: a TensorDataset's tensors, or an image folder's files (path, size, modification time,
  label) and preprocessing, through Subsets (eval_subset) by their indices; data of another kind is not cached;
- what the float paths depend on: device, torch version, torch threads, ONEDNN_MAX_CPU_ISA and MKL_CBWR.

The folder is GPFQ_CACHE_DIR, else $XDG_CACHE_HOME/gpfq, else ~/.cache/gpfq; GPFQ_CACHE_DIR=off measures every
time. Under torchrun the float model is always evaluated: every rank must join the evaluation's all-reduce, and
one rank reading a cache another lacks would leave it waiting. A file that cannot be read is measured again
and rewritten; one that cannot be written is skipped.
No library keeps such a cache keyed by a model's bytes, hence this module.
"""
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Subset, TensorDataset

from gpfq.io.storage import write_record

TORCH_DIR = os.path.dirname(torch.__file__)


def cache_folder() -> Optional[Path]:
    """Where the accuracies are kept; None when GPFQ_CACHE_DIR is 'off'."""
    chosen = os.environ.get("GPFQ_CACHE_DIR", "").strip()
    if chosen.lower() == "off":
        return None
    if chosen:
        return Path(chosen) / "float_accuracy"
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "gpfq" / "float_accuracy"


def _tensor_digest(digest, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def _data_digest(digest, dataset) -> bool:
    """Feed what decides the evaluation data into `digest`; False for data whose content cannot be pinned."""
    while isinstance(dataset, Subset):
        digest.update(repr(list(dataset.indices)).encode())
        dataset = dataset.dataset
    if isinstance(dataset, TensorDataset):
        for tensor in dataset.tensors:
            _tensor_digest(digest, tensor)
        return True
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return False
    digest.update(f"{type(dataset).__qualname__} {getattr(dataset, 'transform', None)!r} "
                  f"{getattr(dataset, 'target_transform', None)!r}".encode())
    try:
        for path, label in samples:
            stat = os.stat(path)
            digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    except OSError:  # a vanished file: not cached; the evaluation reports it
        return False
    return True


def accuracy_key(model: torch.nn.Module, dataset, device: str) -> Optional[str]:
    """SHA-256 of the model, the data and the float-path settings; None when the data cannot be pinned."""
    digest = hashlib.sha256()
    if not _data_digest(digest, dataset):
        return None
    # The code of the model's module classes: an edited forward on the same weights is another model.
    for kind in sorted({type(module) for module in model.modules()}, key=lambda k: f"{k.__module__}.{k.__qualname__}"):
        digest.update(f"{kind.__module__}.{kind.__qualname__}".encode())
        source = getattr(sys.modules.get(kind.__module__), "__file__", None)
        if source and not source.startswith(TORCH_DIR):  # torch's own modules: the torch version is in the key
            try:
                digest.update(Path(source).read_bytes())
            except OSError:
                pass
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        _tensor_digest(digest, tensor)
    settings = (str(device), torch.__version__, torch.get_num_threads(), os.environ.get("ONEDNN_MAX_CPU_ISA"),
                os.environ.get("MKL_CBWR"))
    digest.update(repr(settings).encode())
    return digest.hexdigest()


def cached_accuracy(model: torch.nn.Module, dataset, device: str, measure, log) -> tuple:
    """(top-1, top-5) of `model` on `dataset`: read from the cache when this key was measured before, else
    measure() and keep it."""
    folder = cache_folder()
    key = accuracy_key(model, dataset, device) if folder is not None else None
    if key is None:
        return measure()
    path = folder / f"{key}.json"
    try:
        kept = json.loads(path.read_text())
        top1, top5 = float(kept["top1"]), float(kept["top5"])
        log(f"float model: top-1 {top1:.4f}, top-5 {top5:.4f}, as measured on the same weights, data and settings "
            f"({path}; GPFQ_CACHE_DIR=off measures again)")
        return top1, top5
    except (OSError, ValueError, KeyError, TypeError):  # absent, torn or foreign: measure (again)
        pass
    top1, top5 = measure()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_record(path, {"top1": top1, "top5": top5, "model": type(model).__qualname__, "images": len(dataset)})
    except OSError:  # a read-only home or a full disk: the run goes on, measuring next time too
        pass
    return top1, top5
