"""Reliability: bad input fails fast and clearly, nothing is ever lost, runs are repeatable.

Runs of the embedded default use tiny m and, to fit the test budget, evaluate on the first
EVAL_IMAGES Fashion-MNIST test images (gpfq.experiment.evaluation_set is narrowed; the code
paths are the real ones).
"""
import csv
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
from torch.utils.data import Subset, TensorDataset

from conftest import TESTS_DIR, python_env

import gpfq
from gpfq import adhoc, experiment, retrain
from gpfq.alphabet import ALPHABET_KINDS, make_alphabet
from gpfq.capture import NonFiniteError
from gpfq.data import CalibrationStream, CorruptImageError, DataMissingError, calibration_set
from gpfq.experiment import expand_grid, main, parse_overrides, pending_points, point_columns, point_identity
from gpfq.adhoc import ADHOC, BIAS_LOG, MIXED_LOG, SKIP_LOG
from gpfq.experiment import PLAIN, Variant
from gpfq.logs import PLAIN_LOG, RESULT_COLUMNS, ForeignLogError, append_row, read_rows
from gpfq.procedures import LOG_COLUMNS
from gpfq.retrain import RETRAIN, RETRAIN_LOG
from gpfq.models import WeightsUnavailableError, load_model
from gpfq.engine import ENGINES
from gpfq.network import CALIBRATIONS, METHODS, LayerSettings, layer_alphabet, _quantize_network
from gpfq.paths import PRETRAINED_DIR, REPO_ROOT
from gpfq.quantizer import gpfq_reference, msq

COLUMNS = LOG_COLUMNS[PLAIN_LOG]
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


