"""Quantized activations (QuantConfig.act_bits): calibrated grids, X̃ fake-quantized, and the QDQ ONNX export."""
import dataclasses

import pytest
import torch
from torch import nn

import gpfq
from gpfq.methods import METHODS
from gpfq.errors import BadHyperparameterError
from helpers import export_beside_model, refuse_quantization, run_script


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def grid_round(x, low, high, bits=8):
    """Reference fake quantization from the formula: the unsigned grid through 0 over [min(low,0), max(high,0)]."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = float(torch.tensor((high - low) / (2 ** bits - 1), dtype=torch.float32))
    zero = round(-low / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1)
    return (q - zero) * scale, scale


def recording(monkeypatch):
    """Record the (X, X̃) rows handed to the GPFQ rule, layer by layer."""
    seen, method = [], METHODS["gpfq"]

    def recorded(weight, analog, quantized, *alphabet_config_seed):
        seen.append((analog.clone(), quantized.clone()))
        return method.from_rows(weight, analog, quantized, *alphabet_config_seed)
    monkeypatch.setitem(METHODS, "gpfq", dataclasses.replace(method, from_rows=recorded))
    return seen


def test_rows_handed_to_the_rule_are_the_fake_quantized_activations(monkeypatch):
    model = tiny_mlp()
    images = torch.randn(64, 8)
    seen = recording(monkeypatch)
    # a DataLoader is drawn in its own order: every draw (the grids', each layer's) is these 64 images in order
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=64)
    result = gpfq.quantize(model, loader, gpfq.QuantConfig(act_bits=8, batch_size=64, engine="residual"),
                           log=lambda line: None)
    assert len(seen) == 2
    # layer 0: X is the float input, X̃ its rounding onto the grid of the images' range
    analog0, quantized0 = seen[0]
    expected0, scale0 = grid_round(analog0[0], images.min(), images.max())
    assert torch.equal(quantized0[0], expected0)
    assert result.activations.input_grids(result.model)["0"].scale == scale0
    assert not torch.equal(analog0[0], quantized0[0])  # the rounding is visible: the test can fail
    # layer 2: X̃ = the grid rounding of ReLU(Q0 x̂ + b0); its grid comes from the float network's hidden layer
    with torch.no_grad():
        hidden = torch.relu(model[0](images))
    x_hat, _ = grid_round(images, images.min(), images.max())
    hidden_quantized = torch.relu(x_hat @ result.model[0].weight.T + result.model[0].bias)
    expected2, _ = grid_round(hidden_quantized, hidden.min(), hidden.max())
    analog2, quantized2 = seen[1]
    torch.testing.assert_close(quantized2[0], expected2, rtol=0, atol=1e-6)
    assert torch.equal(analog0[0], images)
    torch.testing.assert_close(analog2[0], hidden, rtol=0, atol=1e-6)
    # evaluation runs with the quantizers on: result.model(x) is the integer model's arithmetic
    expected_out = expected2 @ result.model[2].weight.T + result.model[2].bias
    torch.testing.assert_close(result.model(analog0[0]), expected_out, rtol=0, atol=1e-5)


def test_float_activations_install_nothing(monkeypatch):
    model = tiny_mlp()
    images = torch.randn(64, 8)
    seen = recording(monkeypatch)
    result = gpfq.quantize(model, images, gpfq.QuantConfig(batch_size=64, engine="residual"), log=lambda line: None)
    assert result.activations is None
    analog0, quantized0 = seen[0]
    assert torch.equal(analog0, quantized0)  # layer 0: X̃ = X, not rounded
    assert not any(m._forward_pre_hooks for m in result.model.modules()) and "forward" not in vars(result.model)


def test_the_callers_model_keeps_no_quantizer():
    model = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gpfq.quantize(model, torch.randn(64, 8), gpfq.QuantConfig(act_bits=8, batch_size=64), log=lambda line: None)
    assert not any(m._forward_pre_hooks for m in model.modules()) and "forward" not in vars(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", [1, 9, 8.0, "8"])
def test_bad_act_bits_is_refused(bad):
    with pytest.raises(BadHyperparameterError, match="act_bits"):
        gpfq.QuantConfig(act_bits=bad)


def test_act_bits_with_fixed_calibration_is_refused():
    with pytest.raises(BadHyperparameterError, match="fixed"):
        gpfq.QuantConfig(act_bits=8, calibration="fixed")


def test_log_columns():
    assert gpfq.QuantConfig().log_columns()["Act Bits"] is None
    assert gpfq.QuantConfig().log_columns()["Act Calibration"] == ""
    assert gpfq.QuantConfig(act_bits=8).log_columns()["Act Calibration"] == "minmax"


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 3)).eval()


@pytest.mark.parametrize("alphabet", ["gpfq2022", "midtread"])
def test_qdq_export_runs_on_integer_kernels_and_agrees_with_torch(tmp_path, alphabet):
    import numpy as np
    import onnxruntime as ort
    from gpfq.io.qdq_export import export_qdq_onnx, integer_kernels
    images = torch.randn(64, 1, 8, 8)
    result = gpfq.quantize(conv_net(), images, gpfq.QuantConfig(act_bits=8, batch_size=64, alphabet=alphabet),
                           log=lambda line: None)
    with torch.no_grad():
        before = result.model(images)
    path = export_qdq_onnx(result, tmp_path / "model.onnx", (1, 8, 8))
    kernels = integer_kernels(path, tmp_path / "optimized.onnx")
    assert kernels.get("QLinearConv") == 2 and kernels.get("QGemm") == 1, kernels
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        torch_out = result.model(images).numpy()
    # the integer kernels requantize in their own order (and the bias is int32 of scale s_x·s_w): an activation
    # at a rounding boundary may move by one grid step. Measured here: max gap 0.7 % of the largest output.
    gap = np.abs(onnx_out - torch_out)
    assert gap.max() <= 0.03 * np.abs(torch_out).max()
    assert (onnx_out.argmax(1) == torch_out.argmax(1)).mean() >= 0.95
    assert torch.equal(torch.from_numpy(torch_out), before)  # the export leaves the model rounding as it did


def _count_adds(model) -> int:
    """Residual adds of a torchvision-style network, counted from its blocks (independent of the tracer)."""
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from gpfq.io import models as embedded  # the embedded models' own copies of the two blocks
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck, embedded.BasicBlock))]
    inverted = [m for m in model.modules()
                if isinstance(m, (InvertedResidual, embedded.InvertedResidual)) and m.use_res_connect]
    return len(blocks) + len(inverted)


@pytest.mark.parametrize("name, input_shape", [("fashion_resnet", (1, 28, 28)), ("fashion_mobilenet", (1, 28, 28)),
                                               pytest.param("resnet18", (3, 32, 32), marks=pytest.mark.slow),
                                               pytest.param("mobilenet_v2", (3, 32, 32), marks=pytest.mark.slow)])
def test_the_qdq_export_is_fully_integer(tmp_path, name, input_shape):
    """ONNX Runtime's optimized graph: one QLinearConv per conv, one QLinearAdd per residual add, the pool and the
    classifier on integer kernels (QLinearGlobalAveragePool, QGemm), and no float Conv or Gemm left."""
    import onnx
    from gpfq.io.models import load_model
    from gpfq.io.qdq_export import export_qdq_onnx
    model = load_model(name, "DEFAULT" if name == "fashion_resnet" else "random")
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    adds = _count_adds(model)
    config = gpfq.QuantConfig(method="msq", bits=4, alphabet="strict", batch_size=8, act_bits=8, fold_batchnorm=True)
    result = gpfq.quantize(model, torch.randn(8, *input_shape), config, log=lambda line: None)
    assert result.activations.at == "output"
    path = export_qdq_onnx(result, tmp_path / "model.onnx", input_shape)
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == convs and convs > 0, ops
    assert ops.count("QLinearAdd") == adds and adds > 0, ops
    assert ops.count("QGemm") == 1 and ops.count("QLinearGlobalAveragePool") == 1, ops
    assert not {"Conv", "Gemm", "MatMul", "Add", "Clip", "Relu"} & set(ops), ops


class Branchy(nn.Module):
    """A model torch.fx cannot trace: control flow on a value."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        hidden = torch.relu(self.first(x))
        if hidden.sum() > 0:
            hidden = hidden + 1
        return self.second(hidden)


