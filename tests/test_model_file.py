"""The quantized model file: codes on the alphabet, bit packing, the safetensors round trip bit for bit,
the size/bits report, and clear errors for corrupt, truncated, foreign or mismatched files."""
import dataclasses
import json
import math

import pytest
import torch

from gpfq.methods.alphabet import make_alphabet
from gpfq.methods.codes import (NotOnAlphabetError, code_entropy, decode, encode, layer_codebook, pack_codes, stored_bits,
                        unpack_codes)
import gpfq
from gpfq.io.model_file import QuantizedFileError, load_quantized, read_quantized, save_quantized
from gpfq.io.models import load_model
from gpfq.methods import METHOD_NAMES
from helpers import saved_alphabets, tensor_sha256



# ---------------------------------------------------------------- codes
def test_stored_bits_is_ceil_log2_levels():
    assert [stored_bits(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 256, 257)] == [0, 1, 2, 2, 3, 3, 4, 4, 5, 8, 9]
    assert all(stored_bits(n) == math.ceil(math.log2(n)) for n in range(2, 600))


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 9])
def test_pack_unpack_round_trip_and_length(bits):
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (1001,), generator=generator)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


def test_pack_bit_order_by_hand():
    # 3-bit codes 5 (101), 3 (011), 7 (111): stream bits (lsb first) 1 0 1 | 1 1 0 | 1 1 1 -> 0b11011101, 0b1
    assert pack_codes(torch.tensor([5, 3, 7]), 3).tolist() == [0b11011101, 0b1]


def test_entropy_against_the_formula():
    codes = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    assert code_entropy(codes, 3) == pytest.approx(float(-(p * p.log2()).sum()), abs=1e-12)
    assert code_entropy(torch.zeros(10, dtype=torch.long), 4) == 0.0
    assert code_entropy(torch.arange(16), 16) == pytest.approx(4.0, abs=1e-12)


def test_encode_per_layer_and_per_channel_decode_exactly():
    alphabet = make_alphabet("gpfq2022", 3, 1.0, 0.7)  # 9 levels
    weight = alphabet.float()[torch.randint(0, 9, (6, 4, 3, 3), generator=torch.Generator().manual_seed(0))]
    codebook = layer_codebook(alphabet, weight)
    codes = encode(weight, codebook)
    assert codes.max() < 9 and torch.equal(decode(codes, codebook), weight)
    per_channel = torch.stack([alphabet * s for s in (0.5, 1.0, 2.0, 0.0, 3.0, 1.5)]).reshape(2, 3, 9)
    codebook = layer_codebook(per_channel, weight)
    assert codebook.shape == (6, 9)
    index = torch.randint(0, 9, (6, 36), generator=torch.Generator().manual_seed(1))
    weight = codebook.gather(1, index).reshape(6, 4, 3, 3)
    codes = encode(weight, codebook)
    assert codes.max() < 9 and torch.equal(decode(codes, codebook), weight)


def test_encode_refuses_a_weight_off_the_alphabet():
    alphabet = make_alphabet("strict", 2, 1.0, 1.0)
    weight = alphabet.float()[torch.tensor([[0, 1], [2, 3]])].clone()
    weight[1, 0] += 1e-3
    with pytest.raises(NotOnAlphabetError, match="1 of 4 weights are not on the layer's alphabet"):
        encode(weight, layer_codebook(alphabet, weight), "fc")


# ---------------------------------------------------------------- round trip on the default model
@pytest.fixture(scope="module")
def fashion():
    from gpfq.io.data import calibration_set
    return calibration_set("fashion_mnist"), load_model("fashion_resnet")


def _quantize(fashion, method="gpfq", alphabet="gpfq2022", granularity="layer", bits=3, m=32, **options):
    calibration, model = fashion
    config = gpfq.QuantConfig(method=method, bits=bits, alphabet=alphabet, alphabet_granularity=granularity,
                              batch_size=m, **options)
    result = gpfq.quantize(model, calibration, config, log=lambda *_: None)
    return result.model, result.reports