@pytest.fixture
def small_eval(monkeypatch):
    full = experiment.evaluation_set
    monkeypatch.setattr(experiment, "evaluation_set", lambda name, data_dir: Subset(full(name, data_dir),
                                                                                     range(EVAL_IMAGES)))


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the expensive work (evaluation, quantization) starts."""
    def started(*args, **kwargs):
        raise AssertionError("expensive work started before the bad input was reported")
    monkeypatch.setattr(experiment, "evaluate", started)
    monkeypatch.setattr(gpfq.api, "_quantize_network", started)


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
    with pytest.raises(ValueError) as error:
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
    with pytest.raises(ForeignLogError, match="refusing to append.*init_logs.py"):
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


@pytest.mark.parametrize("calibration", CALIBRATIONS)
def test_nan_in_activations_during_quantization_names_the_layer(calibration):
    torch.manual_seed(0)
    model = _mlp(8, 6, 3)
    images = torch.randn(16, 8)
    images[5, 2] = float("nan")  # not image 0, which layer discovery runs on
    stream = CalibrationStream(TensorDataset(images, torch.zeros(16)), seed=0)
    settings = LayerSettings(bits=3)
    with pytest.raises(NonFiniteError, match="the input of layer 0 in the float model contains 1 NaN and 0 Inf"):
        _quantize_network(model, stream, lambda i, n, l: settings, 16, 1.0, 0, log=lambda text: None,
                         calibration=calibration)


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
    stream = CalibrationStream(TensorDataset(torch.randn(32, 8), torch.zeros(32)), seed=0)
    quantized, reports = _quantize_network(_zero_model(), stream, lambda i, n, l: settings, 32, 1.0, 0,
                                          log=lambda text: None, after_layer=steps.append, keep_rows=keep_rows)
    assert all(torch.isfinite(p).all() for p in quantized.parameters())
    assert all(np.isfinite(r.relative_error) for r in reports)
    assert torch.all(quantized[4].weight == 0) and reports[2].relative_error == 0.0  # rad = 0: Q = 0
    return quantized, reports, steps


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_zero_weights_and_zero_inputs_work_for_every_method(method, granularity):
    _quantize_zero_model(LayerSettings(method=method, bits=3, scalar=1.3, granularity=granularity,
                                       threshold=0.1))


@pytest.mark.parametrize("engine", ENGINES)
def test_zero_weights_and_zero_inputs_work_for_every_engine(engine):
    """Each GPFQ engine (rows not kept, so the Gram form streams its sums) handles ‖X̃_t‖ = 0 and rad = 0."""
    quantized, reports, _ = _quantize_zero_model(LayerSettings(bits=3, scalar=1.3, engine=engine), keep_rows=False)
    assert torch.all(quantized[2].weight[:, :3] == 0)  # zero input columns: argument 0, the level 0
    assert torch.all(quantized[6].weight == 0) and reports[3].relative_error == 0.0


def test_zero_weights_and_zero_input_columns():
    """rad = 0 gives the alphabet {0}; input columns with ‖X̃_t‖ = 0 take argument 0; nothing divides by 0."""
    settings = LayerSettings(bits=3, scalar=1.3)
    model = _zero_model()
    quantized, reports, steps = _quantize_zero_model(settings)
    # layer 1: the per-column specification on the same rows, zero columns included
    step = steps[1]
    assert torch.all(step.quantized_rows[0, :, :3] == 0) and torch.all(step.analog_rows[0, :, :3] == 0)
    alphabet, _ = layer_alphabet(model[2], settings)
    expected = gpfq_reference(step.weight[0], step.analog_rows[0], step.quantized_rows[0], alphabet)
    assert torch.equal(step.quantized_weight[0], expected.float())
    assert torch.all(expected[:, :3] == 0)  # argument 0 -> the level 0
    # layer 2: rad = 0
    assert reports[2].radius == 0.0 and reports[2].levels == 1 and reports[2].relative_error == 0.0
    assert torch.all(quantized[4].weight == 0)
    # layer 3: every input column is zero, so every argument is 0 and every weight quantizes to 0
    assert torch.all(steps[3].quantized_rows == 0)
    assert torch.all(quantized[6].weight == 0) and reports[3].relative_error == 0.0
    for kind in ALPHABET_KINDS:
        levels = make_alphabet(kind, 4, 1.3, 0.0)
        assert levels.tolist() == [0.0]
        assert torch.all(msq(torch.randn(5, 5), levels) == 0)


def test_variant_model_checks_see_layers_and_sizes_before_work(tmp_path, no_work):
    seen = []

    def validate_model(point, facts):
        seen.append((facts.layer_names, facts.calibration_size, facts.evaluation_size))
        raise ValueError("bad hyperparameter: bits_map entry 'stages.9.*' matches no layer")
    with pytest.raises(ValueError, match="stages.9"):
        main(HEADER, out_dirs(tmp_path), variant=Variant(validate_model=validate_model))
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
def test_adhoc_entries_matching_no_layer_found_before_work(tmp_path, no_work, monkeypatch, argv, message):
    with pytest.raises(ValueError) as error:
        _run_script("adhoc_quantization_scripts", argv + out_dirs(tmp_path), monkeypatch)
    assert message in str(error.value)


def _first_point(folder: str) -> dict:
    spec = importlib.util.spec_from_file_location(f"{folder}_header", REPO_ROOT / folder / "quantize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return expand_grid(module.HEADER, adhoc.GRID_KEYS + retrain.GRID_KEYS)[0]


@pytest.mark.parametrize("log_name,folder,variant", [
    (PLAIN_LOG, "quantization_scripts", PLAIN), (BIAS_LOG, "adhoc_quantization_scripts", ADHOC),
    (SKIP_LOG, "adhoc_quantization_scripts", ADHOC), (MIXED_LOG, "adhoc_quantization_scripts", ADHOC),
    (RETRAIN_LOG, "retraining_scripts", RETRAIN)])
def test_every_log_column_is_a_result_or_identifies_the_point(log_name, folder, variant):
    """`resume` can tell every variant's points apart: each column is filled from the point or is a result."""
    columns = LOG_COLUMNS[log_name]
    identity = point_identity(_first_point(folder), columns, variant)
    assert set(identity) == set(columns) - RESULT_COLUMNS - variant.result_columns
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
        CalibrationStream(train, seed=0, chunk_size=2, num_workers=2).draw(4)


