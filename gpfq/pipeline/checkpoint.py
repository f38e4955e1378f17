"""Per-layer checkpoints: a grid point interrupted after layer k goes on at layer k + 1 (`--resume`).

After a quantized layer, `quantize_network` hands `LayerCheckpoint.after_layer` what it needs to go on:
the partially quantized model's state dict, the patch-sampling generator's state, the calibration
stream's position (`streams.CalibrationStream.state`) and the layer reports. The file is written
atomically (a temporary file in the same folder, fsync, os.replace) and removed once the point's row
is logged. Its name is a hash of the point's identity (the columns `--resume` matches rows on, plus the
chunk size and device), so another point never finds it; its content repeats the identity, the code
revision and the layer names, and a checkpoint that disagrees, or cannot be read, is ignored with one
line and the point starts afresh. docs/reliability.md ("Nothing lost") has the policy and its cost.
"""
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

FORMAT = 1
MODES = ("auto", True, False)
# 'auto' writes after a layer unless the last write took more than this fraction of the time since it:
# for a small model that is every layer, for a large one it bounds the cost at about 5 %.
AUTO_SHARE = 0.05
# Test hook: SIGKILL the process right after the checkpoint of this layer (1-based) is written.
KILL_VARIABLE = "GPFQ_TEST_KILL_AFTER_LAYER"


def checkpoint_name(identity: dict) -> str:
    """'checkpoint-<16 hex>.ckpt', the hash of the point's identity (JSON, keys sorted); not .pt, since a model
    folder's *.pt files are its finished models."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return f"checkpoint-{hashlib.sha256(text.encode()).hexdigest()[:16]}.ckpt"


class LayerCheckpoint:
    """The checkpoint file of one grid point. mode: 'auto', True (after every layer) or False (never).
    resume: `load` returns a matching checkpoint's state (else None: a fresh start)."""

    def __init__(self, folder, identity: dict, revision: str, mode="auto", resume: bool = False, log=print):
        self.path = Path(folder) / checkpoint_name(identity)
        self.identity, self.revision, self.mode, self.resume, self.log = identity, revision, mode, resume, log
        self.written, self.write_seconds, self._last_end, self._last_cost = 0, 0.0, None, 0.0

    def load(self, layer_names: list):
        """The saved state {next_index, model, generator, stream, reports} if it fits this point, else None
        (with one line saying why, when a file was there)."""
        if not self.path.exists():
            return None
        if not self.resume:
            self.log(f"checkpoint: {self.path} is there but --resume is not set: starting the point afresh "
                     f"(the file is replaced)")
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated or corrupt: any unpickling error
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
        if why:
            self.log(f"checkpoint: ignoring {self.path} ({why}); starting the point afresh")
            return None
        return state

    def due(self) -> bool:
        """Whether the layer just finished is to be saved (mode True: always; 'auto': rate-limited)."""
        if self.mode is False:
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
                     revision=self.revision)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._last_end = time.perf_counter()
        self._last_cost = self._last_end - start
        self.written += 1
        self.write_seconds += self._last_cost
        if os.environ.get(KILL_VARIABLE) == str(index + 1):
            os.kill(os.getpid(), signal.SIGKILL)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


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
    return (f"checkpoint: {checkpoint.written} written ({checkpoint.path.stat().st_size / 1e6:.2f} MB each), "
            f"{checkpoint.write_seconds:.2f}s in all, {share:.1%} of {seconds:.1f}s")