def test_an_untraceable_model_rounds_its_layer_inputs_and_says_so():
    torch.manual_seed(0)
    lines = []
    result = gpfq.quantize(Branchy().eval(), torch.randn(64, 8), gpfq.QuantConfig(act_bits=8, batch_size=64),
                           log=lines.append)
    assert result.activations.at == "input" and set(result.activations.scales) == {"first", "second"}
    assert any("torch.fx cannot trace this model" in line for line in lines)
    x = torch.randn(5, 8)
    with torch.no_grad():
        rounded = result.model(x)
        result.activations.remove()
        assert not torch.equal(result.model(x), rounded)


def test_gpfq2022_levels_map_exactly_onto_int8():
    from gpfq.methods.alphabet import make_alphabet
    from gpfq.io.qdq_export import int8_levels
    levels = make_alphabet("gpfq2022", 4, 1.3, 0.7, True)
    grid, scale = int8_levels(levels)
    assert set(grid.abs().unique().tolist()) == {0, 1, 3, 5, 7, 9, 11, 13, 15}  # odd steps of s/2, and 0
    torch.testing.assert_close(grid[0].float() * scale, levels.float(), rtol=0, atol=4 * torch.finfo(torch.float32).eps)


def test_the_model_file_carries_the_activation_grids(tmp_path):
    images = torch.randn(64, 1, 8, 8)
    result = gpfq.quantize(conv_net(), images, gpfq.QuantConfig(act_bits=8, batch_size=64), log=lambda line: None)
    gpfq.save_quantized(result.model, result, tmp_path / "model.safetensors")
    loaded = gpfq.load_quantized(tmp_path / "model.safetensors", architecture=conv_net())
    with torch.no_grad():
        assert torch.equal(loaded(images), result.model(images))  # the loaded model rounds its inputs the same way
        result.activations.remove()
        assert not torch.equal(loaded(images), result.model(images))  # and that rounding is visible