@pytest.mark.parametrize("split", ["train", "val"])
def test_truncated_jpeg_stops_the_run_before_quantization(tmp_path, monkeypatch, split):
    def started(*args, **kwargs):
        raise AssertionError("quantization started")
    monkeypatch.setattr(gpfq.api, "_quantize_network", started)
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
    from gpfq.experiment import save_model
    from gpfq.logs import PLAIN_COLUMNS, PLAIN_LOG, append_row
    tag, out, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    columns = PLAIN_COLUMNS
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
    procs = [subprocess.Popen([PYTHON, str(script), tag, str(tmp_path), str(count)], env=python_env())
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
    import time
    from torch.utils.data import Subset
    from gpfq import experiment, network
    # Each layer takes ≥ 0.2 s, so a grid point lasts seconds whatever the engine's speed and a signal
    # sent after a point's row lands inside the next point (the rows themselves are real).
    real_quantize_layer = network.quantize_layer
    network.quantize_layer = lambda *args, **kwargs: (time.sleep(0.2), real_quantize_layer(*args, **kwargs))[1]
    full = experiment.evaluation_set
    experiment.evaluation_set = lambda name, data_dir: Subset(full(name, data_dir), range({eval_images}))
    from test_reliability import HEADER
    experiment.main(HEADER, sys.argv[1:])
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
        proc = subprocess.Popen([PYTHON, str(script)] + argv, stdout=out, stderr=err, env=python_env(TESTS_DIR),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
        proc = subprocess.Popen([PYTHON, str(script)] + argv + ["--resume"], stdout=out, stderr=subprocess.DEVNULL,
                                env=python_env(TESTS_DIR))
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
    row.update(point_columns(point))
    row["MLP_Alphabet_Scalar"] = "1.30"  # as another tool might write it: still the same number
    append_row(tmp_path / PLAIN_LOG, row, COLUMNS)
    others = [dict(point, seed=1), dict(point, ignore_layers=[0]), dict(point, include_0=False),
              dict(point, method="msq"), dict(point, bits=3), dict(point, engine="gram")]
    assert pending_points([point] + others, tmp_path) == others
    assert pending_points([dict(point, author="someone else")], tmp_path) == []  # Author is not identity
    # a variant's column that is neither a result nor filled from the point cannot be guessed
    logs = {PLAIN_LOG: COLUMNS, "Variant_Log.csv": COLUMNS + ["Warmup Steps"]}
    append_row(tmp_path / "Variant_Log.csv", dict(row, **{"Warmup Steps": 100}), logs["Variant_Log.csv"])
    with pytest.raises(ValueError, match=r"columns \['Warmup Steps'\]"):
        pending_points([point], tmp_path, Variant(logs=logs, log_names=lambda p: "Variant_Log.csv"))
    warmup = lambda p: {"Warmup Steps": p.get("warmup_steps", 100)}  # noqa: E731
    variant = Variant(logs=logs, log_names=lambda p: "Variant_Log.csv", columns=warmup)
    assert pending_points([point, dict(point, warmup_steps=50)], tmp_path, variant) == [dict(point, warmup_steps=50)]
    # a point whose row goes to two logs is done only when both have it
    both = lambda p: [PLAIN_LOG, "Variant_Log.csv"] if p["seed"] == 0 else [PLAIN_LOG]  # noqa: E731
    variant = Variant(logs=logs, log_names=both, columns=warmup)
    assert pending_points([point], tmp_path, variant) == []
    assert pending_points([dict(point, warmup_steps=50)], tmp_path, variant) == [dict(point, warmup_steps=50)]
    # parse_overrides: `--resume` alone means True, on any header
    assert parse_overrides({"bits": 4}, ["--resume"])["resume"] is True
    assert parse_overrides({"bits": 4}, [])["resume"] is False
    assert parse_overrides(dict(HEADER, resume=True), ["--resume", "False"])["resume"] is False


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
    calibration = experiment.calibration_set("fashion_mnist")
    draws = {seed: torch.cat(CalibrationStream(calibration, seed).draw(8)) for seed in (0, 1)}
    assert not torch.equal(draws[0], draws[1])
    logged = read_rows(tmp_path / "workers0" / "logs" / PLAIN_LOG)[0]
    revision = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    assert logged["Code Revision"].split("+")[0] == revision
    assert logged["Package Version"] == gpfq.__version__ and logged["Seed"] == "0"