CASES = [("gpfq", "gpfq2022", "layer", {}), ("gpfq", "strict", "channel", {}), ("msq", "midtread", "layer", {}),
         ("gptq", "strict", "layer", {}), ("spfq", "gpfq2022", "channel", {}),
         ("sparse_gpfq", "midtread", "channel", {"sparsity_threshold": 0.1}), ("qronos", "gpfq2022", "channel", {})]


@pytest.mark.slow  # quantizes the default model per case
@pytest.mark.parametrize("method, alphabet, granularity, options", CASES)
def test_round_trip_bit_for_bit(fashion, tmp_path, method, alphabet, granularity, options):
    model, reports = _quantize(fashion, method, alphabet, granularity, **options)
    path = tmp_path / "model.safetensors"
    size = save_quantized(model, reports, path, model_name="fashion_resnet", input_shape=(1, 28, 28))
    loaded = load_quantized(path)  # the architecture from the header
    original, again = model.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys()
    for key in original:  # bit for bit, not just equal values
        assert torch.equal(original[key].view(torch.uint8) if original[key].is_floating_point() else original[key],
                           again[key].view(torch.uint8) if again[key].is_floating_point() else again[key]), key
    quantized = read_quantized(path)
    levels = 2 ** 3 if alphabet == "strict" else 2 ** 3 + 1
    for report in reports:
        codes, codebook = quantized.codes[f"{report.name}.weight"]
        assert codebook.shape[-1] == levels == report.levels and int(codes.max()) < levels
        assert report.stored_bits == stored_bits(levels)
        assert report.code_entropy == pytest.approx(code_entropy(codes, levels), abs=1e-12)
        # the codebook is the quantization's own alphabet, in the weight's dtype
        assert torch.equal(codebook, report.alphabet.reshape(codebook.shape).float())
    # the size report against an independent count: packed codes + codebooks + the other tensors + the header
    coded = sum(math.ceil(math.prod(r.weight_shape) * r.stored_bits / 8) + r.alphabet.numel() * 4 for r in reports)
    others = sum(t.numel() * t.element_size() for k, t in original.items()
                 if k not in {f"{r.name}.weight" for r in reports})
    assert coded + others < size.file_bytes < coded + others + 64 * 1024
    assert size.file_bytes == path.stat().st_size
    assert size.float_bytes == sum(t.numel() * t.element_size() for t in original.values())
    assert size.stored_bits == stored_bits(levels) and size.levels == str(levels)
    assert size.ratio < 0.35


@pytest.mark.slow  # quantizes the default model per case
def test_bias_corrected_and_folded_models_round_trip(fashion, tmp_path):
    quantized, reports = _quantize(fashion, "msq", fold_batchnorm=True)  # BatchNorm folded first, then quantized
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in quantized.modules())
    path = tmp_path / "folded.safetensors"
    save_quantized(quantized, reports, path, model_name="fashion_resnet", fold_batchnorm=True)
    loaded = load_quantized(path)
    assert all(torch.equal(a, b) for a, b in zip(quantized.state_dict().values(), loaded.state_dict().values()))
    # a bias that bias correction added to a bias-free layer is restored
    quantized, reports = _quantize(fashion, "msq")
    quantized.stem[0].bias = torch.nn.Parameter(torch.full((16,), 0.25))
    save_quantized(quantized, reports, tmp_path / "bias.safetensors", model_name="fashion_resnet")
    assert torch.equal(load_quantized(tmp_path / "bias.safetensors").stem[0].bias, quantized.stem[0].bias)


# ---------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def saved(fashion, tmp_path_factory):
    model, reports = _quantize(fashion, "msq", bits=4)
    path = tmp_path_factory.mktemp("saved") / "model.safetensors"
    save_quantized(model, reports, path, model_name="fashion_resnet")
    return path, model, reports


def test_never_overwrites(saved):
    path, model, reports = saved
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_quantized(model, reports, path, model_name="fashion_resnet")
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_weight_changed_after_quantization_is_refused(saved, tmp_path):
    _, model, reports = saved
    changed = load_quantized(saved[0])
    with torch.no_grad():
        changed.fc.weight[0, 0] += 0.01
    with pytest.raises(NotOnAlphabetError, match="layer fc"):
        save_quantized(changed, reports, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, 0.999])
