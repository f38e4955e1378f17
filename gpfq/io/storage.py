"""Results on disk: models and their JSON records written atomically, never over an earlier run.

(The CSV logs are `gpfq.runner.logs`.)
"""
import io
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from gpfq.errors import BadInputError
from gpfq.paths import REPO_ROOT


def code_revision() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _write_temporary(folder: Path, name: str, write) -> Path:
    """Write a hidden temporary file in `folder` completely (flushed to disk); removed again on any error."""
    tmp = folder / f".{name}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # Ctrl-C included: leave no half-written file behind
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _atomic_write(path: Path, write) -> None:
    """Replace `path` in one step: readers see the old file or the new one, never part of one."""
    os.replace(_write_temporary(path.parent, path.name, write), path)


def write_new_file(path: Path, data: bytes) -> None:
    """Write `data` to a hidden temporary file, flush it to disk, then hard-link it to `path` (which fails,
    leaving no partial file, if `path` exists): a quantized model file or its ONNX export."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temporary(path.parent, path.name, lambda f: f.write(data))
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; a quantized model file is never overwritten") from None
    finally:
        tmp.unlink(missing_ok=True)


def _state_bytes(model) -> memoryview:
    """The model's state dict as torch.save writes it. Serialized in memory first: torch turns a failed write to
    a file (a full disk) into a RuntimeError 'unexpected pos …' that no longer says why; writing the bytes
    ourselves keeps the OSError and its errno."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer()


def save_model(model, record: dict, model_dir: Path, stem: str, written: list = None) -> Path:
    """Write <stem>.pt (state dict) and <stem>.json atomically; never overwrite an earlier run.

    The name is claimed with a hard link of the finished file, which fails if the name exists, so
    two processes saving under the same stem at the same moment both keep their model. `written`, if given,
    receives each file once it is complete, so a caller can say what a failed save left on disk.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    written = [] if written is None else written
    data = _state_bytes(model)
    tmp = _write_temporary(model_dir, f"{stem}.pt", lambda f: f.write(data))
    try:
        counter = 0
        while True:
            path = model_dir / (f"{stem}.pt" if counter == 0 else f"{stem}_{counter}.pt")
            counter += 1
            if path.with_suffix(".json").exists():
                continue
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                continue
    finally:
        tmp.unlink(missing_ok=True)
    written.append(path)
    write_record(path.with_suffix(".json"), record)
    written.append(path.with_suffix(".json"))
    return path


def write_record(path: Path, record: dict) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(record, indent=2, default=str) + "\n").encode()))


def display_path(path: Path) -> str:
    """A path relative to the repo root when inside it, else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


class UnwritableFolderError(BadInputError, PermissionError):
    """A result folder that cannot be written."""


def check_writable(folder: Path, key: str = "folder") -> None:
    """Create `folder` if needed and write a file in it: a folder results cannot go to is found before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UnwritableFolderError(f"{key} {folder} is not a writable folder ({type(error).__name__}: {error}), "
                                    f"so results could not be saved there. Fix it, or choose another with --{key} "
                                    f"PATH") from error