def test_gradients_pass_the_quantizers_straight_through():
    """Retraining after a layer (in_place) trains through the rounding: d(x̂)/dx = 1, not round's 0."""
    result = gpfq.quantize(tiny_mlp(), torch.randn(64, 8), gpfq.QuantConfig(act_bits=8, batch_size=64),
                           log=lambda line: None)
    x = torch.randn(5, 8, requires_grad=True)
    result.model(x).sum().backward()
    hidden = torch.relu(result.model[0](x)) > 0  # the ReLU's mask, what the float gradient goes through
    expected = (hidden.float() * result.model[2].weight.sum(dim=0)) @ result.model[0].weight
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


def test_int8_deployment_refuses_weights_beyond_int8_before_quantizing(tmp_path, monkeypatch):
    """act_bits 8 is an int8 (QDQ) deployment: 8-bit gpfq2022 levels need ±255, so they are refused up front."""
    with pytest.raises(BadHyperparameterError, match=r"8-bit gpfq2022 weights .*±255.*use alphabet 'strict', or at "
                                                     r"most 7 bits"):
        gpfq.QuantConfig(act_bits=8, bits=8)
    with pytest.raises(BadHyperparameterError, match="9-bit weights cannot be exported"):
        gpfq.QuantConfig(act_bits=8, bits=9, alphabet="strict")
    for fine in (dict(bits=8, alphabet="strict"), dict(bits=7), dict(bits=8, act_bits=4), dict(bits=8, act_bits=None)):
        gpfq.QuantConfig(**{"act_bits": 8, **fine})
    from gpfq.io.qdq_export import int8_levels
    from gpfq.methods.alphabet import make_alphabet
    assert int8_levels(make_alphabet("gpfq2022", 7, 1.3, 0.7)) is not None  # what the message offers exports

    refuse_quantization(monkeypatch)
    with pytest.raises(BadHyperparameterError, match="at most 7 bits"):  # a per-layer choice too
        gpfq.quantize(tiny_mlp(), torch.randn(64, 8), gpfq.QuantConfig(act_bits=8, batch_size=64), layers={0: 8},
                      log=lambda line: None)
    with pytest.raises(BadHyperparameterError, match="at most 7 bits"):  # the scripts: one line, exit status 2
        run_script("quantization_scripts", "--act_bits", "8", "--bits", "8", "--log_dir", str(tmp_path / "logs"),
                   "--model_dir", str(tmp_path / "models"))
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def test_qdq_export_takes_a_model_file_and_checks_the_input_shape(tmp_path):
    """The scripts save a .safetensors: that is what a script user exports. A shape with the batch axis is one line."""
    import onnx
    from gpfq.errors import ExportInputError
    images = torch.randn(64, 1, 8, 8)
    result = gpfq.quantize(conv_net(), images, gpfq.QuantConfig(act_bits=8, batch_size=64), log=lambda line: None)
    with pytest.raises(ExportInputError, match=r"does not run on a batch of zeros of shape \(2, 1, 1, 8, 8\).*one "
                                               r"example's shape without the batch axis \(input_shape=\(1, 8, 8\)\?\)"):
        gpfq.export_qdq_onnx(result, tmp_path / "batch.onnx", (1, 1, 8, 8))
    with pytest.raises(ExportInputError, match="input_shape must be one example's shape"):
        gpfq.export_qdq_onnx(result, tmp_path / "bad.onnx", "1x8x8")
    assert not list(tmp_path.iterdir())
    gpfq.save_quantized(result.model, result, tmp_path / "model.safetensors", input_shape=(1, 8, 8))
    from_file = gpfq.export_qdq_onnx(str(tmp_path / "model.safetensors"), tmp_path / "file.onnx", architecture=conv_net())
    from_result = gpfq.export_qdq_onnx(result, tmp_path / "result.onnx", (1, 8, 8))
    assert onnx.load(str(from_file)).graph == onnx.load(str(from_result)).graph
    float_result = gpfq.quantize(conv_net(), images, gpfq.QuantConfig(batch_size=64), log=lambda line: None)
    gpfq.save_quantized(float_result.model, float_result, tmp_path / "float.safetensors", input_shape=(1, 8, 8))
    with pytest.raises(ExportInputError, match="holds float activations; a QDQ export needs a model quantized with "
                                               "act_bits=8"):
        gpfq.export_qdq_onnx(tmp_path / "float.safetensors", tmp_path / "float.onnx", architecture=conv_net())


