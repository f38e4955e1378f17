"""Reliability: bad input fails fast and clearly, nothing is ever lost, runs are repeatable.

Runs of the embedded default use tiny m and, to fit the test budget, evaluate on the first
EVAL_IMAGES Fashion-MNIST test images (helpers.small_evaluation; the code paths are the real ones).
"""
import csv
import errno
import importlib.util
import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from conftest import TESTS_DIR, python_env
from helpers import append_log_row as append_row
from helpers import logged_rows as read_rows
from helpers import (ForkedProcess, batchnorm_folded, bias_correction, calibration_stream, chance_warning_lines,
                     check_options, debug_asked, foreign_log_error, fresh_log, grid_points, layer_warning_lines,
                     non_finite_error, pending_grid_points, plot_logs_script, point_identity, point_log_values,
                     quantized_network, refuse_evaluation, refuse_quantization, result_columns, run_python, run_script,
                     run_script_with_model_check, scored, script_evaluation_loader, script_logs, script_points,
                     script_result_columns, script_settings, small_evaluation)

import gpfq
from gpfq import QuantConfig
from gpfq.methods.alphabet import ALPHABET_KINDS, make_alphabet
from gpfq.io.data import CorruptImageError, DataMissingError, calibration_set
from gpfq.io.models import WeightsUnavailableError, load_model
from gpfq.methods.gpfq.engine import ENGINES
from gpfq.methods import METHOD_NAMES
from gpfq.paths import PRETRAINED_DIR, REPO_ROOT
from gpfq.methods.gpfq.reference import gpfq_reference, msq

PLAIN_LOG, BIAS_LOG, SKIP_LOG, MIXED_LOG, RETRAIN_LOG = ("Quantization_Log.csv", "Quantization_Log_Bias_Correct.csv",
                                                         "Quantization_Log_Skip.csv", "Quantization_Log_Mixed_Precision.csv",
                                                         "Quantization_Log_Retrain.csv")
LOG_COLUMNS = script_logs()  # {log file name: columns} of every script's logs
COLUMNS = LOG_COLUMNS[PLAIN_LOG]
RESULT_COLUMNS = result_columns()
NonFiniteError = non_finite_error()
EVAL_IMAGES = 256
PYTHON = sys.executable


