"""The scripts' deployable output: the .safetensors beside each .pt, the size columns of the log row, the
accuracy round trip, and --export_onnx."""
from pathlib import Path

import pytest
import torch

from gpfq.methods.codes import code_entropy, stored_bits
from gpfq.io.model_file import load_quantized, read_quantized
from gpfq.paths import REPO_ROOT

from helpers import result_columns, run_script, scored

# the size columns of a log row (docs/deploy.md), one per number of the SizeReport
SIZE_COLUMNS = ("Levels", "Stored Bits", "Code Entropy", "Quantized File Bytes", "Size Ratio")


def _path(logged: str) -> Path:
    path = Path(logged)
    return path if path.is_absolute() else REPO_ROOT / path


@pytest.mark.slow  # whole default runs
def test_rows_show_levels_bits_entropy_and_size(default_runs):
    _, rows = default_runs
    for (method, bits), row in rows.items():
        pt, quantized = _path(row["Model File"]), _path(row["Quantized Model File"])
        assert quantized == pt.with_suffix(".safetensors") and quantized.exists()
        # the paper's alphabet at b bits: 2^b + 1 levels, so b + 1 stored bits
        assert row["Levels"] == str(2 ** bits + 1) and row["Stored Bits"] == stored_bits(2 ** bits + 1) == bits + 1
        codes = read_quantized(quantized).codes  # the entropy from the codes themselves, not from the header
        entropies = [(code_entropy(c, codebook.shape[-1]), c.numel()) for c, codebook in codes.values()]
        expected = sum(h * n for h, n in entropies) / sum(n for _, n in entropies)
        assert row["Code Entropy"] == round(expected, 4) and 0 < row["Code Entropy"] < bits + 1
        assert row["Quantized File Bytes"] == quantized.stat().st_size
        assert row["Size Ratio"] == round(quantized.stat().st_size / header_float_bytes(pt), 4)


def header_float_bytes(pt: Path) -> int:
    return sum(t.numel() * t.element_size() for t in torch.load(pt, map_location="cpu", weights_only=True).values())


@pytest.mark.slow  # whole default runs
def test_safetensors_equals_the_pt_bit_for_bit_and_keeps_the_accuracy(default_runs, default_data):
    _, rows = default_runs
    for row in rows.values():
        state = torch.load(_path(row["Model File"]), map_location="cpu", weights_only=True)
        loaded = load_quantized(_path(row["Quantized Model File"])).state_dict()
        assert state.keys() == loaded.keys()
        assert all(torch.equal(state[k].reshape(-1).view(torch.uint8), loaded[k].reshape(-1).view(torch.uint8))
                   for k in state)
    row = rows[("gpfq", 3)]
    _, evaluation, _ = default_data
    loader = torch.utils.data.DataLoader(evaluation, batch_size=256)
    top1, _ = scored(load_quantized(_path(row["Quantized Model File"])), loader)
    assert round(top1, 6) == row["Quantized Top1 Accuracy"]


@pytest.mark.slow  # whole default runs
def test_export_onnx_flag_writes_the_onnx_beside(tmp_path):
    import onnxruntime as ort
    from gpfq.io.data import evaluation_set
    rows = run_script("quantization_scripts", "--bits", "4", "--alphabet", "strict", "--batch_size", "32",
                      "--export_onnx", "--log_dir", str(tmp_path / "logs"), "--model_dir", str(tmp_path / "models"))
    quantized = _path(rows[0]["Quantized Model File"])
    assert rows[0]["Levels"] == "16" and rows[0]["Stored Bits"] == 4
    onnx_path = quantized.with_suffix(".onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    evaluation = evaluation_set("fashion_mnist")
    images = torch.stack([evaluation[i][0] for i in range(64)])
    with torch.no_grad():
        expected = load_quantized(quantized)(images).numpy()
    logits = session.run(None, {"images": images.numpy()})[0]
    assert abs(logits - expected).max() <= 1e-4 * abs(expected).max()


def test_export_onnx_must_be_a_boolean(tmp_path):
    with pytest.raises(ValueError, match="export_onnx must be True or False"):
        run_script("quantization_scripts", "--export_onnx", "yes", "--log_dir", str(tmp_path))


def test_size_columns_are_results():
    assert set(SIZE_COLUMNS) <= result_columns() and "Quantized Model File" in result_columns()
