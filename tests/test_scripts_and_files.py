"""What a new user meets first: bad model factories, weights and log paths, a full disk while saving, the
command line and logs/init_logs.py, and the quantized model file's bytes.

Bad input is run as a user runs the script (a subprocess): the test checks the whole of stderr and the exit
status. Runs that must reach the saving step use tiny m and one thread, and evaluate on the first EVAL_IMAGES
test images (helpers.small_evaluation, as in test_reliability.py).
"""
import csv
import errno
import json
import io
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import python_env
from helpers import logged_rows as read_rows
from helpers import (grid_points, plain_log_columns, point_config, run_python, run_script, run_script_command,
                     safetensors_metadata, save_beside_model, small_evaluation)

import gpfq
from gpfq.errors import BadInputError
from gpfq.io.models import FashionMobileNet, FashionResNet, load_model
from gpfq.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "quantization_scripts" / "quantize.py"
INIT_LOGS = REPO_ROOT / "logs" / "init_logs.py"
EVAL_IMAGES = 256
PLAIN_LOG = "Quantization_Log.csv"
EXPECTED_STATE = ("expected a state dict: a dict of tensors saved with torch.save(model.state_dict(), path), "
                  "or a .safetensors file")


def out_dirs(root: Path) -> list:
    return ["--log_dir", str(root / "logs"), "--model_dir", str(root / "models")]


def run(command: list, cwd: Path, *folders, env=None) -> subprocess.CompletedProcess:
    """A Python script as a user runs it (no GPFQ_DEBUG), `folders` importable."""
    environment = dict(python_env(*folders), **(env or {}))
    environment.pop("GPFQ_DEBUG", None)
    return run_python([sys.executable] + [str(c) for c in command], cwd=cwd, env=environment,
                      capture_output=True, text=True, timeout=300)


def quantize_script(tmp_path: Path, *argv, folders=(), env=None) -> subprocess.CompletedProcess:
    """quantization_scripts/quantize.py with `argv`, results under tmp_path, run from tmp_path."""
    return run([SCRIPT, *argv, *out_dirs(tmp_path)], tmp_path, *folders, env=env)


@pytest.fixture
def small_eval(monkeypatch):
    small_evaluation(monkeypatch, EVAL_IMAGES)


TINY = ["--batch_size", "8", "--num_threads", "1"]


# ---------------------------------------------------------------- 6. a model factory that raises
def test_factory_that_raises_is_one_line_naming_it_and_exit_2(tmp_path):
    source = "def build():\n    raise RuntimeError('no checkpoint here\\nsecond line')\n"  # only line 1 is shown
    (tmp_path / "broken_model.py").write_text(source)
    for name in ("broken_model.py:build", "broken_model:build"):  # a file, and a module on PYTHONPATH
        result = quantize_script(tmp_path, "--model", name, folders=[tmp_path])
        assert (result.returncode, result.stderr) == (
            2, f"error: model '{name}': the factory build() raised RuntimeError: no checkpoint here\n")
    assert not (tmp_path / "logs" / PLAIN_LOG).exists()


# ---------------------------------------------------------------- 7. a state dict of another architecture
def test_state_dict_of_another_architecture_names_the_keys_and_exits_2(tmp_path):
    path = tmp_path / "mobilenet.pt"
    torch.save(FashionMobileNet().state_dict(), path)
    own, theirs = list(FashionResNet().state_dict()), list(FashionMobileNet().state_dict())
    result = quantize_script(tmp_path, "--weights", path)
    assert (result.returncode, result.stderr) == (
        2, f"error: weights file {path} does not fit model 'fashion_resnet': {len(own)} of the model's {len(own)} "
           f"keys are missing ({', '.join(own[:4])}, …); {len(theirs)} of the file's {len(theirs)} keys are "
           f"unexpected ({', '.join(theirs[:4])}, …)\n")


def test_state_dict_with_other_shapes_names_them(tmp_path):
    path = tmp_path / "five_classes.pt"
    torch.save(FashionResNet(num_classes=5).state_dict(), path)
    with pytest.raises(BadInputError) as error:
        load_model("fashion_resnet", str(path))
    assert str(error.value) == (f"weights file {path} does not fit model 'fashion_resnet': 2 keys have another "
                                f"shape (file vs model: fc.weight (5, 64) vs (10, 64), fc.bias (5,) vs (10,))")


# ---------------------------------------------------------------- 8. a file that is not a state dict
def _write_text(path):
    path.write_text("epochs: 10\nlr: 0.1\n")


def _write_pickled_list(path):
    path.write_bytes(pickle.dumps([1, 2, 3]))


def _write_whole_model(path):
    torch.save(FashionResNet(), path)


def _write_checkpoint(path):
    torch.save({"model": FashionResNet().state_dict(), "epoch": 3}, path)