def plain_header() -> dict:
    spec = importlib.util.spec_from_file_location("plain_script", REPO_ROOT / "quantization_scripts" / "quantize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HEADER


HEADER = plain_header()


def out_dirs(root: Path) -> list:
    return ["--log_dir", str(root / "logs"), "--model_dir", str(root / "models")]


def main(header: dict, argv: list) -> list:
    """The rows a script with `header` logs for command line `argv` (run in this process)."""
    return run_script(header, *argv)


@pytest.fixture
def small_eval(monkeypatch):
    small_evaluation(monkeypatch, EVAL_IMAGES)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the expensive work (evaluation, quantization) starts."""
    refuse_evaluation(monkeypatch)
    refuse_quantization(monkeypatch)


# ================================================================ bad input
BAD_HYPERPARAMETERS = [
    (["--bits", "0"], "bits must be a positive integer, got 0"),
    (["--bits", "2.5"], "bits must be a positive integer, got 2.5"),
    (["--bits", "True"], "bits must be a positive integer, got True"),
    (["--cnn_scalar", "0"], "cnn_scalar must be a number > 0, got 0"),
    (["--mlp_scalar", "-1.3"], "mlp_scalar must be a number > 0, got -1.3"),
    (["--mlp_percentile", "0"], "mlp_percentile must be in (0, 1], got 0"),
    (["--cnn_percentile", "1.5"], "cnn_percentile must be in (0, 1], got 1.5"),
    (["--retain_rate", "0"], "retain_rate must be in (0, 1], got 0"),
    (["--retain_rate", "1.01"], "retain_rate must be in (0, 1], got 1.01"),
    (["--batch_size", "0"], "batch_size (m) must be an integer ≥ 1, got 0"),
    (["--batch_size", "60001"], "batch_size 60001 is larger than the calibration set (60000 images)"),
    (["--model", "resnet_nineteen"], "unknown model 'resnet_nineteen'"),
    (["--dataset", "cifar10"], "dataset must be one of ('fashion_mnist', 'imagenet', 'imagefolder'), got 'cifar10'"),
    (["--ignore_layers", "3", "10"], "ignore_layers [10] match no layer; the model has 10 (0 … 9)"),
    (["--ignore_layers", "-11"], "ignore_layers [-11] match no layer"),
    (["--seed", "0.5"], "seed must be an integer, got 0.5"),
    (["--num_workers", "-1"], "num_workers must be an integer ≥ 0, got -1"),
    (["--resume", "maybe"], "resume must be True or False, got 'maybe'"),
]


@pytest.mark.parametrize("argv,message", BAD_HYPERPARAMETERS, ids=[" ".join(a) for a, _ in BAD_HYPERPARAMETERS])
def test_bad_hyperparameter_is_one_clear_error_before_work(tmp_path, no_work, argv, message):
    from gpfq.errors import BadInputError
    with pytest.raises(BadInputError) as error:  # what the scripts report as one line, exit status 2
        main(HEADER, argv + out_dirs(tmp_path))
    assert message in str(error.value)
    assert not (tmp_path / "logs" / PLAIN_LOG).exists() and not list(tmp_path.rglob("*.pt"))


def test_cuda_without_gpu(tmp_path, no_work, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda' asked for, but torch sees no CUDA GPU"):
        main(HEADER, ["--device", "cuda"] + out_dirs(tmp_path))


def test_missing_imagenet_found_before_work(tmp_path, no_work):
    with pytest.raises(DataMissingError, match="ImageNet train not found under .*data/README.md"):
        main(HEADER, ["--model", "resnet18", "--dataset", "imagenet", "--weights", "random", "--data_dir",
                      str(tmp_path / "empty")] + out_dirs(tmp_path))


def test_missing_weights_file(tmp_path, no_work):
    with pytest.raises(WeightsUnavailableError, match="weights file .*nowhere.pt not found"):
        main(HEADER, ["--weights", str(tmp_path / "nowhere.pt")] + out_dirs(tmp_path))


def test_foreign_log_refused_before_work_and_left_untouched(tmp_path, no_work):
    log = tmp_path / "logs" / PLAIN_LOG
    log.parent.mkdir()
    log.write_text("Model,Acc\nalexnet,0.5\n")
    with pytest.raises(foreign_log_error(), match="refusing to append.*init_logs.py"):
        main(HEADER, out_dirs(tmp_path))
    assert log.read_text() == "Model,Acc\nalexnet,0.5\n"


@pytest.mark.parametrize("blocked,key", [("logs", "log_dir"), ("models", "model_dir"),
                                         ("models/fashion_resnet", "model_dir")])
def test_unwritable_result_folder_found_before_work(tmp_path, no_work, blocked, key):
    # A regular file where the folder should be: no process can write there, root included.
    (tmp_path / blocked).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / blocked).write_text("a file, not a folder")
    with pytest.raises(PermissionError, match=f"{key} .* is not a writable folder .*--{key} PATH"):
        main(HEADER, out_dirs(tmp_path))


def _state_with(edit) -> dict:
    state = torch.load(PRETRAINED_DIR / "fashion_resnet.pt", weights_only=True)
    edit(state)
    return state


@pytest.mark.parametrize("edit,message", [
    (lambda s: s["stages.1.conv2.weight"][0, 0].fill_(float("nan")),
     "stages.1.conv2.weight of the float model contains 9 NaN and 0 Inf values"),
    (lambda s: s["fc.bias"].__setitem__(3, float("inf")), "fc.bias of the float model contains 0 NaN and 1 Inf"),
    # a negative BatchNorm variance is finite but makes the activations NaN: the next layer is named
    (lambda s: s["stem.1.running_var"].__setitem__(0, -1.0),
     "the input of layer stages.0.conv1 in the float model (on one calibration image) contains 784 NaN"),
])
def test_nan_or_inf_in_model_names_where(tmp_path, no_work, edit, message):
    torch.save(_state_with(edit), tmp_path / "bad.pt")
    with pytest.raises(NonFiniteError) as error:
        main(HEADER, ["--weights", str(tmp_path / "bad.pt")] + out_dirs(tmp_path))
    assert message in str(error.value)


def _mlp(*widths) -> nn.Sequential:
    layers = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


@pytest.mark.parametrize("calibration", ["fresh", "fixed"])  # QuantConfig's calibration modes
def test_nan_in_activations_during_quantization_names_the_layer(calibration):
    torch.manual_seed(0)
    model = _mlp(8, 6, 3)
    images = torch.randn(16, 8)
    images[5, 2] = float("nan")  # not image 0, which layer discovery runs on
    settings = QuantConfig(bits=3, mlp_scalar=1.0, cnn_scalar=1.0, batch_size=16, retain_rate=1.0, seed=0,
                           calibration=calibration)
    with pytest.raises(NonFiniteError, match="the input of layer 0 in the float model contains 1 NaN and 0 Inf"):
        quantized_network(model, images, settings)


def _zero_model() -> nn.Sequential:
    """Layer 0 has three all-zero rows, so layer 1 sees three all-zero input columns; layer 2 is all zero
    (rad = 0), so layer 3's whole input is zero."""
    torch.manual_seed(0)
    model = _mlp(8, 6, 5, 4, 3)
    with torch.no_grad():
        model[0].weight[:3] = 0.0
        model[0].bias[:3] = 0.0
        model[4].weight.zero_()
        model[4].bias.zero_()
    return model


def _quantize_zero_model(settings, keep_rows=True):
    steps = []
    settings = settings.replace(batch_size=32, retain_rate=1.0, seed=0)
    quantized, reports = quantized_network(_zero_model(), torch.randn(32, 8), settings, keep_rows=keep_rows,
                                           after_layer=steps.append)
    assert all(torch.isfinite(p).all() for p in quantized.parameters())
    # layers 2 (W = 0) and 3 (X = 0) have ‖XWᵀ‖ = 0: their relative error is undefined (NaN), not 0
    assert all(np.isfinite(r.relative_error) for r in reports[:2])
    assert torch.all(quantized[4].weight == 0) and np.isnan(reports[2].relative_error)  # rad = 0: Q = 0
    return quantized, reports, steps


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_zero_weights_and_zero_inputs_work_for_every_method(method, granularity):
    _quantize_zero_model(QuantConfig(method=method, bits=3, mlp_scalar=1.3, cnn_scalar=1.3,
                                     alphabet_granularity=granularity, sparsity_threshold=0.1))


@pytest.mark.parametrize("engine", ENGINES)
def test_zero_weights_and_zero_inputs_work_for_every_engine(engine):
    """Each GPFQ engine (rows not kept, so the Gram form streams its sums) handles ‖X̃_t‖ = 0 and rad = 0."""
    quantized, reports, _ = _quantize_zero_model(QuantConfig(bits=3, mlp_scalar=1.3, cnn_scalar=1.3, engine=engine),
                                                 keep_rows=False)
    assert torch.all(quantized[2].weight[:, :3] == 0)  # zero input columns: argument 0, the level 0
    assert torch.all(quantized[6].weight == 0) and np.isnan(reports[3].relative_error)


def test_zero_weights_and_zero_input_columns():
    """rad = 0 gives the alphabet {0}; input columns with ‖X̃_t‖ = 0 take argument 0; nothing divides by 0."""
    settings = QuantConfig(bits=3, mlp_scalar=1.3, cnn_scalar=1.3)
    model = _zero_model()
    quantized, reports, steps = _quantize_zero_model(settings)
    # layer 1: the per-column specification on the same rows, zero columns included
    step = steps[1]
    assert torch.all(step.quantized_rows[0, :, :3] == 0) and torch.all(step.analog_rows[0, :, :3] == 0)
    alphabet = reports[1].alphabet  # layer 1 (model[2]): its levels, from its weights and the settings
    expected = gpfq_reference(step.weight[0], step.analog_rows[0], step.quantized_rows[0], alphabet)
    assert torch.equal(step.quantized_weight[0], expected.float())
    assert torch.all(expected[:, :3] == 0)  # argument 0 -> the level 0
    # layer 2: rad = 0
    assert reports[2].radius == 0.0 and reports[2].levels == 1 and np.isnan(reports[2].relative_error)
    assert torch.all(quantized[4].weight == 0)
    # layer 3: every input column is zero, so every argument is 0 and every weight quantizes to 0
    assert torch.all(steps[3].quantized_rows == 0)
    assert torch.all(quantized[6].weight == 0) and np.isnan(reports[3].relative_error)
    for kind in ALPHABET_KINDS:
        levels = make_alphabet(kind, 4, 1.3, 0.0)
        assert levels.tolist() == [0.0]
        assert torch.all(msq(torch.randn(5, 5), levels) == 0)


def test_variant_model_checks_see_layers_and_sizes_before_work(tmp_path, no_work):
    seen = []

    def validate_model(layer_names, calibration_size, evaluation_size):
        seen.append((layer_names, calibration_size, evaluation_size))
        raise ValueError("bad hyperparameter: bits_map entry 'stages.9.*' matches no layer")
    with pytest.raises(ValueError, match="stages.9"):
        run_script_with_model_check(HEADER, validate_model, *out_dirs(tmp_path))
    names, calibration_size, evaluation_size = seen[0]
    assert len(names) == 10 and names[0] == "stem.0" and names[-1] == "fc"
    assert (calibration_size, evaluation_size) == (60000, 10000)


def _run_script(folder: str, argv: list, monkeypatch):
    """Run a variant's script as `python3 <folder>/quantize.py <argv>` would."""
    monkeypatch.setattr(sys, "argv", ["quantize.py"] + argv)
    runpy.run_path(str(REPO_ROOT / folder / "quantize.py"), run_name="__main__")


@pytest.mark.parametrize("argv,message", [
    (["--bits_map", "{'stages.9.*': 4, 0: 8}"], "bits_map entries ['stages.9.*'] match no layer; the layers are 0: stem.0"),
    (["--bits_map", "{12: 8}"], "bits_map entries [12] match no layer"),
    (["--bias_batch_size", "70000"], "bias_batch_size 70000 is larger than the calibration set (60000 images)"),
])
def test_adhoc_entries_matching_no_layer_found_before_work(tmp_path, no_work, monkeypatch, capsys, argv, message):
    monkeypatch.delenv("GPFQ_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:  # the script reports the error in one line
        _run_script("adhoc_quantization_scripts", argv + out_dirs(tmp_path), monkeypatch)
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: bad hyperparameter: ") and message in stderr and stderr.count("\n") == 1


def _first_point(folder: str) -> dict:
    return script_points(folder)[0]


EVERY_LOG = [(PLAIN_LOG, "quantization_scripts"), (BIAS_LOG, "adhoc_quantization_scripts"),
             (SKIP_LOG, "adhoc_quantization_scripts"), (MIXED_LOG, "adhoc_quantization_scripts"),
             (RETRAIN_LOG, "retraining_scripts")]


@pytest.mark.parametrize("log_name,folder", EVERY_LOG,
                         ids=[f"{log}-{folder}-variant{i}" for i, (log, folder) in enumerate(EVERY_LOG)])
def test_every_log_column_is_a_result_or_identifies_the_point(log_name, folder):
    """`resume` can tell every variant's points apart: each column is filled from the point or is a result."""
    columns = LOG_COLUMNS[log_name]
    identity = point_identity(_first_point(folder), log_name, folder)
    assert set(identity) == set(columns) - script_result_columns(folder)
    assert {"Bits", "Seed", "Method"} <= set(identity) and not {"Quantized Top1 Accuracy", "Date"} & set(identity)


# ---------------------------------------------------------------- corrupt images
WNIDS = ["n01440764", "n01443537"]


def _tiny_imagenet(root: Path) -> list:
    files = []
    for split in ("train", "val"):
        for c, wnid in enumerate(WNIDS):
            for i in range(2):
                path = root / split / wnid / f"{wnid}_{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.random.default_rng(10 * c + i).integers(0, 255, (240, 250, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path, "JPEG")
                files.append(path)
    return files


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_jpeg_stops_with_its_path_also_from_workers(tmp_path):
    _tiny_imagenet(tmp_path / "ILSVRC2012")
    bad = tmp_path / "ILSVRC2012" / "train" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG"
    _truncate(bad)
    train = calibration_set("imagenet", tmp_path)
    index = [path for path, _ in train.samples].index(str(bad))
    assert train[index - 1][0].shape == (3, 224, 224)  # the good images still load
    with pytest.raises(CorruptImageError, match=f"cannot decode image {bad} .*truncated"):
        train[index]
    with pytest.raises(CorruptImageError, match=str(bad)):  # raised in a worker, reported here
        calibration_stream(train, seed=0, chunk_size=2, num_workers=2).draw(4)


@pytest.mark.parametrize("split", ["train", "val"])
def test_truncated_jpeg_stops_the_run_before_quantization(tmp_path, monkeypatch, split):
    refuse_quantization(monkeypatch)
    files = _tiny_imagenet(tmp_path / "data" / "ILSVRC2012")
    bad = next(p for p in files if p.parts[-3] == split)  # the first image: read by layer discovery (train)
    _truncate(bad)                                         # or by the float model's evaluation (val)
    with pytest.raises(CorruptImageError, match=str(bad)):
        main(HEADER, ["--model", "resnet18", "--dataset", "imagenet", "--weights", "random", "--batch_size", "2",
                      "--data_dir", str(tmp_path / "data")] + out_dirs(tmp_path))
    assert not (tmp_path / "logs" / PLAIN_LOG).exists() and not list((tmp_path / "models").rglob("*.pt"))


# ================================================================ nothing lost
CONCURRENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from gpfq.io.storage import save_model
    from helpers import append_log_row as append_row, plain_log_columns
    tag, out, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    columns, PLAIN_LOG = plain_log_columns(), "Quantization_Log.csv"
    (out / f"ready-{{tag}}").touch()
    while not (out / "go").exists():  # both processes start together
        time.sleep(0.005)
    for i in range(count):
        row = {{c: f"{{tag}} {{i}} {{c}}" for c in columns}}
        row["Model File"] = f"{{tag}} {{i}} " + "x" * 9000  # longer than one write buffer
        append_row(out / PLAIN_LOG, row, columns)
        layer = torch.nn.Linear(3, 2)
        torch.nn.init.constant_(layer.weight, 1000.0 * (tag == "b") + i)
        save_model(layer, {{"tag": tag, "i": i}}, out / "models", "same_stem")  # the same name in both
""")


@pytest.mark.slow
def test_two_processes_append_and_save_at_once(tmp_path):
    script = tmp_path / "append_and_save.py"  # (a name no module has)
    script.write_text(CONCURRENT.format())
    count = 25
    procs = [ForkedProcess([PYTHON, str(script), tag, str(tmp_path), str(count)], env=python_env(TESTS_DIR))
             for tag in ("a", "b")]
    start = time.time()
    while not all((tmp_path / f"ready-{tag}").exists() for tag in ("a", "b")) and time.time() - start < 300:
        assert all(p.poll() is None for p in procs), "a process died before it started appending"
        time.sleep(0.05)
    (tmp_path / "go").touch()
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    with open(tmp_path / PLAIN_LOG, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == COLUMNS and sum(line == COLUMNS for line in lines) == 1  # one header
    rows = lines[1:]
    assert len(rows) == 2 * count
    for tag in ("a", "b"):
        mine = [row for row in rows if row[0].startswith(tag + " ")]
        assert [int(row[0].split()[1]) for row in mine] == list(range(count))  # each process's rows, in order
        for row in mine:  # and whole: every field belongs to the same row
            i = row[0].split()[1]
            for column, value in zip(COLUMNS, row):
                expected = f"{tag} {i} " + "x" * 9000 if column == "Model File" else f"{tag} {i} {column}"
                assert value == expected
    saved = sorted((tmp_path / "models").glob("*.pt"))
    assert len(saved) == 2 * count  # no model replaced another
    found = set()
    for path in saved:
        record = json.loads(path.with_suffix(".json").read_text())
        weight = torch.load(path, weights_only=True)["weight"]
        assert torch.all(weight == 1000.0 * (record["tag"] == "b") + record["i"])  # file and record belong together
        found.add((record["tag"], record["i"]))
    assert len(found) == 2 * count
    assert not list((tmp_path / "models").glob(".*"))  # no temporary file left


def test_row_appended_after_a_torn_line_stays_whole(tmp_path):
    log = tmp_path / PLAIN_LOG
    append_row(log, {c: "first" for c in COLUMNS}, COLUMNS)
    with open(log, "a") as f:
        f.write("torn,row,with,a,full,disk")  # no newline
    append_row(log, {c: "second" for c in COLUMNS}, COLUMNS)
    rows = read_rows(log)
    assert rows[0]["Seed"] == "first" and list(rows[-1].values()) == ["second"] * len(COLUMNS)


GRID = textwrap.dedent("""
    import sys
    import pytest
    from helpers import run_script, slow_layers, small_evaluation
    # Each layer takes ≥ 0.2 s, so a grid point lasts seconds whatever the engine's speed and a signal
    # sent after a point's row lands inside the next point (the rows themselves are real).
    slow_layers(0.2)
    small_evaluation(pytest.MonkeyPatch(), {eval_images})  # for the whole of this process
    from test_reliability import HEADER
    run_script(HEADER, *sys.argv[1:])
""")


def _wait_for_rows(log: Path, count: int, proc, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        if log.exists() and len(read_rows(log)) >= count:
            return
        assert proc.poll() is None, "the grid ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError(f"no row {count} in {log} after {timeout}s")


def _check_intact(root: Path) -> list:
    """Every logged row is whole and its model loads with the record beside it."""
    rows = read_rows(root / "logs" / PLAIN_LOG)
    for row in rows:
        assert None not in row and None not in row.values()  # as many fields as columns
        model_file = Path(row["Model File"])
        record = json.loads(model_file.with_suffix(".json").read_text())
        assert record["results"]["quantized_top1"] == pytest.approx(float(row["Quantized Top1 Accuracy"]), abs=1e-6)
        model = load_model("fashion_resnet", str(model_file))
        levels = torch.unique(model.fc.weight)
        assert len(levels) <= 2 ** int(row["Bits"]) + 1  # the saved weights are really quantized
    return rows


@pytest.mark.slow
def test_interrupt_and_kill_mid_grid_then_resume(tmp_path, small_eval):
    script = tmp_path / "run_grid.py"
    script.write_text(GRID.format(eval_images=EVAL_IMAGES))
    argv = ["--bits", "2", "3", "4", "--batch_size", "8", "--num_threads", "1"] + out_dirs(tmp_path)
    log = tmp_path / "logs" / PLAIN_LOG

    # Ctrl-C during the second point: the first stays, the run says how to go on
    with open(tmp_path / "out1", "w") as out, open(tmp_path / "err1", "w") as err:
        # Ctrl-C must reach the grid even when this suite runs with SIGINT ignored (a shell's background
        # job, nohup): a process inherits an ignored signal, and Python then installs no handler for it.
        proc = ForkedProcess([PYTHON, str(script)] + argv, env=python_env(TESTS_DIR), interrupt=True, stdout=out.name,
                             stderr=err.name)
        _wait_for_rows(log, 1, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    stderr = (tmp_path / "err1").read_text()
    assert "interrupted during grid point" in stderr and "--resume to go on" in stderr
    first = _check_intact(tmp_path)
    assert len(first) == 1
    assert not [p for p in (tmp_path / "models").rglob(".*") if p.is_file()]  # no temporary file left

    # resume, then SIGKILL (no clean-up possible) once one more point is logged
    with open(tmp_path / "out2", "w") as out:
        proc = ForkedProcess([PYTHON, str(script)] + argv + ["--resume"], env=python_env(TESTS_DIR), stdout=out.name,
                             stderr=os.devnull)
        _wait_for_rows(log, 2, proc)
        proc.kill()
        assert proc.wait(timeout=60) == -signal.SIGKILL
    assert "resume: 1 of 3 grid points are already in" in (tmp_path / "out2").read_text()
    second = _check_intact(tmp_path)
    assert len(second) == 2 and second[0] == first[0]

    # resume from the header: only the missing points run
    rows = main(dict(HEADER, resume=True), argv)
    final = _check_intact(tmp_path)
    assert len(rows) == 1 and final[:2] == second
    assert sorted(int(row["Bits"]) for row in final) == [2, 3, 4]
    # resuming a finished grid runs nothing
    assert main(HEADER, argv + ["--resume", "True"]) == []


def test_resume_identity_is_the_hyperparameter_columns(tmp_path, monkeypatch):
    point = dict(HEADER, bits=4, batch_size=512, mlp_scalar=1.3, cnn_scalar=1.3, mlp_percentile=1.0,
                 cnn_percentile=1.0)
    row = {c: "0.5" for c in RESULT_COLUMNS if c in COLUMNS}
    row.update(point_log_values(point))
    row["MLP_Alphabet_Scalar"] = "1.30"  # as another tool might write it: still the same number
    append_row(tmp_path / PLAIN_LOG, row, COLUMNS)
    others = [dict(point, seed=1), dict(point, ignore_layers=[0]), dict(point, include_0=False),
              dict(point, method="msq"), dict(point, bits=3), dict(point, engine="gram")]
    assert pending_grid_points([point] + others, tmp_path) == others
    assert pending_grid_points([dict(point, author="someone else")], tmp_path) == []  # Author is not identity
    # a variant's column that is neither a result nor filled from the point cannot be guessed
    logs = {PLAIN_LOG: COLUMNS, "Variant_Log.csv": COLUMNS + ["Warmup Steps"]}
    append_row(tmp_path / "Variant_Log.csv", dict(row, **{"Warmup Steps": 100}), logs["Variant_Log.csv"])
    with pytest.raises(ValueError, match=r"columns \['Warmup Steps'\]"):
        pending_grid_points([point], tmp_path, logs=logs, log_names=lambda p: "Variant_Log.csv")
    # the variant's own option, typed by its parser: the number of warmup steps
    warmup_steps = lambda p: p.get("warmup_steps", 100)  # noqa: E731
    warmup = lambda p: {"Warmup Steps": p.run.options}  # noqa: E731
    variant = dict(logs=logs, log_names=lambda p: "Variant_Log.csv", columns=warmup, options=warmup_steps)
    logged, other = point, dict(point, warmup_steps=50)
    assert pending_grid_points([logged, other], tmp_path, **variant) == [other]
    # a point whose row goes to two logs is done only when both have it
    both = lambda p: [PLAIN_LOG, "Variant_Log.csv"] if p.config.seed == 0 else [PLAIN_LOG]  # noqa: E731
    variant = dict(logs=logs, log_names=both, columns=warmup, options=warmup_steps)
    assert pending_grid_points([logged], tmp_path, **variant) == []
    assert pending_grid_points([other], tmp_path, **variant) == [other]
    # `--resume` alone means True, on any header
    assert script_settings({"bits": 4}, "--resume")["resume"] is True
    assert script_settings({"bits": 4})["resume"] is False
    assert script_settings(dict(HEADER, resume=True), "--resume", "False")["resume"] is False


# ================================================================ repeatable
def _weights_bytes(path) -> dict:
    return {k: v.numpy().tobytes() for k, v in torch.load(path, weights_only=True).items()}


@pytest.mark.slow
def test_same_seed_same_bits_across_runs_and_workers(tmp_path, small_eval):
    """Two runs, with 0 and 2 data-loading processes: the same quantized weights bit for bit, the same accuracy."""
    argv = ["--bits", "3", "--batch_size", "8", "--num_threads", "1"]
    runs = {workers: main(HEADER, argv + ["--num_workers", str(workers)] + out_dirs(tmp_path / f"workers{workers}"))[0]
            for workers in (0, 2)}
    weights = {workers: _weights_bytes(row["Model File"]) for workers, row in runs.items()}
    assert weights[0] == weights[2]
    assert weights[0] != _weights_bytes(PRETRAINED_DIR / "fashion_resnet.pt")  # really quantized
    for key in ("Quantized Top1 Accuracy", "Quantized Top5 Accuracy", "Original Top1 Accuracy"):
        assert runs[0][key] == runs[2][key]
    # the seed is what fixes the calibration images: another seed draws others
    calibration = calibration_set("fashion_mnist")
    draws = {seed: torch.cat(calibration_stream(calibration, seed).draw(8)) for seed in (0, 1)}
    assert not torch.equal(draws[0], draws[1])
    logged = read_rows(tmp_path / "workers0" / "logs" / PLAIN_LOG)[0]
    revision = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    assert logged["Code Revision"].split("+")[0] == revision
    assert logged["Package Version"] == gpfq.__version__ and logged["Seed"] == "0"


# ================================================================ no row invisible, no silent nonsense
# The new names are imported inside the tests, so each test fails on its own account on a revision without them.
TORN = '…,0.25,0,"Zo'  # a row cut short by a crash or a full disk, inside a quoted field (Author)


def _logged_row(point: dict, top1: float = 0.9) -> dict:
    """A row as run_point writes it: the point's hyperparameter columns and plausible results."""
    row = {c: "" for c in COLUMNS}
    row.update(point_identity(point, PLAIN_LOG))
    row.update({"Original Top1 Accuracy": 0.92, "Quantized Top1 Accuracy": top1, "Original Top5 Accuracy": 0.99,
                "Quantized Top5 Accuracy": 0.99})
    return row


def test_torn_quoted_last_line_is_moved_aside_and_the_new_row_starts_clean(tmp_path, capsys):
    read_logs = plot_logs_script()["read_logs"]
    log = tmp_path / PLAIN_LOG
    append_row(log, {c: "first" for c in COLUMNS}, COLUMNS)
    whole = log.read_bytes()
    with open(log, "a") as f:
        f.write(TORN)
    append_row(log, {c: "second" for c in COLUMNS}, COLUMNS)
    assert [row["Seed"] for row in read_rows(log)] == ["first", "second"]
    assert list(read_logs([log])["Seed"]) == ["first", "second"]  # the plots' (pandas) reader
    sidecars = list(tmp_path.glob(f"{PLAIN_LOG}.torn-*"))
    assert len(sidecars) == 1 and sidecars[0].read_text() == TORN
    assert log.read_bytes().startswith(whole) and TORN.encode() not in log.read_bytes()
    assert f"moved it to {sidecars[0]}" in capsys.readouterr().err


def test_rows_after_a_torn_record_stay_visible_to_resume_pandas_and_plots(tmp_path, capsys):
    """A log an earlier version left with a torn quoted line in the middle and rows after it."""
    plot_logs = plot_logs_script()
    read_logs = plot_logs["read_logs"]
    points = grid_points(HEADER, "--bits", "3", "4", "--batch_size", "64")
    log_dir = tmp_path / "logs"
    log = log_dir / PLAIN_LOG
    log_dir.mkdir()
    with open(log, "w", newline="") as f:  # the old append_row wrote a newline after the torn line, then the row
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerow([_logged_row(points[0], 0.91)[c] for c in COLUMNS])
        f.write(TORN + "\n")
        writer.writerow([_logged_row(points[1], 0.92)[c] for c in COLUMNS])
    assert [row["Bits"] for row in read_rows(log)] == ["3", "4"]
    assert "line 3: an incomplete record" in capsys.readouterr().err  # reported, not swallowed
    assert pending_grid_points(points, log_dir) == []  # resume sees both rows
    assert list(read_logs([log])["Quantized Top1 Accuracy"]) == [0.91, 0.92]
    plot_logs["main"](["--log", str(log), "--out", str(tmp_path / "figures")])
    assert (tmp_path / "figures" / "fashion_resnet_top1_vs_m.png").stat().st_size > 0


def test_disk_full_while_logging_is_one_message_saying_where_the_model_is(tmp_path, small_eval, monkeypatch,
                                                                          capsys):
    log = tmp_path / "logs" / PLAIN_LOG
    fresh_log(log, COLUMNS)
    before = log.read_bytes()
    real_write = os.write

    def full_disk(fd, data):  # the log's file system fills up half-way through the row
        if os.readlink(f"/proc/self/fd/{fd}") == str(log.resolve()):
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(SystemExit) as exit_:
        _run_script("quantization_scripts", ["--batch_size", "8", "--num_threads", "1"] + out_dirs(tmp_path),
                    monkeypatch)
    assert exit_.value.code == 1
    stderr = capsys.readouterr().err
    model = next((tmp_path / "models").rglob("*.pt"))
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr
    assert errors[0].startswith(f"error: could not append the row to {log} (the disk is full: No space left on "
                                f"device); the log is unchanged. The quantized model is saved at {model}, its record")
    assert log.read_bytes() == before  # no torn line left behind
    assert load_model("fashion_resnet", str(model)).fc.weight.unique().numel() <= 2 ** 4 + 1


def test_layer_warnings_and_chance_warning_thresholds():
    layer_warnings, chance_warnings = layer_warning_lines, chance_warning_lines
    assert layer_warnings(64, 64, 98, 100, 0.49) == []
    assert layer_warnings(63, 64, 0, 100, 0.1) == [
        "63 calibration rows < 64 weights per neuron (GPFQ needs m ≫ N0: raise batch_size or retain_rate)"]
    assert layer_warnings(64, 64, 99, 100, 0.1) == ["99.0% of the weights quantized to 0 (alphabet too coarse for them?)"]
    assert layer_warnings(64, 64, 0, 100, 0.5) == ["relative error 0.5000 ≥ 0.5"]
    assert chance_warnings(0.1201, 10) == []
    assert chance_warnings(0.12, 10) == ["final top-1 0.1200 is within 2 points of chance (0.1000 for 10 classes)"]
    assert chance_warnings(0.0005, 1000) == ["final top-1 0.0005 is within 2 points of chance (0.0010 for 1000 "
                                             "classes)"]


def test_batch_size_1_warns_that_layers_have_fewer_rows_than_weights(tmp_path, small_eval, capsys):
    row = main(HEADER, ["--batch_size", "1", "--num_threads", "1"] + out_dirs(tmp_path))[0]
    out = capsys.readouterr().out
    fc_line = next(line for line in out.splitlines() if line.startswith("[10/10] fc Linear W(10, 64) X(1, 64)"))
    message = "1 calibration rows < 64 weights per neuron (GPFQ needs m ≫ N0: raise batch_size or retain_rate)"
    assert fc_line.endswith(f"; WARNING: {message}")
    assert f"fc: {message}" in row["Warnings"].split("; ")
    assert read_rows(tmp_path / "logs" / PLAIN_LOG)[0]["Warnings"] == row["Warnings"]


@pytest.mark.slow
def test_huge_alphabet_scalar_warns_on_every_layer_and_at_chance(tmp_path, capsys):
    """C = 1e9: every weight rounds to 0; the model outputs its last bias, one class, 10 % on the balanced test set."""
    row = main(HEADER, ["--mlp_scalar", "1e9", "--cnn_scalar", "1e9", "--batch_size", "8", "--num_threads", "1"]
               + out_dirs(tmp_path))[0]
    assert row["Quantized Top1 Accuracy"] == 0.1
    warnings = row["Warnings"].split("; ")
    assert warnings[-1] == "final top-1 0.1000 is within 2 points of chance (0.1000 for 10 classes)"
    for name in ("stem.0", "stages.1.conv2", "fc"):
        assert f"{name}: 100.0% of the weights quantized to 0 (alphabet too coarse for them?)" in warnings
        assert f"{name}: relative error 1.0000 ≥ 0.5" in warnings
    out = capsys.readouterr().out
    assert "WARNING: final top-1 0.1000 is within 2 points of chance" in out
    assert sum("; WARNING: " in line for line in out.splitlines() if line.startswith("[")) == 10


# ---------------------------------------------------------------- clean errors
CLEAN_ERRORS = [
    (["--bits", "0"], "bad hyperparameter: bits must be a positive integer, got 0"),
    (["--bits", "64"], "bad hyperparameter: bits 64 is more than the alphabets support: at most 16 bits "
                       "(65537 levels)"),
    (["--weights", "DEFAULT", "random"], "bad hyperparameter: weights takes one value, got 2: ['DEFAULT', "
                                         "'random']; it does not expand into a grid (quote a value that has "
                                         "spaces: --weights 'a b')"),
    (["--device", "cpu", "cpu"], "bad hyperparameter: device takes one value, got 2: ['cpu', 'cpu']; it does "
                                 "not expand into a grid (quote a value that has spaces: --device 'a b')"),
    (["--author", "a", "b"], "bad hyperparameter: author takes one value, got 2: ['a', 'b']; it does not expand "
                             "into a grid (quote a value that has spaces: --author 'a b')"),
    (["--weights", "nowhere.pt"], "weights file nowhere.pt not found; weights is 'DEFAULT', 'random' or the path "
                                  "of a state-dict file"),
]


@pytest.mark.parametrize("argv,message", CLEAN_ERRORS, ids=[" ".join(a) for a, _ in CLEAN_ERRORS])
def test_known_error_is_one_line_and_exit_2_without_stack(tmp_path, no_work, monkeypatch, capsys, argv, message):
    monkeypatch.delenv("GPFQ_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        _run_script("quantization_scripts", argv + out_dirs(tmp_path), monkeypatch)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"  # all the user sees


def test_foreign_log_and_non_finite_model_are_clean_errors(tmp_path, no_work, monkeypatch, capsys):
    monkeypatch.delenv("GPFQ_DEBUG", raising=False)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / PLAIN_LOG).write_text("Model,Acc\nalexnet,0.5\n")
    with pytest.raises(SystemExit) as exit_:
        _run_script("quantization_scripts", out_dirs(tmp_path), monkeypatch)
    assert exit_.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    torch.save(_state_with(lambda s: s["fc.bias"].__setitem__(3, float("inf"))), tmp_path / "bad.pt")
    with pytest.raises(SystemExit) as exit_:
        _run_script("quantization_scripts", ["--weights", str(tmp_path / "bad.pt"), "--log_dir",
                                             str(tmp_path / "other_logs"), "--model_dir", str(tmp_path / "models")],
                    monkeypatch)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: fc.bias of the float model contains 0 NaN and 1 Inf values\n"


@pytest.mark.slow
def test_debug_shows_the_stack_and_the_script_exits_2(tmp_path, no_work, monkeypatch):
    monkeypatch.delenv("GPFQ_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stopped:  # prints the error's stack, then exits as without --debug
        _run_script("quantization_scripts", ["--bits", "0", "--debug"] + out_dirs(tmp_path), monkeypatch)
    assert stopped.value.code == 2
    # the real script, as a user runs it
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("GPFQ_DEBUG", None)
    command = [PYTHON, str(REPO_ROOT / "quantization_scripts" / "quantize.py"), "--bits", "0"] + out_dirs(tmp_path)
    plain = run_python(command, capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 2
    assert plain.stderr == "error: bad hyperparameter: bits must be a positive integer, got 0\n"
    debug = run_python(command, capture_output=True, text=True, env=dict(env, GPFQ_DEBUG="1"), timeout=300)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().endswith("bits must be a positive integer, got 0")


def test_debug_from_the_command_line_the_header_or_the_environment(monkeypatch):
    debug_requested = debug_asked
    monkeypatch.delenv("GPFQ_DEBUG", raising=False)
    assert debug_requested(["--bits", "3", "--debug"]) and debug_requested(["--debug", "--bits", "3"])
    assert debug_requested(["--debug", "True"]) and not debug_requested(["--debug", "False"])
    assert not debug_requested(["--debug", "False"], {"debug": True})  # the command line wins over the header
    assert debug_requested([], {"debug": True}) and not debug_requested([], {"debug": False})
    assert not debug_requested([])
    monkeypatch.setenv("GPFQ_DEBUG", "1")
    assert debug_requested(["--debug", "False"])


def test_bits_beyond_the_alphabet_limit_refused_everywhere():
    from gpfq.methods.alphabet import MAX_BITS
    assert make_alphabet("midtread", MAX_BITS, 1.0, 1.0).numel() == 2 ** MAX_BITS + 1  # the limit itself works
    with pytest.raises(ValueError, match=f"bits must be an integer from 1 to {MAX_BITS}, got {MAX_BITS + 1}"):
        make_alphabet("gpfq2022", MAX_BITS + 1, 1.0, 1.0)
    point = script_points("adhoc_quantization_scripts",
                          header=dict(_first_point("adhoc_quantization_scripts"), bits_map={0: 64}))[0]
    with pytest.raises(ValueError, match=r"bits_map\[0\] must be an integer from 1 to 16"):
        check_options("adhoc_quantization_scripts", point)


# ---------------------------------------------------------------- resume identity: the weights
def test_resume_tells_other_weights_apart(tmp_path, monkeypatch):
    import hashlib
    import shutil
    import gpfq.io.models
    point = grid_points(HEADER)[0]
    shipped = PRETRAINED_DIR / "fashion_resnet.pt"
    append_row(tmp_path / PLAIN_LOG, _logged_row(point), COLUMNS)
    digest = hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert read_rows(tmp_path / PLAIN_LOG)[0]["Weights"] == f"DEFAULT sha256:{digest[:12]}"
    assert pending_grid_points([point], tmp_path) == []
    other = tmp_path / "retrained.pt"
    torch.save(_state_with(lambda s: s["fc.bias"].add_(1.0)), other)
    for weights in ("random", str(other)):
        assert pending_grid_points([dict(point, weights=weights)], tmp_path) == [dict(point, weights=weights)]
    # the shipped file retrained in place: 'DEFAULT' now names other weights
    (tmp_path / "pretrained").mkdir()
    shutil.copy(other, tmp_path / "pretrained" / "fashion_resnet.pt")
    monkeypatch.setattr(gpfq.io.models, "PRETRAINED_DIR", tmp_path / "pretrained")
    assert pending_grid_points([point], tmp_path) == [point]


def test_training_script_never_replaces_the_shipped_weights_by_default(tmp_path, monkeypatch):
    script = runpy.run_path(str(REPO_ROOT / "scripts" / "train_default_models.py"))
    assert Path(script["DEFAULT_OUT"]).resolve() != PRETRAINED_DIR.resolve()
    shipped = (PRETRAINED_DIR / "fashion_resnet.pt").read_bytes()
    generator = torch.Generator().manual_seed(0)
    tiny = TensorDataset(torch.randn(32, 1, 28, 28, generator=generator), torch.arange(32) % 10)
    main_of = script["main"]
    main_of.__globals__["fashion_mnist"] = lambda split: tiny  # a tiny train and test set: seconds, not hours
    main_of(["fashion_resnet", "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path)])
    assert set(torch.load(tmp_path / "fashion_resnet.pt", weights_only=True)) == set(
        torch.load(PRETRAINED_DIR / "fashion_resnet.pt", weights_only=True))
    assert f"--out {tmp_path}" in json.loads((tmp_path / "fashion_resnet.json").read_text())["command"]
    with pytest.raises(Exception, match="fashion_resnet.pt exists; choose another --out, or add --overwrite"):
        main_of(["fashion_resnet", "--epochs", "1", "--out", str(tmp_path)])
    assert (PRETRAINED_DIR / "fashion_resnet.pt").read_bytes() == shipped


# ---------------------------------------------------------------- one loader for saved models
def test_load_model_loads_bias_corrected_and_folded_models(tmp_path):
    import copy
    from gpfq.io.models import load_saved_model
    float_model = load_model("fashion_resnet")
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    corrected = copy.deepcopy(float_model)
    with torch.no_grad():
        corrected.stem[0].weight.mul_(0.9)  # a stand-in for quantization: the outputs move, the bias corrects
    bias_correction(float_model, corrected, "stem.0", [images], log=lambda text: None)
    assert corrected.stem[0].bias is not None and float_model.stem[0].bias is None
    folded, pairs = batchnorm_folded(float_model)
    assert pairs
    for model, stem in ((corrected, "corrected"), (folded, "folded")):
        path = tmp_path / f"{stem}.pt"
        torch.save(model.state_dict(), path)
        path.with_suffix(".json").write_text(json.dumps({"hyperparameters": {"model_name": "fashion_resnet"}}))
        with torch.no_grad():
            expected = model(images)
            assert torch.equal(load_model("fashion_resnet", str(path))(images), expected)
            assert torch.equal(load_saved_model(path)(images), expected)


def test_adhoc_model_file_and_header_name_the_options_and_the_model_loads(tmp_path, small_eval, monkeypatch, capsys):
    from gpfq.io.models import load_saved_model
    argv = ["--bias_correction", "all", "--bias_batch_size", "16", "--batch_size", "8", "--bits", "3",
            "--num_threads", "1"] + out_dirs(tmp_path)
    _run_script("adhoc_quantization_scripts", argv, monkeypatch)
    row = read_rows(tmp_path / "logs" / BIAS_LOG)[0]
    model_file = Path(row["Model File"])
    assert model_file.name.startswith("adhoc_bias-all_gpfq_gpfq2022_layer_b3_m8_")
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("== "))
    assert header.endswith(", Bias Correction all, Bias Correction Batch Size 16")
    model = load_saved_model(model_file)
    assert model.stem[0].bias is not None  # bias correction gave the bias-free conv a bias
    top1, _ = scored(model, script_evaluation_loader("fashion_mnist"))
    assert top1 == pytest.approx(float(row["Quantized Top1 Accuracy"]), abs=1e-6)


# ---------------------------------------------------------------- one numeric path for the Gram form
def test_kept_rows_give_bit_identical_q_to_streamed_rows_past_100k_rows():
    """A layer with 110,000 rows: rows kept for after_layer (the ad hoc and retraining hooks) and rows streamed
    are summed the same way, in chunks into float64, so Q is the same bit for bit. Before, kept rows went
    through one float32 product over all rows, and 4 of these 18,432 codes differed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 128, 3)).eval()
    images = torch.rand(1100, 16, 12, 12) + 3.0  # a large mean: the Grams' float32 sums lose the most
    settings = QuantConfig(bits=8, mlp_scalar=1.3, cnn_scalar=1.3, engine="gram", alphabet_granularity="channel",
                           batch_size=1100, retain_rate=1.0, seed=0, patch_stride="layer")
    results = {}
    for keep_rows in (False, True):
        quantized, reports = quantized_network(model, images, settings, keep_rows=keep_rows)
        assert reports[0].rows == 110_000 and reports[0].form == "gram"
        results[keep_rows] = (quantized[0].weight, reports[0].relative_error)
    assert torch.equal(results[False][0], results[True][0])
    assert results[False][1] == results[True][1]


# ---------------------------------------------------------------- small things
def test_make_demo_works_with_an_absolute_venv():
    dry = subprocess.run(["make", "-n", "-C", str(REPO_ROOT), "VENV=/abs/venv", "demo"], capture_output=True,
                         text=True, check=True).stdout
    assert "/abs/venv/bin/python quantization_scripts/quantize.py" in dry and "../" not in dry


def test_plot_logs_without_options_leaves_the_readme_figures_alone(tmp_path, monkeypatch):
    plot_logs = plot_logs_script()
    figures = {path: path.read_bytes() for path in (REPO_ROOT / "figures").glob("*.png")}
    assert Path(plot_logs["DEFAULT_OUT"]).resolve() != (REPO_ROOT / "figures").resolve()
    log = tmp_path / PLAIN_LOG
    for bits in (3, 4):
        append_row(log, _logged_row(grid_points(HEADER, "--bits", str(bits))[0]), COLUMNS)
    plot_logs["main"].__globals__["DEFAULT_OUT"] = tmp_path / "default_out"
    plot_logs["main"](["--log", str(log)])
    assert (tmp_path / "default_out" / "fashion_resnet_methods.png").exists()
    assert {path: path.read_bytes() for path in (REPO_ROOT / "figures").glob("*.png")} == figures


def test_init_logs_twice_archives_no_empty_log(tmp_path):
    init_logs = runpy.run_path(str(REPO_ROOT / "logs" / "init_logs.py"))
    init_logs["main"](tmp_path)
    append_row(tmp_path / PLAIN_LOG, {c: "kept" for c in COLUMNS}, COLUMNS)
    init_logs["main"](tmp_path)  # archives the plain log, which has a row
    init_logs["main"](tmp_path)  # every log now holds only its header: nothing to archive
    archived = sorted(path.name for path in tmp_path.glob("*_*-*.csv"))
    assert len(archived) == 1 and archived[0].startswith("Quantization_Log_2")
    assert read_rows(tmp_path / archived[0])[0]["Seed"] == "kept"
    assert len(list(tmp_path.glob("*.csv"))) == len(LOG_COLUMNS) + 1


@pytest.mark.slow
def test_bench_memory_runs_at_small_sizes():
    run = subprocess.run([PYTHON, str(REPO_ROOT / "benchmarks" / "bench_memory.py"), "--m", "2", "4", "--threads",
                          "1"], capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert run.returncode == 0, run.stderr
    rows = [line.split("|") for line in run.stdout.splitlines() if line.startswith("| streamed | ")
            or line.startswith("| rows kept | ")]
    assert [(row[1].strip(), int(row[2]), int(row[3])) for row in rows] == [
        ("streamed", 2, 2 * 91), ("streamed", 4, 4 * 91), ("rows kept", 2, 2 * 91), ("rows kept", 4, 4 * 91)]
