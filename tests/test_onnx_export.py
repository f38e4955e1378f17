"""ONNX export of the quantized model file, run by ONNX Runtime on the default model: logits, top-1 on the
10k Fashion-MNIST test images, integer initializers, and the file size against the float export."""
import numpy as np
import onnx  # the dev extra installs onnx, onnxscript and onnxruntime: a missing one fails here, it is not skipped
import onnxruntime as ort
import pytest
import torch

import gpfq
from gpfq.io.data import calibration_set, evaluation_set
from gpfq.io.model_file import load_quantized, read_quantized, save_quantized
from gpfq.io.models import load_model
from gpfq.io.onnx_export import OPSET, export_float_onnx, export_onnx, integer_grid
from gpfq.methods.alphabet import channel_alphabets, make_alphabet

INPUT_SHAPE = (1, 28, 28)
# One model that takes every export path: layer i gets MIXED[i % 4] = (alphabet, granularity, bits).
MIXED = [("gpfq2022", "layer", 3), ("strict", "channel", 4), ("midtread", "layer", 4), ("gpfq2022", "channel", 4)]
EXPECTED_KIND = {("gpfq2022", "layer", 3): "gather-uint4", ("strict", "channel", 4): "dequantize-int4",
                 ("midtread", "layer", 4): "dequantize-int8", ("gpfq2022", "channel", 4): "gather-uint8"}


def _quantize(model, calibration, choose):
    """GPFQ (m = 64) with layer i's alphabet, granularity and bits from choose(i) (the default model has 10 layers)."""
    layers = {i: dict(zip(("alphabet", "alphabet_granularity", "bits"), choose(i))) for i in range(10)}
    result = gpfq.quantize(model, calibration, gpfq.QuantConfig(batch_size=64), layers=layers, log=lambda *_: None)
    return result.model, result.reports


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: (torch model loaded from the .safetensors, ONNX path, kinds)} for 'mixed' and 'strict4', and the
    float export's path."""
    folder = tmp_path_factory.mktemp("onnx")
    calibration, model = calibration_set("fashion_mnist"), load_model("fashion_resnet")
    out = {}
    for name, choose in (("mixed", lambda i: MIXED[i % 4]), ("strict4", lambda i: ("strict", "layer", 4))):
        quantized, reports = _quantize(model, calibration, choose)
        save_quantized(quantized, reports, folder / f"{name}.safetensors", model_name="fashion_resnet",
                       input_shape=INPUT_SHAPE)
        kinds = export_onnx(folder / f"{name}.safetensors", folder / f"{name}.onnx")
        out[name] = (load_quantized(folder / f"{name}.safetensors"), folder / f"{name}.onnx", kinds, reports)
    out["float"] = export_float_onnx(model, folder / "float.onnx", INPUT_SHAPE)
    return out


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.slow  # quantizes and exports the default model
def test_every_path_is_taken_and_weights_are_integers(exported):
    model, path, kinds, reports = exported["mixed"]
    assert {name: kind for name, kind in kinds.items()} == {
        f"{r.name}.weight": EXPECTED_KIND[MIXED[r.index % 4]] for r in reports}
    proto = onnx.load(str(path))
    assert any(o.domain in ("", "ai.onnx") and o.version == OPSET for o in proto.opset_import)
    initializers = {i.name: i for i in proto.graph.initializer}
    integer_types = {onnx.TensorProto.INT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT4, onnx.TensorProto.UINT8}
    for key in kinds:
        assert key not in initializers  # the float weight is gone ...
        stored = [i for name, i in initializers.items() if name.startswith(key + "_q_") and i.dims == list(
            model.state_dict()[key].shape)]
        assert len(stored) == 1 and stored[0].data_type in integer_types  # ... stored as integers of its shape
        assert [n.op_type for n in proto.graph.node if key in n.output] in (["DequantizeLinear"], ["Gather"])


@pytest.mark.slow  # quantizes and exports the default model
def test_onnxruntime_logits_match_torch(exported):
    evaluation = evaluation_set("fashion_mnist")
    images = torch.stack([evaluation[i][0] for i in range(256)])
    for name in ("mixed", "strict4"):
        model, path, _, _ = exported[name]
        session = _session(path)
        for batch in (images[:1], images[:64], images):
            with torch.no_grad():
                expected = model(batch).numpy()
            logits = session.run(None, {"images": batch.numpy()})[0]
            # relative to the largest logit: elementwise relative error is meaningless near 0
            assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max(), name


@pytest.mark.slow  # quantizes and exports the default model
def test_onnxruntime_top1_equals_torch_on_the_10k_test_images(exported):
    evaluation = evaluation_set("fashion_mnist")
    model, path, _, _ = exported["mixed"]
    session = _session(path)
    torch_top1, onnx_top1, labels = [], [], []
    loader = torch.utils.data.DataLoader(evaluation, batch_size=500)
    for images, targets in loader:
        with torch.no_grad():
            torch_top1.append(model(images).argmax(1))
        onnx_top1.append(torch.from_numpy(session.run(None, {"images": images.numpy()})[0]).argmax(1))
        labels.append(targets)
    torch_top1, onnx_top1, labels = torch.cat(torch_top1), torch.cat(onnx_top1), torch.cat(labels)
    assert len(labels) == 10_000
    assert torch.equal(onnx_top1, torch_top1)
    assert (torch_top1 == labels).float().mean() > 0.85  # a working model, not a constant one


@pytest.mark.slow  # quantizes and exports the default model
def test_four_bit_uniform_export_is_at_least_four_times_smaller_than_float(exported):
    _, path, kinds, _ = exported["strict4"]
    assert set(kinds.values()) == {"dequantize-int4"}
    assert exported["float"].stat().st_size >= 4 * path.stat().st_size