def test_the_scripts_export_of_an_act_bits_run_writes_the_qdq_graph_too(tmp_path):
    """--export_onnx on an --act_bits 8 run: <stem>.onnx (weights as codes) and <stem>.int8.onnx (int8 kernels)."""
    (tmp_path / "net.py").write_text("from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Conv2d(1, 8, 3), "
                                     "nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))\n")
    result = gpfq.quantize(conv_net(), torch.randn(64, 1, 8, 8), gpfq.QuantConfig(act_bits=8, batch_size=64),
                           log=lambda line: None)
    gpfq.save_quantized(result.model, result, tmp_path / "m.safetensors", model_name=f"{tmp_path / 'net.py'}:build",
                        input_shape=(1, 8, 8))
    lines = []
    assert export_beside_model(tmp_path / "m.safetensors", lines.append) == tmp_path / "m.onnx"
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "m.int8.onnx").is_file(), lines
    assert lines[-1].startswith(f"saved {tmp_path / 'm.int8.onnx'}: ") and lines[-1].endswith(
        " bytes (int8 weights, uint8 activations); ONNX Runtime's integer kernels: 1 QGemm, 2 QLinearConv; "
        "float ops: none")


@pytest.mark.slow  # the variants' runs on the default model, each exported
@pytest.mark.parametrize("folder, extra", [
    ("adhoc_quantization_scripts", ["--bias_correction", "last"]),
    ("retraining_scripts", ["--retrain_start", "9", "--retrain_samples", "256"])])
def test_act_bits_runs_end_to_end_in_the_variants_and_exports_int8(tmp_path, folder, extra):
    """--act_bits 8 --export_qdq True in the ad hoc and retraining scripts: a row, and <stem>.int8.onnx on integer
    kernels only (every conv a QLinearConv, nothing left float)."""
    lines = []
    argv = ["--batch_size", "64", "--num_threads", "1", "--eval_subset", "100", "--act_bits", "8", "--fold_batchnorm",
            "True", "--export_qdq", "True", "--log_dir", str(tmp_path / "logs"), "--model_dir", str(tmp_path / "models"),
            *extra]
    import tqdm
    real_write = tqdm.tqdm.write
    tqdm.tqdm.write = staticmethod(lambda line, *a, **k: lines.append(str(line)))
    try:
        [row] = run_script(folder, *argv)
    finally:
        tqdm.tqdm.write = real_write
    assert row["Act Bits"] == 8
    [exported] = list((tmp_path / "models").rglob("*.int8.onnx"))
    [said] = [line for line in lines if line.startswith(f"saved {exported}")]
    assert said.endswith("float ops: none") and "9 QLinearConv" in said and "3 QLinearAdd" in said, said


def test_export_qdq_without_act_bits_is_one_line_before_any_work(tmp_path):
    import subprocess
    import sys
    from conftest import python_env
    from gpfq.paths import REPO_ROOT
    done = subprocess.run([sys.executable, str(REPO_ROOT / "quantization_scripts" / "quantize.py"), "--export_qdq",
                           "True", "--log_dir", str(tmp_path / "logs"), "--model_dir", str(tmp_path / "models")],
                          capture_output=True, text=True, env=python_env(), timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: bad hyperparameter: export_qdq writes the integer model, which needs quantized activations: add "
        "--act_bits 8 (act_bits is None)")


