"""Per-layer checkpoints (gpfq.pipeline.checkpoint): a run SIGKILLed after layer k goes on at layer k + 1 with --resume and
ends bit for bit where an uninterrupted run ends; a corrupt checkpoint gives one line and a fresh start."""
import csv
import signal
import sys

import pytest
import torch
from conftest import python_env
from helpers import run_python, state_hash
from torch.utils.data import TensorDataset

from gpfq.pipeline.checkpoint import KILL_VARIABLE, LayerCheckpoint, read_checkpoint
from gpfq.pipeline.streams import CalibrationStream
from gpfq.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "quantization_scripts" / "quantize.py"
ARGS = ["--batch_size", "64", "--num_threads", "1", "--eval_subset", "100", "--checkpoint", "True"]
KILL_AFTER = 3  # of fashion_resnet's 10 layers


def run(folder, *extra, env=None):
    argv = [sys.executable, str(SCRIPT), *ARGS, "--log_dir", str(folder / "logs"), "--model_dir",
            str(folder / "models"), *extra]
    return run_python(argv, capture_output=True, text=True, env=dict(python_env(), **(env or {})), timeout=300)


def file_hash(path) -> str:
    return state_hash(torch.load(path, map_location="cpu", weights_only=True))


def logged_row(folder) -> dict:
    with open(folder / "logs" / "Quantization_Log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    return rows[0]


def checkpoints(folder) -> list:
    return sorted((folder / "models" / "fashion_resnet").glob("checkpoint-*.ckpt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run killed after layer KILL_AFTER and resumed; an uninterrupted run that finds a truncated copy of that
    checkpoint (with --resume). Returns {name: (folder, CompletedProcess)} and the killed run's checkpoint bytes."""
    killed, fresh = tmp_path_factory.mktemp("killed"), tmp_path_factory.mktemp("fresh")
    first = run(killed, env={KILL_VARIABLE: str(KILL_AFTER)})
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    saved = checkpoints(killed)
    assert len(saved) == 1 and not (killed / "logs" / "Quantization_Log.csv").exists()
    data = saved[0].read_bytes()
    (fresh / "models" / "fashion_resnet").mkdir(parents=True)
    (fresh / "models" / "fashion_resnet" / saved[0].name).write_bytes(data[:len(data) // 2])  # truncated
    reference = run(fresh, "--resume")
    resumed = run(killed, "--resume")
    return {"killed": (killed, first), "fresh": (fresh, reference), "resumed": (killed, resumed)}, data


@pytest.mark.slow  # whole default-model runs, killed and resumed
def test_killed_run_resumes_at_the_next_layer_bit_identical(runs):
    results, _ = runs
    (killed, resumed), (fresh, reference) = results["resumed"], results["fresh"]
    assert resumed.returncode == 0 and reference.returncode == 0, resumed.stderr[-2000:] + reference.stderr[-2000:]
    output = resumed.stdout + resumed.stderr
    assert f"layers 1-{KILL_AFTER} of 10 restored from" in output
    assert f"continuing from layer {KILL_AFTER} (stages.0.conv2) with layer {KILL_AFTER + 1}" in output
    # the resumed run quantized only the layers after KILL_AFTER; the killed one printed the first KILL_AFTER
    assert f"[{KILL_AFTER}/10]" not in output and f"[{KILL_AFTER + 1}/10]" in output
    a, b = logged_row(killed), logged_row(fresh)
    assert a["Quantized Top1 Accuracy"] == b["Quantized Top1 Accuracy"]
    assert a["Quantized Top5 Accuracy"] == b["Quantized Top5 Accuracy"]
    assert file_hash(REPO_ROOT / a["Model File"]) == file_hash(REPO_ROOT / b["Model File"])
    assert a["Sparsity"] == b["Sparsity"]


@pytest.mark.slow  # whole default-model runs, killed and resumed
def test_checkpoint_is_removed_once_the_point_is_logged(runs):
    results, _ = runs
    for name in ("resumed", "fresh"):
        folder, _ = results[name]
        assert checkpoints(folder) == [], name
        assert not list((folder / "models" / "fashion_resnet").glob(".checkpoint-*")), name  # no temporary left


@pytest.mark.slow  # whole default-model runs, killed and resumed
def test_truncated_checkpoint_is_one_line_and_a_fresh_start(runs):
    results, _ = runs
    _, reference = results["fresh"]
    output = reference.stdout + reference.stderr
    lines = [line for line in output.splitlines() if line.startswith("checkpoint: cannot read")]
    assert len(lines) == 1 and "ignoring it and starting the point afresh" in lines[0]
    assert "Traceback" not in output and "restored from" not in output and "[1/10]" in output


@pytest.mark.slow  # whole default-model runs, killed and resumed
def test_row_says_eval_subset_and_accuracy_is_on_those_images(runs):
    """--eval_subset 100: the row says 100, and its top-1 is the saved model's on the first 10 test images of
    each class (found here from the raw labels)."""
    from gpfq.io.data import fashion_mnist
    from gpfq.io.models import load_model
    results, _ = runs
    folder, _ = results["fresh"]
    row = logged_row(folder)
    assert row["Eval Subset"] == "100"
    test = fashion_mnist("test")
    labels = test.tensors[1]
    picked = torch.cat([torch.nonzero(labels == c).flatten()[:10] for c in range(10)]).sort().values
    model = load_model("fashion_resnet", "DEFAULT")
    model.load_state_dict(torch.load(REPO_ROOT / row["Model File"], weights_only=True))
    with torch.no_grad():
        predicted = model.eval()(test.tensors[0][picked]).argmax(dim=1)
    assert float(row["Quantized Top1 Accuracy"]) == pytest.approx(float((predicted == labels[picked]).float().mean()),
                                                                  abs=1e-6)


@pytest.mark.slow  # whole default-model runs, killed and resumed
def test_checkpoint_of_another_point_or_revision_is_ignored(runs, tmp_path):
    _, data = runs
    path = tmp_path / "c.ckpt"
    path.write_bytes(data)
    state = read_checkpoint(path)
    lines = []
    names = state["layers"]
    same = LayerCheckpoint(tmp_path, state["identity"], state["revision"], resume=True, log=lines.append,
                           float_weights=state["float_weights"])
    same.path.write_bytes(data)
    assert same.load(names)["next_index"] == KILL_AFTER and lines == []
    other = LayerCheckpoint(tmp_path, dict(state["identity"], Bits=3), state["revision"], resume=True, log=lines.append,
                            float_weights=state["float_weights"])
    other.path.write_bytes(data)  # the file under the other point's name (copied, renamed)
    assert other.load(names) is None and "another grid point's settings" in lines[-1]
    newer = LayerCheckpoint(tmp_path, state["identity"], "abc1234", resume=True, log=lines.append,
                            float_weights=state["float_weights"])
    assert newer.load(names) is None and "written by code revision" in lines[-1]
    without = LayerCheckpoint(tmp_path, state["identity"], state["revision"], resume=False, log=lines.append,
                              float_weights=state["float_weights"])
    assert without.load(names) is None and "--resume is not set" in lines[-1]


@pytest.mark.parametrize("chunk_size,m", [(8, 13), (8, 16), (5, 3)])
def test_restored_stream_gives_the_same_images_in_the_same_chunks(chunk_size, m):
    """Cut anywhere over several epochs (50 items): the restored stream continues with the same chunks."""
    dataset = TensorDataset(torch.randn(50, 2), torch.zeros(50))
    for cut in range(0, 12):
        original = CalibrationStream(dataset, 7, chunk_size=chunk_size)
        for _ in range(cut):
            list(original.chunks(m))
        restored = CalibrationStream(dataset, 7, chunk_size=chunk_size)
        restored.restore(original.state())
        a = [c for _ in range(8) for c in original.chunks(m)]
        b = [c for _ in range(8) for c in restored.chunks(m)]
        assert [c.shape for c in a] == [c.shape for c in b], cut
        assert all(torch.equal(x, y) for x, y in zip(a, b)), cut


def test_stream_order_is_the_seeded_shuffle_of_before():
    """The stream still draws DataLoader(shuffle=True, generator=seeded)'s order (results of earlier revisions)."""
    dataset = TensorDataset(torch.arange(30.0).view(30, 1), torch.zeros(30))
    generator = torch.Generator().manual_seed(5)
    expected = torch.cat([b[0] for _ in range(3) for b in torch.utils.data.DataLoader(
        dataset, batch_size=7, shuffle=True, generator=generator)])
    stream = CalibrationStream(dataset, 5, chunk_size=7)
    assert torch.equal(torch.cat([c for _ in range(6) for c in stream.chunks(15)]), expected)


ADHOC = REPO_ROOT / "adhoc_quantization_scripts" / "quantize.py"


def adhoc_run(folder, *extra, env=None):
    argv = [sys.executable, str(ADHOC), "--batch_size", "64", "--num_threads", "1", "--eval_subset", "200",
            "--bias_correction", "last",
            "--bias_batch_size", "128", "--checkpoint", "True", "--log_dir", str(folder / "logs"), "--model_dir",
            str(folder / "models"), *extra]
    return run_python(argv, capture_output=True, text=True, env=dict(python_env(), **(env or {})), timeout=300)


@pytest.mark.slow  # whole default-model runs, killed and resumed
def test_adhoc_run_killed_mid_way_resumes_bit_identical(tmp_path):
    """The ad hoc script (bias correction of the last layer, drawn from its own stream after the layer loop):
    SIGKILLed after layer KILL_AFTER, resumed, it logs the row and saves the model an uninterrupted run does."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    first = adhoc_run(killed, env={KILL_VARIABLE: str(KILL_AFTER)})
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert len(checkpoints(killed)) == 1 and not (killed / "logs" / "Quantization_Log_Bias_Correct.csv").exists()
    resumed, reference = adhoc_run(killed, "--resume"), adhoc_run(whole)
    assert resumed.returncode == 0 and reference.returncode == 0, resumed.stderr[-2000:] + reference.stderr[-2000:]
    output = resumed.stdout + resumed.stderr
    assert f"layers 1-{KILL_AFTER} of 10 restored from" in output and f"[{KILL_AFTER}/10]" not in output
    rows = []
    for folder in (killed, whole):
        with open(folder / "logs" / "Quantization_Log_Bias_Correct.csv", newline="") as f:
            [row] = list(csv.DictReader(f))
        rows.append(row)
    a, b = rows
    assert a["Bias Correction"] == "last"
    for column in ("Quantized Top1 Accuracy", "Quantized Top5 Accuracy", "Average Bits", "Sparsity"):
        assert a[column] == b[column], column
    assert file_hash(REPO_ROOT / a["Model File"]) == file_hash(REPO_ROOT / b["Model File"])
    assert checkpoints(killed) == [] and checkpoints(whole) == []  # removed once the row is logged