def _write_empty(path):
    path.write_bytes(b"")


NOT_STATE_DICTS = [
    (_write_text, "a text file (it starts 'epochs: 10')"),
    (_write_pickled_list, "a pickle of Python objects other than tensors (e.g. a whole model saved with "
                          "torch.save(model))"),
    (_write_whole_model, "a pickle of Python objects other than tensors (e.g. a whole model saved with "
                         "torch.save(model))"),
    (_write_checkpoint, "a dict whose entries 'model', 'epoch' are not tensors (a training checkpoint? its entry "
                        "'model' may be the state dict)"),
    (_write_empty, "an empty file"),
]


@pytest.mark.parametrize("write,what", NOT_STATE_DICTS, ids=[w.__name__[len("_write_"):] for w, _ in NOT_STATE_DICTS])
def test_file_that_is_not_a_state_dict_says_what_it_is(tmp_path, write, what):
    path = tmp_path / "weights.pt"
    write(path)
    with pytest.raises(BadInputError) as error:
        load_model("fashion_resnet", str(path))
    assert str(error.value) == f"weights file {path} is {what}; {EXPECTED_STATE}"  # never "weights_only=False"


def test_unreadable_safetensors_file_says_so(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"not safetensors at all")
    with pytest.raises(BadInputError) as error:
        load_model("fashion_resnet", str(path))
    assert str(error.value).startswith(f"weights file {path} is not a readable safetensors file (SafetensorError: ")
    assert str(error.value).endswith(f"); {EXPECTED_STATE}")


def test_quantized_model_file_as_weights_points_to_the_pt_beside_it(tmp_path):
    from gpfq import LayerReport
    model = FashionResNet()
    model.fc.weight.data = torch.linspace(-1, 1, 3)[torch.arange(640) % 3].reshape(10, 64)  # on a 3-level grid
    report = LayerReport(9, "fc", "Linear", (10, 64), 8, 2, 3, 1.0, 0.0, 0.0, parameter="fc.weight",
                         alphabet=torch.linspace(-1, 1, 3))
    path = tmp_path / "quantized.safetensors"
    gpfq.save_quantized(model, [report], path)
    with pytest.raises(BadInputError) as error:
        load_model("fashion_resnet", str(path))
    assert str(error.value) == (f"weights file {path} is a quantized model file (integer codes and codebooks); pass "
                                f"the .pt saved beside it (same stem), or load it with gpfq.load_quantized(path)")


def test_text_file_as_weights_is_one_line_exit_2(tmp_path):
    path = tmp_path / "notes.pt"
    _write_text(path)
    result = quantize_script(tmp_path, "--weights", path)
    assert (result.returncode, result.stderr) == (
        2, f"error: weights file {path} is a text file (it starts 'epochs: 10'); {EXPECTED_STATE}\n")


# ---------------------------------------------------------------- 9. a log path that is a folder
def test_log_path_that_is_a_folder_is_one_line_exit_2_and_init_logs_leaves_it(tmp_path):
    folder = tmp_path / "logs" / PLAIN_LOG
    folder.mkdir(parents=True)
    (folder / "kept.txt").write_text("mine")
    message = (f"error: log {folder} is a folder, not a CSV file, so no row can be appended to it; move it aside, "
               f"or choose another folder with --log_dir PATH\n")
    result = quantize_script(tmp_path)
    assert (result.returncode, result.stderr) == (2, message)
    result = run([INIT_LOGS, "--log_dir", tmp_path / "logs"], tmp_path)
    assert (result.returncode, result.stderr) == (2, message)
    assert (folder / "kept.txt").read_text() == "mine"  # not renamed as an old log, not emptied
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [PLAIN_LOG]


# ---------------------------------------------------------------- 10. a disk that fills while saving
def _full_disk_open(real_open, suffix):
    """open(), except that a temporary file for `suffix` takes FREE_BYTES and then fails as on a full disk."""
    class FullDisk(io.FileIO):
        free = FREE_BYTES

        def write(self, data):
            data = bytes(data)
            written = super().write(data[: self.free])
            self.free -= written
            if written < len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return written

    def fake_open(file, mode="r", *args, **kwargs):
        if "w" in mode and re.search(re.escape(suffix) + r"\.tmp\d+$", str(file)):
            return FullDisk(file, "wb")
        return real_open(file, mode, *args, **kwargs)
    return fake_open


# Less than any of the files, more than torch.save's first writes (which a full disk may let through: torch then
# reports the failed write as a RuntimeError 'unexpected pos …', without the OSError).
FREE_BYTES = 4096