def test_unfolded_batchnorm_is_warned_and_its_convs_are_named_float(tmp_path):
    """act_bits without fold_batchnorm: one warning at quantization, and the export's report lists the float convs."""
    from gpfq.io.models import load_model
    from gpfq.io.qdq_export import export_qdq_onnx, kernel_report
    lines = []
    result = gpfq.quantize(load_model("fashion_resnet"), torch.randn(16, 1, 28, 28),
                           gpfq.QuantConfig(method="msq", batch_size=16, act_bits=8), log=lines.append)
    assert [line for line in lines if line.startswith("WARNING: act_bits with 9 BatchNorm layers not folded")]
    report = kernel_report(export_qdq_onnx(result, tmp_path / "m.onnx", (1, 28, 28)))
    assert "float ops: 9 BatchNormalization, 9 Conv" in report, report


@pytest.mark.slow  # the default model quantized at m 128, then 10,000 test images through torch and ONNX Runtime
def test_the_int8_model_has_the_torch_models_accuracy_on_the_test_set(tmp_path):
    """The deployed accuracy: ONNX Runtime's int8 model of a W4A8 GPFQ run, on the 10,000 test images, within 0.1
    point of the torch fake-quant model's top-1 that the row logged."""
    import importlib.util
    from gpfq.io.data import evaluation_set
    from gpfq.paths import REPO_ROOT
    [row] = run_script("quantization_scripts", "--batch_size", "128", "--act_bits", "8", "--fold_batchnorm", "True",
                       "--export_qdq", "True", "--log_dir", str(tmp_path / "logs"),
                       "--model_dir", str(tmp_path / "models"))
    [exported] = list((tmp_path / "models").rglob("*.int8.onnx"))
    spec = importlib.util.spec_from_file_location("int8_accuracy", REPO_ROOT / "experiments" / "int8_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    deployed = module.ort_top1(exported, evaluation_set("fashion_mnist"))
    assert row["Eval Subset"] in ("", None) and row["Quantized Top1 Accuracy"] > 0.85
    assert abs(deployed - row["Quantized Top1 Accuracy"]) <= 0.001, (deployed, row["Quantized Top1 Accuracy"])


def test_an_8_bit_strict_model_file_exports_its_codes_exactly(tmp_path):
    """A model file stores its codebooks in float32, whose gaps differ from the step by float32 rounding: the int8
    step is fitted to all the levels, so 8-bit `strict` weights (k·s, k from −128 to 127) still map exactly."""
    import onnx
    from onnx import numpy_helper
    images = torch.randn(64, 1, 8, 8)
    result = gpfq.quantize(conv_net(), images, gpfq.QuantConfig(act_bits=8, bits=8, alphabet="strict", batch_size=64),
                           log=lambda line: None)
    gpfq.save_quantized(result.model, result, tmp_path / "m.safetensors")
    path = gpfq.export_qdq_onnx(tmp_path / "m.safetensors", tmp_path / "m.onnx", (1, 8, 8), architecture=conv_net())
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    integers, scale = initializers["0_weight_int8"], initializers["0_weight_scale"]
    assert integers.min() >= -128 and integers.max() <= 127 and len(set(integers.flatten().tolist())) > 40
    rebuilt = torch.from_numpy(integers.astype("float64") * scale.astype("float64").reshape(-1, 1, 1, 1))
    torch.testing.assert_close(rebuilt.float(), result.model[0].weight.detach(), rtol=0, atol=2e-6)


def test_weights_beyond_64_warn_on_a_cpu_without_vnni(tmp_path):
    """ONNX Runtime's u8s8 kernels without VNNI saturate 16-bit pair sums for |k| > 64: 8-bit weights are warned
    about there (with the fix), 7-bit ones are not."""
    import warnings
    from gpfq.io.qdq_export import export_qdq_onnx, vnni
    images = torch.randn(64, 1, 8, 8)
    for bits, expected in ((8, not vnni()), (7, False)):
        result = gpfq.quantize(conv_net(), images, gpfq.QuantConfig(act_bits=8, bits=bits, alphabet="strict",
                                                                    batch_size=64), log=lambda line: None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_qdq_onnx(result, tmp_path / f"w{bits}.onnx", (1, 8, 8))
        said = [str(w.message) for w in caught if "VNNI" in str(w.message)]
        assert bool(said) == expected, (bits, said)
        assert all("use at most 7-bit weights" in line for line in said)
