"""Resume and logging that cannot give a silent wrong result: random weights drawn from the seed, checkpoints
bound to their float weights and checksummed, one owner per checkpoint, and a result printed before its log row
(a log that cannot be written, or whose lock another process holds)."""
import builtins
import errno
import fcntl
import signal
import sys
import threading

import pytest
import torch
from conftest import TESTS_DIR, python_env
from helpers import append_log_row as append_row
from helpers import fresh_log as init_log
from helpers import logged_rows as read_rows
from helpers import read_layer_checkpoint as read_checkpoint
from helpers import (ForkedProcess, checkpoint_kill_variable, interrupt_after_logging, layer_checkpoint,
                     plain_log_columns, run_python, run_script, run_script_command, state_hash)

from gpfq.io.models import load_model
from gpfq.paths import REPO_ROOT

KILL_VARIABLE = checkpoint_kill_variable()
PLAIN_LOG, PLAIN_COLUMNS = "Quantization_Log.csv", plain_log_columns()
SCRIPT = REPO_ROOT / "quantization_scripts" / "quantize.py"
ARGS = ["--batch_size", "32", "--num_threads", "1", "--eval_subset", "50", "--checkpoint", "True"]


def run(folder, *extra, env=None):
    argv = [sys.executable, str(SCRIPT), *ARGS, "--log_dir", str(folder / "logs"), "--model_dir",
            str(folder / "models"), *extra]
    return run_python(argv, capture_output=True, text=True, env=dict(python_env(), **(env or {})), timeout=300)


def checkpoints(folder, model="fashion_resnet") -> list:
    return sorted((folder / "models" / model).glob("checkpoint-*.ckpt"))


def logged_model_hash(folder) -> str:
    [row] = read_rows(folder / "logs" / PLAIN_LOG)
    return state_hash(torch.load(REPO_ROOT / row["Model File"], map_location="cpu", weights_only=True))


def test_random_weights_come_from_the_seed_and_leave_the_global_generator_alone():
    before = torch.random.get_rng_state()
    a, b = load_model("fashion_resnet", "random", seed=0), load_model("fashion_resnet", "random", seed=0)
    other = load_model("fashion_resnet", "random", seed=1)
    assert state_hash(a.state_dict()) == state_hash(b.state_dict())
    assert state_hash(a.state_dict()) != state_hash(other.state_dict())
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.slow  # whole default-model runs as subprocesses
def test_random_weights_killed_and_resumed_end_where_an_uninterrupted_run_ends(tmp_path):
    """`--weights random` + `--resume` once rebuilt a new random network for the layers after the checkpoint."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    first = run(killed, "--weights", "random", env={KILL_VARIABLE: "5"})
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    resumed = run(killed, "--weights", "random", "--resume")
    reference = run(whole, "--weights", "random")
    assert resumed.returncode == 0 and reference.returncode == 0, resumed.stderr[-2000:] + reference.stderr[-2000:]
    assert "layers 1-5 of 10 restored from" in resumed.stdout + resumed.stderr
    assert logged_model_hash(killed) == logged_model_hash(whole)


FACTORY = '''
import torch
from torch import nn

def fresh():  # new random weights in every process: no seed
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 24 * 24, 32), nn.ReLU(), nn.Linear(32, 10))
'''


@pytest.mark.slow  # whole default-model runs as subprocesses
def test_checkpoint_of_other_float_weights_is_ignored(tmp_path):
    """A factory that draws new weights in each process: the resumed run must not mix two networks."""
    (tmp_path / "nets.py").write_text(FACTORY)
    model = f"{tmp_path / 'nets.py'}:fresh"
    first = run(tmp_path, "--model", model, env={KILL_VARIABLE: "2"})
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    resumed = run(tmp_path, "--model", model, "--resume")
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-2000:]
    assert "(made from other float weights); starting the point afresh" in output
    assert "restored from" not in output and "[1/4]" in output


def _killed_checkpoint(folder):
    first = run(folder, env={KILL_VARIABLE: "3"})
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    [path] = checkpoints(folder)
    return path


def _flip_bit(path, tensor: torch.Tensor) -> None:
    """Flip the top exponent bit of the first element of `tensor`'s bytes inside the file at `path`."""
    data = bytearray(path.read_bytes())
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    at = bytes(data).find(raw)
    assert at > 0 and bytes(data).find(raw, at + 1) < 0  # the tensor's bytes are in the file once
    data[at + tensor.element_size() - 1] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.slow  # whole default-model runs as subprocesses
