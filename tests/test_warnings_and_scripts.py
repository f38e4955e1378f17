"""Hostile-new-user rough edges: degenerate calibration data, the chance warning, file names from model
names, the scripts run from anywhere, Ctrl-C mid-point (one process and several ranks), the `layers=`
rule order and the offline example."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

import gpfq

from conftest import TESTS_DIR, python_env
from helpers import append_log_row, chance_warning_lines, evaluation_classes, grid_points, record_layers

REPO = TESTS_DIR.parent
PYTHON = sys.executable


# ---------------------------------------------------------------- degenerate calibration data
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("engine", ["gram", "residual"])  # streamed sums, and rows
def test_zero_calibration_data_warns_and_error_is_undefined(engine):
    """All-zero images: layer 1's input is zero (‖XWᵀ‖ = 0, error undefined, not 0); layer 3's input is
    relu(bias), the same on every row. Both get their own warning, and no 'alphabet too coarse' guess."""
    lines = []
    result = gpfq.quantize(_mlp(), torch.zeros(64, 1, 4, 4), gpfq.QuantConfig(bits=4, batch_size=32, engine=engine),
                           log=lines.append)
    first, last = result.reports
    assert math.isnan(first.relative_error) and math.isnan(result.relative_errors["1"])
    assert any("float input is zero on all 32 calibration rows" in w for w in first.warnings)
    assert not any("alphabet too coarse" in w for w in first.warnings)
    assert any("float input is the same on all 32 calibration rows" in w for w in last.warnings)
    assert math.isfinite(last.relative_error)  # X = 1·cᵀ with c = relu(b) ≠ 0: the error is defined
    line = next(text for text in lines if text.startswith("[1/2] 1 Linear"))
    assert "rel. error undefined (the layer's float output is zero on the calibration data)" in line
    assert "WARNING: its float input is zero" in line and "rel. error 0.0000" not in line
    # the JSON record: null, never a misleading 0 (and strict JSON: no NaN literal)
    record = json.loads(json.dumps(record_layers(result.reports), allow_nan=False))
    assert record[0]["relative_error"] is None and record[1]["relative_error"] == pytest.approx(last.relative_error)


def test_ordinary_calibration_data_has_no_input_warning():
    result = gpfq.quantize(_mlp(), torch.randn(64, 1, 4, 4), gpfq.QuantConfig(bits=4, batch_size=32),
                           log=lambda text: None)
    assert all(math.isfinite(r.relative_error) and 0 < r.relative_error < 1 for r in result.reports)
    assert not any("float input" in w for r in result.reports for w in r.warnings)


# ---------------------------------------------------------------- the chance warning
def test_chance_warning_counts_the_evaluation_classes_and_says_below():
    chance_warnings, classes_in = chance_warning_lines, evaluation_classes
    labels = torch.arange(1000) % 10
    data = TensorDataset(torch.zeros(1000, 1), labels)
    assert classes_in(data) == 10
    two = Subset(data, [i for i in range(1000) if labels[i] < 2])  # 2 classes left of 10 model outputs
    assert classes_in(two) == 2 and classes_in(Subset(two, [0, 2, 4])) == 1
    assert classes_in(TensorDataset(torch.zeros(3, 1))) is None  # no labels: unknown
    # far below chance is not "within 2 points" of it
    assert chance_warnings(0.0, 10) == ["final top-1 0.0000 is below chance (0.1000 for 10 classes): worse than "
                                        "guessing"]
    assert chance_warnings(0.49, 2) == ["final top-1 0.4900 is within 2 points of chance (0.5000 for 2 classes)"]
    assert chance_warnings(0.53, 2) == []


# ---------------------------------------------------------------- plot_logs and model names with '/'
def test_plot_logs_draws_models_whose_names_hold_slashes(tmp_path):
    """'path/file.py:factory' and 'package.module:factory' models get one figure pair each, in --out itself."""
    import runpy
    from test_reliability import COLUMNS, HEADER, _logged_row
    log = tmp_path / "log.csv"
    names = ["examples/my_model.py:build", "examples.my_model:build"]
    for name in names:
        for bits in (3, 4):
            point = grid_points(HEADER, "--bits", str(bits))[0]
            append_log_row(log, dict(_logged_row(point), **{"Model Name": name}), COLUMNS)
    plot_logs = runpy.run_path(str(REPO / "experiments" / "plot_logs.py"))
    out = tmp_path / "figures"
    plot_logs["main"](["--log", str(log), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}_{kind}.png" for stem in ("examples_my_model.py_build", "examples.my_model_build")
        for kind in ("top1_vs_m", "methods"))
    assert all(p.stat().st_size > 0 for p in out.iterdir())


# ---------------------------------------------------------------- every script runs from anywhere
# examples/my_model.py is a module (a model factory for --model), not a script.
SCRIPTS = sorted([p for p in (REPO / "benchmarks").glob("*.py") if p.name != "common.py"]
                 + list((REPO / "experiments").glob("*.py")) + list((REPO / "scripts").glob("*.py"))
                 + [p for p in (REPO / "examples").glob("*.py") if p.name != "my_model.py"]
                 + [REPO / "logs" / "init_logs.py"]
                 + [REPO / folder / "quantize.py"
                    for folder in ("quantization_scripts", "adhoc_quantization_scripts", "retraining_scripts")])


@pytest.mark.slow  # 19 scripts, each importing what it needs (matplotlib, onnx, …)
def test_every_script_prints_its_help_from_any_directory(tmp_path):
    """`python3 <repo>/<script> --help` from an unrelated directory, the repository not on PYTHONPATH: usage,
    status 0, nothing written there. Only gpfq itself is made importable (this checkout's, through a folder
    holding a link to it), so a script that needs the repository root on sys.path fails as it would. The 19
    scripts run one after another in one Python process (tests/scripts_in_one_process.py: sys.path[0] is each
    script's folder, as `python3 SCRIPT` sets it), which imports torch once instead of 19 times."""
    assert len(SCRIPTS) == 19  # with scripts/assemble_paper_results.py and experiments/int8_accuracy.py
    site = tmp_path / "site"
    site.mkdir()
    (site / "gpfq").symlink_to(REPO / "gpfq", target_is_directory=True)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    specs = []
    for script in SCRIPTS:
        cwd = tmp_path / f"cwd_{script.parent.name}_{script.stem}"
        cwd.mkdir()
        specs.append({"script": str(script), "cwd": str(cwd), "args": ["--help"]})
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    driver = subprocess.run([PYTHON, str(TESTS_DIR / "scripts_in_one_process.py"), str(tmp_path / "specs.json")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert driver.returncode == 0, driver.stderr[-3000:]
    results = json.loads(driver.stdout)
    assert [r["script"] for r in results] == [str(s) for s in SCRIPTS]
    failures = []
    for result, spec in zip(results, specs):
        name = Path(result["script"]).relative_to(REPO)
        cwd = Path(spec["cwd"])
        if result["status"] != 0:
            failures.append(f"{name}: status {result['status']}: {result['stderr'].strip().splitlines()[-1:]}")
        elif "usage" not in result["stdout"].lower():
            failures.append(f"{name}: no usage printed: {result['stdout'][:200]!r}")
        elif list(cwd.iterdir()):
            failures.append(f"{name}: wrote {[p.name for p in cwd.iterdir()]} in the working directory")
    assert failures == []


def test_the_one_process_runner_keeps_each_scripts_failure_and_imports_apart(tmp_path):
    """The runner behind the --help test reports a script that fails, and a script cannot import a module that
    only an earlier script's folder holds (each starts with its own folder on sys.path, the earlier one's
    modules dropped)."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    (tmp_path / "a" / "sibling.py").write_text("VALUE = 1\n")
    (tmp_path / "a" / "first.py").write_text("import sibling\nprint('usage: first', sibling.VALUE)\n")
    (tmp_path / "b" / "second.py").write_text("import sibling\n")
    (tmp_path / "b" / "third.py").write_text("import sys\nsys.exit(3)\n")
    specs = [{"script": str(tmp_path / folder / name), "cwd": str(tmp_path), "args": ["--help"]}
             for folder, name in (("a", "first.py"), ("b", "second.py"), ("b", "third.py"))]
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    driver = subprocess.run([PYTHON, str(TESTS_DIR / "scripts_in_one_process.py"), str(tmp_path / "specs.json")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    first, second, third = json.loads(driver.stdout)
    assert (first["status"], first["stdout"]) == (0, "usage: first 1\n")
    assert second["status"] == 1 and "No module named 'sibling'" in second["stderr"]
    assert third["status"] == 3


@pytest.mark.parametrize("script", ["quantization_scripts/quantize.py", "adhoc_quantization_scripts/quantize.py",
                                    "retraining_scripts/quantize.py", "scripts/train_default_models.py"])
def test_a_python_without_gpfq_is_told_to_use_the_venv(tmp_path, script):
    """After `make demo` the README's `python3 …/quantize.py` is the system Python, without gpfq (here: -S, no
    site-packages): the script says how to use .venv, in one line."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = subprocess.run([PYTHON, "-S", str(REPO / script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and run.stdout == "" and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("this Python cannot import ")
    assert (f"after `make demo` gpfq is installed in .venv; activate it (`source .venv/bin/activate`) or run "
            f"`.venv/bin/python {script} …`; elsewhere run `pip install -e .` in the repository root") in run.stderr
    readme = (REPO / "README.md").read_text()
    assert "`source .venv/bin/activate`" in readme and "`.venv/bin/python quantization_scripts/quantize.py …`" in readme

# ---------------------------------------------------------------- the image-folder example offline
def test_imagefolder_example_offline_says_where_the_weights_go(tmp_path, monkeypatch, capsys):
    """No cached weights and no network: one `error: …` line naming the cache file, status 2, no URLError."""
    import runpy
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    # an empty cache (get_dir itself: an earlier torch.hub.set_dir in the session outranks TORCH_HOME)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(sys, "argv", ["quantize_imagefolder.py", str(tmp_path / "photos"), "--model", "resnet18"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "examples" / "quantize_imagefolder.py"), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ImageNet weights for 'resnet18' are not cached at ") and err.count("\n") == 1
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in err and "Traceback" not in err


# ---------------------------------------------------------------- the documented `layers=` example
class _Features(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.features(x))


def test_documented_layers_example_does_what_the_docs_say():
    """docs/your_model.md's `layers` dict, on a model whose first layer also matches "features.*": the first
    layer stays float, the last gets 8 bits, the other features.* layer is rounded to nearest. The last
    matching entry wins: with the exception first, the pattern after it takes the first layer back."""
    import ast
    import re
    text = (REPO / "docs" / "your_model.md").read_text()
    example = ast.literal_eval(re.search(r"- `layers`: .*?`(\{.*?\})`", text, re.S).group(1))
    model, data = _Features(), torch.randn(64, 8)
    config = gpfq.QuantConfig(bits=3, batch_size=64)
    result = gpfq.quantize(model, data, config, layers=example, log=lambda text: None)
    reports = {r.name: r for r in result.reports}
    assert sorted(reports) == ["fc", "features.2"]  # features.0: float
    assert torch.equal(result.model.features[0].weight, model.features[0].weight)
    assert reports["features.2"].form == "msq" and reports["features.2"].bits == 3
    assert reports["fc"].bits == 8 and reports["fc"].form != "msq"
    overlap = gpfq.quantize(model, data, config, layers={0: None, "features.*": {"method": "msq"}},
                            log=lambda text: None)
    assert [(r.name, r.form) for r in overlap.reports][:2] == [("features.0", "msq"), ("features.2", "msq")]


# ---------------------------------------------------------------- Ctrl-C in the middle of a grid point
# Run first in the script's process (every rank): a small evaluation set, and the quantized model's
# evaluation (after its files are saved, before its row) marks a file and waits to be interrupted.
INTERRUPT_PRELUDE = f"""
import os, sys
from pathlib import Path
import pytest
sys.path.append({str(TESTS_DIR)!r})
from helpers import hold_quantized_evaluation, small_evaluation
small_evaluation(pytest.MonkeyPatch(), 64)  # for the whole of this process
hold_quantized_evaluation(Path(os.environ["MARKS"], "evaluating." + os.environ.get("RANK", "0")), 120)
"""


def _interrupt_args(root: Path) -> list:
    return ["--bits", "3", "--batch_size", "8", "--num_threads", "1", "--log_dir", str(root / "logs"),
            "--model_dir", str(root / "models")]


def _wait_for_marks(marks: Path, count: int, processes, timeout=240):
    start = time.time()
    while len(list(marks.iterdir())) < count:
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        assert time.time() - start < timeout, "the grid point never reached its evaluation"
        time.sleep(0.05)


def _point_files(root: Path) -> list:
    return sorted(p.name for p in (root / "models").rglob("*") if p.is_file())


@pytest.mark.slow  # scripts run as subprocesses on the default model
def test_ctrl_c_mid_point_drops_its_files_as_documented(tmp_path):
    """SIGINT after the point's .pt/.json/.safetensors are saved, before its row: status 130, and none of the
    point's files are left (docs/reliability.md: the point in progress is dropped), so --resume redoes it; its
    per-layer checkpoint stays, so that the redone point starts after its last finished layer."""
    from helpers import logged_rows as read_rows
    marks = tmp_path / "marks"
    marks.mkdir()
    script = str(REPO / "quantization_scripts" / "quantize.py")
    code = INTERRUPT_PRELUDE + (f"import sys, runpy\nsys.argv = [{script!r}] + {_interrupt_args(tmp_path)!r}\n"
                                f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
    process = subprocess.Popen([PYTHON, "-c", code], env=dict(python_env(), MARKS=str(marks)), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_marks(marks, 1, [process])
    assert any(name.endswith(".pt") for name in _point_files(tmp_path))  # saved before its evaluation
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted during grid point 1 of 1" in err
    left = _point_files(tmp_path)
    assert len(left) == 1 and left[0].startswith("checkpoint-") and left[0].endswith(".ckpt"), left
    log = tmp_path / "logs" / "Quantization_Log.csv"
    assert not log.exists() or read_rows(log) == []


@pytest.mark.slow  # scripts run as subprocesses on the default model
def test_ctrl_c_under_two_ranks_says_it_once_and_every_rank_exits_130(tmp_path):
    """Ctrl-C reaches every rank (as torchrun's workers, one process group): rank 0 prints the message once,
    rank 1 nothing, no traceback, both exit with the documented 130."""
    from distributed_workers import finish, start_script_ranks
    marks = tmp_path / "marks"
    marks.mkdir()
    processes = start_script_ranks(2, lambda rank: _interrupt_args(tmp_path), env={"MARKS": str(marks)},
                                   prelude=INTERRUPT_PRELUDE)
    _wait_for_marks(marks, 2, processes)
    for process in processes:
        process.send_signal(signal.SIGINT)
    (code0, out0), (code1, out1) = finish(processes, timeout=120)
    assert (code0, code1) == (130, 130), (out0[-2000:], out1[-2000:])
    assert out0.count("interrupted during grid point 1 of 1") == 1 and "interrupted" not in out1
    assert "Traceback" not in out0 + out1
    assert _point_files(tmp_path) == []


def test_an_installed_package_keeps_its_results_in_the_working_directory(tmp_path):
    """`pip install .` puts gpfq in site-packages (no pyproject.toml beside it): logs/ and models/ default to the
    working directory, not site-packages; a checkout keeps the repository's folders."""
    import shutil
    site, work = tmp_path / "site-packages", tmp_path / "work"
    shutil.copytree(REPO / "gpfq", site / "gpfq", ignore=shutil.ignore_patterns("__pycache__"))
    work.mkdir()
    code = (f"import sys; sys.path.append({str(TESTS_DIR)!r}); from helpers import script_result_folders; "
            "import gpfq.paths as p; print(p.IN_CHECKOUT, p.LOG_DIR, p.MODEL_DIR, p.DATA_DIR, *script_result_folders())")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = subprocess.run([PYTHON, "-c", code], cwd=work, env=dict(env, PYTHONPATH=str(site)), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False"] + [str(work.resolve() / name) for name in ("logs", "models", "data", "logs",
                                                                                       "models")]
    from gpfq import paths
    assert paths.IN_CHECKOUT and paths.LOG_DIR == REPO / "logs" and paths.MODEL_DIR == REPO / "models"