@pytest.mark.parametrize("suffix", [".pt", ".json", ".safetensors"])
def test_disk_full_while_saving_names_what_was_saved_and_what_not(tmp_path, small_eval, monkeypatch, capsys,
                                                                  suffix):
    from gpfq.io import model_file
    from gpfq.io import storage
    for module in (storage, model_file):  # their writes of temporary files go through the module's open()
        monkeypatch.setattr(module, "open", _full_disk_open(open, suffix), raising=False)
    monkeypatch.delenv("GPFQ_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        run_script_command("quantization_scripts", *TINY, *out_dirs(tmp_path))
    assert exit_.value.code == 1
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]  # the rest: progress bars
    assert len(errors) == 1 and "Traceback" not in stderr
    folder = tmp_path / "models" / "fashion_resnet"
    # no temporary file left; the per-layer checkpoint stays, so that --resume needs no layer again
    files = sorted(path for path in folder.iterdir() if path.suffix != ".ckpt")
    assert [path.name[:11] for path in folder.glob("*.ckpt")] == ["checkpoint-"]
    reason = "the disk is full: No space left on device"
    if suffix == ".pt":
        assert files == []
        assert errors[0] == f"error: could not save the quantized model in {folder} ({reason}); nothing of this " \
                            f"grid point was written"
    else:
        model = next(path for path in files if path.suffix == ".pt")
        saved = [model] if suffix == ".json" else [model, model.with_suffix(".json")]
        not_saved = [model.with_suffix(s) for s in (".json", ".safetensors") if model.with_suffix(s) not in saved]
        assert files == sorted(saved)
        assert errors[0] == (f"error: could not write {not_saved[0]} ({reason}); saved: "
                             f"{' and '.join(map(str, saved))}; not saved: {', '.join(p.name for p in not_saved)}, "
                             f"the evaluation and the log row")
        assert load_model("fashion_resnet", str(model)).fc.weight.unique().numel() <= 2 ** 4 + 1  # it is whole
    assert not (tmp_path / "logs" / PLAIN_LOG).exists()


# ---------------------------------------------------------------- 12. the same run gives the same bytes
def test_same_run_twice_gives_the_same_model_file_bytes(tmp_path, small_eval):
    rows = [run_script("quantization_scripts", *TINY, *out_dirs(tmp_path / run))[0]
            for run in ("first", "second")]  # other result folders too: they are not part of the model
    files = [REPO_ROOT / row["Quantized Model File"] for row in rows]  # relative to the repository, or absolute
    assert files[0] != files[1] and files[0].read_bytes() == files[1].read_bytes()
    # the timings stay in the row and the JSON record
    records = [json.loads(path.with_suffix(".json").read_text()) for path in files]
    assert all(record["quantization_seconds"] > 0 and record["layers"][0]["seconds"] > 0 for record in records)
    assert all(float(row["Quantization Seconds"]) >= 0 and row["Quantization Seconds"] != "" for row in rows)


# ---------------------------------------------------------------- init_logs: --log_dir, --help, the advice
def test_foreign_log_advice_names_the_log_dir_and_the_advised_command_works(tmp_path):
    logs = tmp_path / "my logs"
    logs.mkdir()
    (logs / PLAIN_LOG).write_text("a,b\n1,2\n")
    result = run([SCRIPT, "--log_dir", logs, "--model_dir", tmp_path / "models"], tmp_path)
    assert (result.returncode, result.stderr) == (
        2, f"error: {logs / PLAIN_LOG} has a header this project did not write (2 columns, first ['a', 'b']); "
           f"refusing to append. Move it aside, or run `python3 logs/init_logs.py --log_dir '{logs}'`, which "
           f"renames it with a timestamp and starts a fresh log.\n")
    assert run([INIT_LOGS, "--log_dir", logs], REPO_ROOT).returncode == 0  # what the message advises
    archived = list(logs.glob("Quantization_Log_2*.csv"))  # renamed with its timestamp
    assert len(archived) == 1 and archived[0].read_text() == "a,b\n1,2\n"
    with open(logs / PLAIN_LOG, newline="") as fresh:  # a fresh log: the plain script's header, no row
        assert next(csv.reader(fresh)) == plain_log_columns()
    assert read_rows(logs / PLAIN_LOG) == []