def test_corrupted_checkpoint_is_one_line_and_a_fresh_start(tmp_path):
    """One flipped exponent bit in a BatchNorm buffer: the checksum catches it; the run starts afresh, logs the
    uninterrupted result and removes the checkpoint."""
    path = _killed_checkpoint(tmp_path / "flipped")
    state = read_checkpoint(path)
    name = next(key for key in state["model"] if key.endswith("running_var"))
    _flip_bit(path, state["model"][name])
    resumed = run(tmp_path / "flipped", "--resume")
    reference = run(tmp_path / "whole")
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0 and reference.returncode == 0, output[-2000:]
    lines = [line for line in output.splitlines() if line.startswith("checkpoint: cannot read")]
    assert len(lines) == 1 and "SHA-256 does not match" in lines[0] and "starting the point afresh" in lines[0]
    assert "restored from" not in output and "Traceback" not in output
    assert logged_model_hash(tmp_path / "flipped") == logged_model_hash(tmp_path / "whole")
    assert checkpoints(tmp_path / "flipped") == []


def test_a_checkpoint_has_one_owner(tmp_path):
    """A second run of the same point while the first runs neither restores, writes nor removes its checkpoint."""
    identity, lines = {"point": 1}, []
    mine = layer_checkpoint(tmp_path, identity, "r", mode=True, resume=True, log=lines.append)
    assert mine.load(["a"]) is None
    mine.after_layer(0, lambda: {"next_index": 1})
    assert mine.path.exists()
    code = (f"import sys; sys.path[:0] = {[str(REPO_ROOT), str(TESTS_DIR)]!r}\n"
            "from helpers import layer_checkpoint\n"
            f"other = layer_checkpoint({str(tmp_path)!r}, {{'point': 1}}, 'r', mode=True, resume=True)\n"
            "assert other.load(['a']) is None\n"
            "other.after_layer(0, lambda: {'next_index': 7})\n"
            "other.remove()\n")
    other = run_python([sys.executable, "-c", code], capture_output=True, text=True, env=python_env(), timeout=120)
    assert other.returncode == 0, other.stderr
    assert "another run of this grid point is using" in other.stdout
    assert read_checkpoint(mine.path)["next_index"] == 1  # still ours, unchanged
    mine.remove()
    assert not mine.path.exists() and not list(tmp_path.iterdir())  # the lock file goes too


@pytest.mark.slow  # whole default-model runs as subprocesses
def test_two_runs_of_the_same_point_at_once_both_log(tmp_path):
    """Two processes on the same point and folders: each logs its row and saves its model; no checkpoint left."""
    argv = [sys.executable, str(SCRIPT), *ARGS, "--log_dir", str(tmp_path / "logs"), "--model_dir",
            str(tmp_path / "models")]
    processes = [ForkedProcess(argv, env=python_env()) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    rows = read_rows(tmp_path / "logs" / PLAIN_LOG)
    assert len(rows) == 2 and rows[0]["Quantized Top1 Accuracy"] == rows[1]["Quantized Top1 Accuracy"]
    assert rows[0]["Model File"] != rows[1]["Model File"]
    assert checkpoints(tmp_path) == []


def test_unwritable_log_prints_the_result_then_one_message(tmp_path, monkeypatch, capsys):
    """A log that became immutable (chattr +i) or vanished during the run: the accuracy is printed, then the
    documented one-line error, exit 1; the model is on disk."""
    log = tmp_path / "logs" / PLAIN_LOG
    init_log(log, PLAIN_COLUMNS)
    real_open = builtins.open

    def immutable(file, mode="r", *args, **kwargs):
        if str(file) == str(log) and any(c in mode for c in "wa+x"):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(file))
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", immutable)
    monkeypatch.delenv("GPFQ_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        run_script_command("quantization_scripts", *ARGS, "--checkpoint", "False", "--log_dir",
                           str(tmp_path / "logs"), "--model_dir", str(tmp_path / "models"))
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert [line for line in out.splitlines() if line.startswith("top-1 ")]  # the result, before the error
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: could not append the row to {log} (")
    assert "The quantized model is saved at" in errors[0]
    assert list((tmp_path / "models").rglob("*.pt"))


def test_a_held_log_lock_is_announced_not_a_silent_hang(tmp_path, capsys):
    log = tmp_path / PLAIN_LOG
    init_log(log, ["a", "b"])
    holder = open(log, "rb")
    fcntl.flock(holder, fcntl.LOCK_EX)
    release = threading.Timer(1.0, holder.close)
    release.start()
    append_row(log, {"a": 1, "b": 2}, ["a", "b"])
    release.join()
    assert f"waiting for the lock on {log}" in capsys.readouterr().err
    assert read_rows(log) == [{"a": "1", "b": "2"}]


def test_ctrl_c_just_after_the_row_is_written_keeps_the_points_files(tmp_path, monkeypatch):
    """A Ctrl-C that lands after the row is in the log but before the run marks the point done: the point is
    finished, so its model, record and quantized file stay (the row names them)."""
    interrupt_after_logging(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        run_script("quantization_scripts", *ARGS, "--checkpoint", "False", "--log_dir", str(tmp_path / "logs"),
                   "--model_dir", str(tmp_path / "models"))
    assert exit_.value.code == 130
    [row] = read_rows(tmp_path / "logs" / PLAIN_LOG)
    model = REPO_ROOT / row["Model File"]
    assert model.is_file() and model.with_suffix(".json").is_file() and model.with_suffix(".safetensors").is_file()
