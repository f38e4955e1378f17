"""Per-layer checkpoints: a grid point interrupted after layer k goes on at layer k + 1 (`--resume`).

After a quantized layer, `quantize_network` hands `LayerCheckpoint.after_layer` what it needs to go on:
the partially quantized model's state dict, the patch-sampling generator's state, the calibration
stream's position (`streams.CalibrationStream.state`) and the layer reports. The file is written
atomically (a temporary file in the same folder, fsync, os.replace) and removed once the point's row
is logged. Its name is a hash of the point's identity (the columns `--resume` matches rows on, plus the
chunk size and device), so another point never finds it; its content repeats the identity, the code revision,
the layer names and a hash of the float weights (a factory that draws new weights in every process makes
another network), and a checkpoint that disagrees, cannot be read, or whose SHA-256 (over all its bytes, every tensor included) does not match is
ignored with one line and the point starts afresh.

One process owns a checkpoint: `load` takes an exclusive lock (flock on `<name>.lock`, released by the kernel
when the process ends, so a crashed run's checkpoint is found by the next `--resume`). A second run of the same
point at the same time writes no checkpoint and never removes the first one's. docs/reliability.md
("Nothing lost") has the policy and its cost.
"""
import fcntl
import hashlib
import io
import json
import math
import os
import signal
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

FORMAT = 2
# A checkpoint file is MAGIC, the SHA-256 of the payload (32 bytes), then the payload (torch.save of the state).
MAGIC = b"GPFQ-CKPT\n"
MODES = ("auto", True, False)
# 'auto' writes after a layer unless the last write took more than this fraction of the time since it:
# for a small model that is every layer, for a large one it bounds the cost at about 5 %.
AUTO_SHARE = 0.05
# The checkpoint locks this process holds: {lock path: open file}; the kernel drops them when the process ends.
_HELD = {}
# Test hook: SIGKILL the process right after the checkpoint of this layer (1-based) is written.
KILL_VARIABLE = "GPFQ_TEST_KILL_AFTER_LAYER"