def test_init_logs_help_prints_usage_and_creates_nothing(tmp_path):
    result = run([INIT_LOGS, "--help"], tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("usage: init_logs.py [-h] [--log_dir FOLDER]")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the command line
def test_debug_shows_the_stack_and_keeps_exit_2(tmp_path):
    result = quantize_script(tmp_path, "--bits", "0", "--debug")
    assert result.returncode == 2
    assert result.stderr.startswith("Traceback (most recent call last)")
    assert result.stderr.endswith("\nerror: bad hyperparameter: bits must be a positive integer, got 0\n")


def test_unknown_option_names_the_closest_and_one_line_of_usage(tmp_path):
    usage = "usage: quantize.py [--NAME VALUE ...], NAME any header name (quantize.py --help lists them)\n"
    result = quantize_script(tmp_path, "--bitz", "4")
    assert (result.returncode, result.stderr) == (2, "error: unknown option --bitz (did you mean --bits?)\n" + usage)
    result = quantize_script(tmp_path, "--bitz=4", "--sede", "1")
    assert (result.returncode, result.stderr) == (
        2, "error: unknown options --bitz (did you mean --bits?), --sede (did you mean --seed?)\n" + usage)
    assert not (tmp_path / "logs").exists()


# ---------------------------------------------------------------- the docs' model file size
def _stated(path: Path, pattern: str) -> int:
    """The byte count a doc states where `pattern` (one group: the number, with thousands commas) matches."""
    match = re.search(pattern, path.read_text(), re.MULTILINE)
    assert match, f"{path.name} no longer states the default model file's size ({pattern})"
    return int(match.group(1).replace(",", ""))


def test_docs_state_the_default_model_file_size(tmp_path, default_data):
    """The default 4-bit GPFQ saved as the script saves it: the README's and docs/deploy.md's byte counts.

    safetensors stores tensors uncompressed, so the tensors' bytes are fixed by shapes and bits (checked
    below). Only the JSON header may differ on another CPU: its measured floats (per-layer errors, radii,
    entropies) can print a digit longer or shorter; hence the tolerance, two characters per such float plus
    the 8 bytes of padding (measured here: the same bytes at 1 and 2 threads).
    """
    from gpfq.io.model_file import HEADER_KEY
    calibration, _, model = default_data
    point = grid_points("quantization_scripts")[0]
    assert (point["method"], point["bits"]) == ("gpfq", 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(point["seed"])
        result = gpfq.quantize(model, calibration, point_config(point), log=lambda message: None)
    finally:
        torch.set_num_threads(threads)
    path, size = save_beside_model(result.model, result.reports, tmp_path / "default.pt", point,
                                   calibration[0][0].shape, log=lambda message: None)
    raw = path.read_bytes()
    assert size.file_bytes == len(raw)
    header_bytes = int.from_bytes(raw[:8], "little")
    from safetensors.torch import load
    assert len(raw) == 8 + header_bytes + sum(t.numel() * t.element_size() for t in load(raw).values())
    header = json.loads(safetensors_metadata(raw)[HEADER_KEY])
    floats = sum(isinstance(value, float) for entry in header["layers"] + list(header["coded"].values())
                 for value in entry.values())  # the measured ones: errors, radii, entropies
    tolerance = 2 * floats + 8
    stated = {"README table": _stated(REPO_ROOT / "README.md", r"^\| GPFQ 4-bit \|.*\| ([\d,]+) \|$"),
              "README text": _stated(REPO_ROOT / "README.md", r"4-bit GPFQ of the default model: ([\d,]+) bytes"),
              "docs/deploy.md": _stated(REPO_ROOT / "docs" / "deploy.md", r"^\| 4 \| gpfq2022 \|.*\| ([\d,]+) \(")}
    assert {doc: abs(count - len(raw)) <= tolerance for doc, count in stated.items()} == dict.fromkeys(stated, True), \
        f"the docs state {stated}, a rerun wrote {len(raw)} bytes (tolerance {tolerance})"


# ---------------------------------------------------------------- num_threads None on a shared machine
@pytest.mark.parametrize("omp_num_threads", ["3", None])
def test_num_threads_none_takes_omp_num_threads_else_the_cores_this_process_may_run_on(tmp_path, monkeypatch,
                                                                                      omp_num_threads):
    """num_threads None runs on OMP_NUM_THREADS threads when that is set (as a job scheduler sets it), otherwise
    on the cores of the process's CPU affinity (which a container or taskset narrows; not os.cpu_count()); the
    caller's own thread count comes back afterwards."""
    seen = tmp_path / "threads.txt"
    (tmp_path / "counting_model.py").write_text(
        "import torch\n\n\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(784, 10)\n\n"
        "    def forward(self, x):\n"
        f"        with open({str(seen)!r}, 'a') as f:\n"
        "            f.write(f'{torch.get_num_threads()}\\n')\n"
        "        return self.fc(x.flatten(1))\n\n\n"
        "def build():\n"
        "    return Net()\n")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    if omp_num_threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp_num_threads)
    caller = torch.get_num_threads()
    run_script("quantization_scripts", "--model", f"{tmp_path / 'counting_model.py'}:build", "--batch_size", "16",
               "--eval_subset", "20", "--log_dir", str(tmp_path / "logs"), "--model_dir", str(tmp_path / "models"))
    expected = int(omp_num_threads) if omp_num_threads else len(os.sched_getaffinity(0))
    assert set(seen.read_text().split()) == {str(expected)}
    assert torch.get_num_threads() == caller
