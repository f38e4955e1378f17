"""The embedded default (fashion_resnet on the real Fashion-MNIST test set), end to end."""
import json
from pathlib import Path

import pytest
from torch import nn

from gpfq.io.models import load_model

from helpers import logged_rows, run_script  # (default_runs, the session fixture, is in conftest)

pytestmark = pytest.mark.slow  # every test here runs whole models (see docs/testing.md)


def test_four_bit_gpfq_within_1_5_points_of_float(default_runs):
    _, rows = default_runs
    row = rows[("gpfq", 4)]
    assert row["Original Top1 Accuracy"] > 0.90  # the shipped model is really trained
    assert row["Quantized Top1 Accuracy"] >= row["Original Top1 Accuracy"] - 0.015


def test_three_bit_gpfq_beats_round_to_nearest(default_runs):
    _, rows = default_runs
    assert rows[("gpfq", 3)]["Quantized Top1 Accuracy"] > rows[("msq", 3)]["Quantized Top1 Accuracy"]


def test_rows_logged_and_models_saved(default_runs):
    out, rows = default_runs
    logged = logged_rows(out / "logs" / "Quantization_Log.csv")
    assert len(logged) == 4
    for line in logged:
        row = rows[(line["Method"], int(line["Bits"]))]
        assert float(line["Quantized Top1 Accuracy"]) == row["Quantized Top1 Accuracy"]
        assert line["Model Name"] == "fashion_resnet" and line["Dataset"] == "fashion_mnist"
        assert int(line["Quantization Batch Size"]) == 512 and line["Include 0"] == "True"
        model_file = Path(line["Model File"])
        record = json.loads(model_file.with_suffix(".json").read_text())
        assert record["results"]["quantized_top1"] == pytest.approx(row["Quantized Top1 Accuracy"], abs=1e-6)
        assert record["hyperparameters"]["bits"] == int(line["Bits"])
        assert len(record["layers"]) == 10  # every Conv2d and Linear of fashion_resnet


def test_depthwise_model_on_real_data(tmp_path):
    """fashion_mobilenet (depthwise convolutions, quantized per group) at 3 bits, GPFQ vs round-to-nearest."""
    rows = run_script("quantization_scripts", "--model", "fashion_mobilenet", "--bits", "3", "--method", "gpfq",
                      "msq", "--batch_size", "256", "--log_dir", str(tmp_path / "logs"), "--model_dir",
                      str(tmp_path / "models"))
    gpfq, msq = rows
    assert gpfq["Original Top1 Accuracy"] > 0.90
    assert gpfq["Quantized Top1 Accuracy"] >= gpfq["Original Top1 Accuracy"] - 0.015  # measured: 91.42 -> 91.04
    assert gpfq["Quantized Top1 Accuracy"] > msq["Quantized Top1 Accuracy"] + 0.03  # measured: 81.56

    model = load_model("fashion_mobilenet")
    depthwise = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}

    def depthwise_errors(row):
        layers = json.loads(Path(row["Model File"]).with_suffix(".json").read_text())["layers"]
        return [layer["relative_error"] for layer in layers if layer["name"] in depthwise]

    gpfq_errors, msq_errors = depthwise_errors(gpfq), depthwise_errors(msq)
    assert len(gpfq_errors) == 5  # one depthwise conv per inverted residual block
    assert sum(gpfq_errors) < sum(msq_errors)