def test_truncated_file_is_refused(saved, tmp_path, keep):
    raw = saved[0].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: int(keep * len(raw)) if isinstance(keep, float) else keep])
    with pytest.raises(QuantizedFileError, match="truncated or corrupt"):
        load_quantized(cut)


def _flip(raw: bytes, position: int) -> bytes:
    return raw[:position] + bytes([raw[position] ^ 0x10]) + raw[position + 1:]


def test_corrupt_data_is_refused(saved, tmp_path):
    raw = saved[0].read_bytes()
    header_length = 8 + int.from_bytes(raw[:8], "little")
    bad = tmp_path / "bad.safetensors"
    for position in (header_length + 3, (header_length + len(raw)) // 2, len(raw) - 1):
        bad.write_bytes(_flip(raw, position))
        with pytest.raises(QuantizedFileError, match="checksum"):
            load_quantized(bad)


def _rewrite_header(raw: bytes, change) -> bytes:
    length = int.from_bytes(raw[:8], "little")
    outer = json.loads(raw[8:8 + length])
    inner = json.loads(outer["__metadata__"]["gpfq"])
    change(inner)
    outer["__metadata__"]["gpfq"] = json.dumps(inner)
    text = json.dumps(outer).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + length:]


def test_newer_format_and_foreign_files_are_refused(saved, tmp_path):
    raw = saved[0].read_bytes()
    other = tmp_path / "other.safetensors"
    other.write_bytes(_rewrite_header(raw, lambda h: h.update(format_version=99)))
    with pytest.raises(QuantizedFileError, match="format version 99"):
        load_quantized(other)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(3)}, tmp_path / "plain.safetensors")
    with pytest.raises(QuantizedFileError, match="without a GPFQ header"):
        load_quantized(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_quantized(tmp_path / "missing.safetensors")


def test_codes_beyond_the_alphabet_are_refused(saved, tmp_path):
    # 17 levels at 5 bits: a code of 31 passes the checksum once the header is rewritten to match
    path, _, _ = saved
    from safetensors.torch import load, save
    raw = path.read_bytes()
    tensors = load(raw)
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(json.loads(raw[8:8 + length])["__metadata__"]["gpfq"])
    packed = tensors["fc.weight#codes"].clone()
    packed[0] = 0xFF
    tensors["fc.weight#codes"] = packed
    header["sha256"]["fc.weight#codes"] = tensor_sha256(packed)
    bad = tmp_path / "codes.safetensors"
    bad.write_bytes(save(tensors, metadata={"gpfq": json.dumps(header)}))
    with pytest.raises(QuantizedFileError, match="fc.weight has codes up to 31, but its alphabet has only 17 levels"):
        load_quantized(bad)


def test_wrong_architecture_is_refused(saved):
    with pytest.raises(QuantizedFileError, match="does not fit the architecture FashionMobileNet"):
        load_quantized(saved[0], architecture=load_model("fashion_mobilenet", "random"))
    from gpfq.io.models import FashionResNet
    with pytest.raises(QuantizedFileError, match=r"stem.0.weight: \(16, 1, 3, 3\) in the file, \(8, 1, 3, 3\)"):
        load_quantized(saved[0], architecture=FashionResNet(widths=(8, 32, 64)))


def test_every_method_is_in_the_cases():
    assert {case[0] for case in CASES} == set(METHOD_NAMES)


def test_describe_reports_each_layer(saved, capsys):
    from gpfq.io.describe import main
    path, model, _ = saved
    assert main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    fc = next(line for line in lines if line.startswith("fc.weight")).split()
    # fc: 10×64 weights, 17 levels (4-bit gpfq2022), 5 stored bits: ⌈640·5/8⌉ code bytes + 17 float32 levels
    codes, _ = read_quantized(path).codes["fc.weight"]
    entropy = f"{code_entropy(codes, 17):.3f}"  # from the codes themselves (code_entropy is tested on its formula)
    assert fc[-6:] == ["17", "layer", "5", entropy, str(400 + 17 * 4), str(640 * 4)]
    assert 0 < float(entropy) < 5
    assert main([str(path.parent / "missing.safetensors")]) == 1


@pytest.mark.slow  # quantizes the default model per case
def test_the_public_api_round_trip(fashion, tmp_path):
    import gpfq
    calibration, model = fashion
    images = torch.stack([calibration[i][0] for i in range(64)])
    result = gpfq.quantize(model, images, gpfq.QuantConfig(bits=3, batch_size=32, alphabet="strict"))
    size = gpfq.save_quantized(result.model, result, tmp_path / "api.safetensors", model_name="fashion_resnet")
    loaded = gpfq.load_quantized(tmp_path / "api.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(), loaded.state_dict().values()))
    header = gpfq.read_quantized(tmp_path / "api.safetensors").header
    assert header["hyperparameters"]["alphabet"] == "strict" and header["hyperparameters"]["bits"] == 3
    assert size.levels == "8" and size.stored_bits == 3


class MatmulAndAttention(torch.nn.Module):
    """A weight used as x @ W (stored (N0, N1) = (12, 20): an output per column, as GPT-2's Conv1D), then
    self-attention (in_proj_weight is a parameter, not a module's weight) and a Linear head."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(12, 20) / 12 ** 0.5)
        self.attention = torch.nn.MultiheadAttention(20, 4, batch_first=True)
        self.head = torch.nn.Linear(20, 3)

    def forward(self, x):  # x: (n, 6, 12), six tokens
        tokens = torch.relu(x @ self.embed)
        tokens = tokens + self.attention(tokens, tokens, tokens, need_weights=False)[0]
        return self.head(tokens.mean(1))


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_input_major_and_attention_weights_round_trip_with_their_codebooks(tmp_path, granularity):
    torch.manual_seed(0)
    model = MatmulAndAttention().eval()
    tokens = torch.randn(128, 6, 12, generator=torch.Generator().manual_seed(1))
    config = gpfq.QuantConfig(bits=3, batch_size=64, alphabet_granularity=granularity)
    result = gpfq.quantize(model, tokens, config, log=lambda line: None)
    assert [(r.parameter, r.input_major) for r in result.reports] == [
        ("embed", True), ("attention.in_proj_weight", False), ("attention.out_proj.weight", False),
        ("head.weight", False)]
    path = tmp_path / "model.safetensors"
    gpfq.save_quantized(result.model, result, path, input_shape=(6, 12))
    loaded = gpfq.load_quantized(path, architecture=MatmulAndAttention())
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(), loaded.state_dict().values()))
    assert read_quantized(path).header["coded"]["embed"].get("transposed") is True
    # the codebooks come back for every weight, whatever its parameter name (a saved model's reports carry none)
    bare = [dataclasses.replace(r, alphabet=None) for r in result.reports]
    recovered = saved_alphabets(bare, path)
    for report, original in zip(recovered, result.reports):
        levels = original.alphabet.shape[-1]  # the file holds the codebook in the weight's dtype (float32)
        assert torch.equal(report.alphabet.reshape(-1, levels),
                           original.alphabet.reshape(-1, levels).to(report.alphabet.dtype)), report.parameter


def test_input_major_weight_exports_to_onnx_as_codes(tmp_path):
    """The transposed codes of an x @ W weight become W again in the ONNX graph (a Transpose after the lookup)."""
    import onnxruntime as ort
    from gpfq.io.onnx_export import export_onnx
    torch.manual_seed(0)
    model = MatmulAndAttention().eval()
    tokens = torch.randn(128, 6, 12, generator=torch.Generator().manual_seed(1))
    result = gpfq.quantize(model, tokens, gpfq.QuantConfig(bits=3, batch_size=64, alphabet_granularity="channel"),
                           log=lambda line: None)
    path = tmp_path / "model.safetensors"
    gpfq.save_quantized(result.model, result, path, input_shape=(6, 12))
    kinds = export_onnx(path, tmp_path / "model.onnx", architecture=MatmulAndAttention())
    assert set(kinds) == {"embed", "attention.in_proj_weight", "attention.out_proj.weight", "head.weight"}
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for i in range(4):  # one example at a time (the exporter fixes this model's batch axis at 1)
        with torch.no_grad():
            expected = result.model(tokens[i:i + 1]).numpy()
        (logits,) = session.run(None, {session.get_inputs()[0].name: tokens[i:i + 1].numpy()})
        assert abs(logits - expected).max() < 1e-5