def test_integer_grid_of_each_alphabet():
    for kind, bits, levels in (("strict", 4, range(-8, 8)), ("midtread", 3, range(-4, 5))):
        k, scale = integer_grid(make_alphabet(kind, bits, 1.3, 0.37).float())
        assert k.tolist() == [list(levels)] and scale.item() == pytest.approx(1.3 * 0.37 / 2 ** (bits - 1))
    # gpfq2022 without 0: levels (j + ½)·step, integers 2j + 1 at half the step
    k, _ = integer_grid(make_alphabet("gpfq2022", 2, 1.0, 1.0, include_zero=False).float())
    assert k.tolist() == [[-3, -1, 1, 3]]
    assert integer_grid(make_alphabet("gpfq2022", 3, 1.0, 1.0).float()) is None  # 0 appended: not a grid
    # per channel, with a channel of radius 0
    k, scale = integer_grid(channel_alphabets("strict", 2, 1.0, torch.tensor([0.5, 0.0, 2.0])).float())
    assert k.tolist() == [[-2, -1, 0, 1], [0, 0, 0, 0], [-2, -1, 0, 1]] and scale.tolist() == [0.25, 1.0, 1.0]
    assert integer_grid(make_alphabet("strict", 9, 1.0, 1.0).float()) is None  # needs more than 8 bits


@pytest.mark.slow  # quantizes and exports the default model
def test_export_needs_an_input_shape(exported, tmp_path):
    model, _, _, reports = exported["strict4"]
    save_quantized(model, reports, tmp_path / "m.safetensors", model_name="fashion_resnet")
    assert read_quantized(tmp_path / "m.safetensors").header["model"]["input_shape"] is None
    with pytest.raises(ValueError, match="does not record the model's input shape"):
        export_onnx(tmp_path / "m.safetensors", tmp_path / "m.onnx")


class TokenModel(torch.nn.Module):
    """Token ids (N, 5) → Embedding → mean → Linear: a model whose input is integers."""

    def __init__(self):
        super().__init__()
        self.embedding, self.fc = torch.nn.Embedding(20, 8), torch.nn.Linear(8, 4)

    def forward(self, ids):
        return self.fc(self.embedding(ids).mean(1))


def test_a_model_of_integer_inputs_exports_with_an_int64_input(tmp_path):
    from gpfq.errors import ExportInputError
    torch.manual_seed(0)
    model, ids = TokenModel().eval(), torch.randint(0, 20, (64, 5))
    result = gpfq.quantize(model, ids, gpfq.QuantConfig(batch_size=64), log=lambda *_: None)
    gpfq.save_quantized(result.model, result, tmp_path / "m.safetensors", input_shape=(5,))
    with pytest.raises(ExportInputError, match=r"^cannot export: the model does not run on a batch of zeros of shape "
                                               r"\(2, 5\) \(float32\): RuntimeError: Expected tensor for argument #1 "
                                               r"'indices'.*input_dtype= sets the input's dtype$"):
        gpfq.export_onnx(tmp_path / "m.safetensors", tmp_path / "f.onnx", architecture=model, input_dtype=torch.float32)
    gpfq.export_onnx(tmp_path / "m.safetensors", tmp_path / "m.onnx", architecture=model)
    assert onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    logits = _session(tmp_path / "m.onnx").run(None, {"images": ids[:3].numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(logits, result.model(ids[:3]).numpy(), rtol=1e-5, atol=1e-6)


def test_a_model_the_exporter_cannot_trace_at_batch_one_exports(tmp_path):
    """torchvision's ConvNeXt block: an example batch of 1 with a dynamic batch axis gave 'Invalid ranges [2:1]'."""
    from torchvision.models.convnext import CNBlock
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4), CNBlock(8, 1e-6, 0.0), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 3)).eval()
    images = torch.randn(64, 3, 16, 16)
    result = gpfq.quantize(model, images, gpfq.QuantConfig(batch_size=64, alphabet="strict"), log=lambda *_: None)
    gpfq.save_quantized(result.model, result, tmp_path / "m.safetensors", input_shape=(3, 16, 16))
    gpfq.export_onnx(tmp_path / "m.safetensors", tmp_path / "m.onnx", architecture=model)
    session = _session(tmp_path / "m.onnx")
    for batch in (images[:1], images[:5]):
        with torch.no_grad():
            expected = result.model(batch).numpy()
        assert np.abs(session.run(None, {"images": batch.numpy()})[0] - expected).max() <= 1e-4 * np.abs(expected).max()


def test_an_existing_export_is_replaced_only_with_overwrite(tmp_path):
    """The README's snippet run twice: FileExistsError saying what to do, and overwrite=True replaces the file."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    result = gpfq.quantize(model, torch.randn(32, 6), gpfq.QuantConfig(batch_size=32), log=lambda *_: None)
    gpfq.save_quantized(result.model, result, tmp_path / "m.safetensors", input_shape=(6,))
    (tmp_path / "m.onnx").write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"m.onnx exists; an export never replaces a file unless overwrite=True$"):
        gpfq.export_onnx(tmp_path / "m.safetensors", tmp_path / "m.onnx", architecture=model)
    assert (tmp_path / "m.onnx").read_bytes() == b"old"
    gpfq.export_onnx(tmp_path / "m.safetensors", tmp_path / "m.onnx", architecture=model, overwrite=True)
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))
    export_float_onnx(model, tmp_path / "f.onnx", (6,))
    export_float_onnx(model, tmp_path / "f.onnx", (6,), overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