def weights_hash(model: torch.nn.Module) -> str:
    """The first 16 hex digits of a SHA-256 over a model's state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def read_checkpoint(path) -> dict:
    """The state saved in a checkpoint file; ValueError when its SHA-256 does not match (a corrupted file)."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError("not a checkpoint of this format")
    digest, payload = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("its SHA-256 does not match its content: the file was corrupted")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def checkpoint_name(identity: dict) -> str:
    """'checkpoint-<16 hex>.ckpt', the hash of the point's identity (JSON, keys sorted); not .pt, since a model
    folder's *.pt files are its finished models."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return f"checkpoint-{hashlib.sha256(text.encode()).hexdigest()[:16]}.ckpt"


class LayerCheckpoint:
    """The checkpoint file of one grid point. mode: 'auto', True (after every layer) or False (never).
    resume: `load` returns a matching checkpoint's state (else None: a fresh start)."""

    def __init__(self, folder, identity: dict, revision: str, mode="auto", resume: bool = False, log=print,
                 float_weights: str = ""):
        self.path = Path(folder) / checkpoint_name(identity)
        self.float_weights = float_weights  # weights_hash of the float model: a checkpoint of others is not restored
        self.identity, self.revision, self.mode, self.resume, self.log = identity, revision, mode, resume, log
        self.written, self.write_seconds, self._last_end, self._last_cost = 0, 0.0, None, 0.0
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self._key = os.path.abspath(self.lock_path)
        self._lock = None  # the open lock file while this process owns the checkpoint
        self.owned = True  # False once another process is found holding it: no write, no removal

    def _acquire(self) -> bool:
        """Take the checkpoint's lock (non-blocking); False when another running process holds it."""
        if self._lock is None:  # this process may hold it already (another object of the same point)
            self._lock = _HELD.get(self._key)
        if self._lock is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.lock_path, "a+b")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                return False
            try:  # the file may have been removed (and another made) between our open and our lock
                same = os.stat(self.lock_path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock = _HELD[self._key] = handle
                return True
            handle.close()

    def load(self, layer_names: list):
        """The saved state {next_index, model, generator, stream, reports} if it fits this point, else None
        (with one line saying why, when a file was there). Takes the checkpoint's lock first: when another
        process holds it, this run writes no checkpoint (one line says so)."""
        if not self.mode:
            return None
        if not self._acquire():
            self.owned = False
            self.log(f"checkpoint: another run of this grid point is using {self.path}; this run writes no "
                     f"checkpoint and leaves that one alone")
            return None
        if not self.path.exists():
            return None
        if not self.resume:
            self.log(f"checkpoint: {self.path} is there but --resume is not set: starting the point afresh "
                     f"(the file is replaced)")
            return None
        try:
            state = self._read()
        except Exception as error:  # truncated or corrupt: a checksum mismatch or any unpickling error
            self.log(f"checkpoint: cannot read {self.path} ({type(error).__name__}: {str(error)[:120]}); "
                     f"ignoring it and starting the point afresh")
            return None
        why = None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            why = "an unknown checkpoint format"
        elif state.get("identity") != json.loads(json.dumps(self.identity, default=str)):
            why = "another grid point's settings"
        elif state.get("revision") != self.revision:
            why = f"written by code revision {state.get('revision')}, this is {self.revision}"
        elif state.get("layers") != list(layer_names):
            why = "another model's layers"
        elif state.get("float_weights", "") != self.float_weights:
            why = "made from other float weights"
        if why:
            self.log(f"checkpoint: ignoring {self.path} ({why}); starting the point afresh")
            return None
        return state

    def _read(self) -> dict:
        return read_checkpoint(self.path)

    def due(self) -> bool:
        """Whether the layer just finished is to be saved (mode True: always; 'auto': rate-limited)."""
        if self.mode is False or not self.owned:
            return False
        if self.mode is True or self._last_end is None:
            return True
        return self._last_cost <= AUTO_SHARE * (time.perf_counter() - self._last_end)

    def after_layer(self, index: int, make_state) -> None:
        """Write make_state() (layer `index`, 0-based, is the last one in it) if it is due."""
        if not self.due():
            return
        start = time.perf_counter()
        state = dict(make_state(), format=FORMAT, identity=json.loads(json.dumps(self.identity, default=str)),
                     revision=self.revision, float_weights=self.float_weights)
        if not self._acquire():  # load() was not called (a caller outside the layer loop): own it first
            self.owned = False
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + hashlib.sha256(payload).digest() + payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._last_end = time.perf_counter()
        self._last_cost = self._last_end - start
        self.size_bytes = len(payload) + len(MAGIC) + 32
        self.written += 1
        self.write_seconds += self._last_cost
        if os.environ.get(KILL_VARIABLE) == str(index + 1):
            os.kill(os.getpid(), signal.SIGKILL)

    def remove(self) -> None:
        """Delete the checkpoint (its point is logged) and release the lock; never another process's."""
        if not self.owned or not self._acquire():
            self.owned = False
            return
        self.path.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        """Give up the lock (the run of the point ends, logged or not); the checkpoint itself stays."""
        if self._lock is None:
            return
        self.lock_path.unlink(missing_ok=True)  # while still locked: an opener waiting on it re-checks the inode
        _HELD.pop(self._key, None)
        self._lock.close()
        self._lock = None


def reports_state(reports) -> list:
    """LayerReports as plain dicts (alphabet tensors included) that torch.load(weights_only=True) reads."""
    return [asdict(report) for report in reports]


def reports_from_state(records: list, report_type) -> list:
    names = {f.name for f in fields(report_type)}
    out = []
    for record in records:
        values = {k: v for k, v in record.items() if k in names}
        values["weight_shape"] = tuple(values["weight_shape"])
        out.append(report_type(**values))
    return out


def summary(checkpoint: "LayerCheckpoint", seconds: float) -> str:
    share = checkpoint.write_seconds / seconds if seconds > 0 else math.nan
    return (f"checkpoint: {checkpoint.written} written ({checkpoint.size_bytes / 1e6:.2f} MB each), "
            f"{checkpoint.write_seconds:.2f}s in all, {share:.1%} of {seconds:.1f}s")
