"""The quantized model file: a safetensors file of bit-packed integer codes, codebooks and a JSON header.

Tensors (names are the model's state-dict keys):
    <layer>.weight#codes     uint8, the layer's codes packed at ⌈log2 L⌉ bits (`codes.pack_codes`)
    <layer>.weight#codebook  the layer's alphabet in the weight's dtype, (L,) or (C_out, L) per channel
    every other state-dict entry as it is (biases, BatchNorm, layers left float).
The safetensors metadata holds one key, "gpfq": a JSON header with the format version, the model
(name, input shape, folded BatchNorm), the hyperparameters, one entry per coded weight (shape, dtype,
levels, stored bits, entropy), the per-layer report (without its timings) and a SHA-256 of every tensor's
bytes, so a corrupt file is refused rather than loaded as a silently wrong model. The file holds only what
defines the model: the same quantization gives the same bytes.
"""
import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import torch
from torch import nn

from gpfq.methods.codes import code_entropy, decode, encode, layer_codebook, pack_codes, stored_bits, unpack_codes
from gpfq.io.state_dicts import add_missing_biases
from gpfq.io.storage import write_new_file

FORMAT = "gpfq.quantized"
FORMAT_VERSION = 1
HEADER_KEY = "gpfq"
CODES, CODEBOOK = "#codes", "#codebook"


class QuantizedFileError(ValueError):
    """A quantized model file that cannot be loaded as it is: truncated, corrupt, foreign or mismatched."""


@dataclass
class SizeReport:
    """What a quantized model costs, in bits per quantized weight and in bytes on disk."""
    quantized_weights: int  # weights stored as codes
    levels: str  # the layers' numbers of levels L, e.g. "17" or "9/17"
    stored_bits: float  # ⌈log2 L⌉, averaged over the quantized weights
    entropy: float  # empirical entropy of the codes, averaged over the quantized weights
    file_bytes: int  # the .safetensors file
    float_bytes: int  # the same state dict with every tensor as it is (float weights)

    @property
    def ratio(self) -> float:
        """file_bytes / float_bytes."""
        return self.file_bytes / self.float_bytes if self.float_bytes else float("nan")


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _reports_of(result):
    """The layer reports of a quantization result (anything with .reports) or a list of reports."""
    reports = getattr(result, "reports", result)
    return list(reports or [])


# Report fields left out of the file: the alphabet is stored as the codebook, and timings change from run to run.
REPORT_FIELDS_LEFT_OUT = ("alphabet", "seconds", "rule_seconds")


def _report_dict(report) -> dict:
    if is_dataclass(report):
        values = {f: getattr(report, f) for f in report.__dataclass_fields__ if f not in REPORT_FIELDS_LEFT_OUT}
        return json.loads(json.dumps(values, default=str))
    return {k: v for k, v in dict(report).items() if k not in REPORT_FIELDS_LEFT_OUT}


def coded_layers(model: nn.Module, reports) -> dict:
    """{state-dict key of a quantized weight: (weight, codebook, codes, transposed)} from reports that carry the
    alphabet; an input-major weight (stored (N0, N1)) is coded as its transpose, one row per output channel."""
    layers = {}
    for report in reports:
        alphabet = getattr(report, "alphabet", None)
        if alphabet is None:
            raise ValueError(f"the report of layer {report.name} carries no alphabet, so its weights cannot be "
                             f"stored as codes; pass the reports of the quantization itself")
        key = getattr(report, "parameter", "") or f"{report.name}.weight"  # older reports: a module's weight
        weight = model.get_parameter(key).detach().cpu()
        transposed = getattr(report, "input_major", False)
        if transposed:
            weight = weight.t().contiguous()
        codebook = layer_codebook(alphabet, weight)
        layers[key] = (weight, codebook, encode(weight, codebook, f"layer {report.name}"), transposed)
    return layers


def save_quantized(model: nn.Module, result, path, *, hyperparameters: dict = None, model_name: str = None,
                   input_shape=None, fold_batchnorm: bool = False) -> SizeReport:
    """Write `model`'s quantized weights as packed codes, and everything else as it is, to `path`.

    result: the quantization's result (gpfq.quantize's QuantizedResult: its reports and config) or a list
    of LayerReports; each report carries its layer's alphabet. model_name/input_shape/fold_batchnorm let `load_quantized` rebuild the
    architecture and `export_onnx` trace it; hyperparameters are recorded as they are. The file is
    written completely under a temporary name and then claimed in one step; an existing file is never
    overwritten (FileExistsError). Returns the SizeReport.
    """
    path = Path(path)
    reports = _reports_of(result)
    coded = coded_layers(model, reports)
    config = getattr(result, "config", None)
    if hyperparameters is None and is_dataclass(config):
        hyperparameters = asdict(config)
    tensors, entries, float_bytes = {}, {}, 0
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        float_bytes += value.numel() * value.element_size()
        if key not in coded:
            tensors[key] = value.contiguous()
            continue
        weight, codebook, codes, transposed = coded[key]
        levels = codebook.shape[-1]
        bits = stored_bits(levels)
        tensors[key + CODES] = pack_codes(codes, bits)
        tensors[key + CODEBOOK] = codebook
        entries[key] = {"shape": list(weight.shape), "dtype": _dtype_name(weight.dtype), "levels": levels,
                        "stored_bits": bits, "count": weight.numel(), "entropy": code_entropy(codes, levels),
                        "granularity": "layer" if codebook.dim() == 1 else "channel",
                        "bytes": tensors[key + CODES].numel() + codebook.numel() * codebook.element_size(),
                        "float_bytes": weight.numel() * weight.element_size()}
        if transposed:  # the codes (and "shape") are of the weight's transpose
            entries[key]["transposed"] = True
    header = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "model": {"model_name": model_name, "input_shape": list(input_shape) if input_shape else None,
                        "fold_batchnorm": bool(fold_batchnorm)},
              "hyperparameters": hyperparameters or {}, "coded": entries,
              "layers": [_report_dict(r) for r in reports],
              "sha256": {name: _sha256(t) for name, t in tensors.items()}}
    activations = getattr(result, "activations", None)
    if activations is not None:  # act_bits: the grid of each layer input (gpfq.pipeline.activations), reinstalled on loading
        header["activations"] = activations.as_dict()
    from safetensors.torch import save
    data = save(tensors, metadata={HEADER_KEY: json.dumps(header, default=str)})
    write_new_file(path, data)
    return size_report(entries, path.stat().st_size, float_bytes)


def size_report(entries: dict, file_bytes: int, float_bytes: int) -> SizeReport:
    count = sum(e["count"] for e in entries.values())
    mean = (lambda key: sum(e[key] * e["count"] for e in entries.values()) / count) if count else (lambda key: 0.0)
    levels = "/".join(str(n) for n in sorted({e["levels"] for e in entries.values()}))
    return SizeReport(count, levels, mean("stored_bits"), mean("entropy"), file_bytes, float_bytes)


# ---------------------------------------------------------------- reading
@dataclass
class QuantizedFile:
    """A checked quantized model file: its header, its state dict (coded weights expanded) and the codes."""
    header: dict
    state_dict: dict  # key -> tensor, quantized weights expanded from their codes
    codes: dict  # key of a quantized weight -> (codes (int64, weight shape; its transpose's if "transposed"), codebook)
    file_bytes: int

    def size_report(self) -> SizeReport:
        float_bytes = sum(t.numel() * t.element_size() for t in self.state_dict.values())
        return size_report(self.header["coded"], self.file_bytes, float_bytes)


def read_quantized(path) -> QuantizedFile:
    """Read and check a quantized model file: QuantizedFileError (saying what is wrong) for a truncated,
    corrupt or foreign file, a newer format, a checksum mismatch, or codes outside their alphabet."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quantized model file {path} not found")
    raw = path.read_bytes()
    from safetensors import SafetensorError
    from safetensors.torch import load
    try:
        tensors = load(raw)
        metadata = _metadata(raw)
    except (SafetensorError, ValueError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise QuantizedFileError(f"{path} is not a readable safetensors file; it is truncated or corrupt "
                                 f"({type(error).__name__}: {error})") from None
    if HEADER_KEY not in metadata:
        raise QuantizedFileError(f"{path} is a safetensors file without a GPFQ header: not a quantized model "
                                 f"written by gpfq.save_quantized")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as error:
        raise QuantizedFileError(f"{path}: its GPFQ header is not valid JSON (corrupt file): {error}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise QuantizedFileError(f"{path}: its header is not a {FORMAT} header")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise QuantizedFileError(f"{path} has format version {version!r}; this code reads versions 1 to "
                                 f"{FORMAT_VERSION} (a newer file needs a newer gpfq)")
    checksums = header.get("sha256", {})
    if set(checksums) != set(tensors):
        raise QuantizedFileError(f"{path}: its tensors {sorted(set(tensors) ^ set(checksums))} are missing from "
                                 f"either the file or its header's checksums (corrupt file)")
    for name, tensor in tensors.items():
        if _sha256(tensor) != checksums[name]:
            raise QuantizedFileError(f"{path}: tensor {name!r} does not match its SHA-256 checksum (corrupt file)")
    state, codes = {}, {}
    for key, value in tensors.items():
        if key.endswith(CODEBOOK):
            continue
        if not key.endswith(CODES):
            state[key] = value
            continue
        key = key[: -len(CODES)]
        entry = header["coded"].get(key)
        codebook = tensors.get(key + CODEBOOK)
        if entry is None or codebook is None:
            raise QuantizedFileError(f"{path}: codes of {key!r} without their header entry or codebook")
        state[key], codes[key] = _expand(path, key, entry, value, codebook)
        if entry.get("transposed"):  # codes (N1, N0) of a weight stored (N0, N1)
            state[key] = state[key].t().contiguous()
    return QuantizedFile(header, state, codes, len(raw))


def _metadata(raw: bytes) -> dict:
    """The safetensors metadata ("__metadata__" of the file's JSON header)."""
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length].decode("utf-8")).get("__metadata__") or {}


def _expand(path, key, entry, packed, codebook):
    shape, levels, bits = tuple(entry["shape"]), entry["levels"], entry["stored_bits"]
    if codebook.shape[-1] != levels or bits != stored_bits(levels) or math.prod(shape) != entry["count"]:
        raise QuantizedFileError(f"{path}: {key}'s codebook {tuple(codebook.shape)}, levels {levels}, stored bits "
                                 f"{bits} and shape {shape} disagree")
    if codebook.dim() == 2 and codebook.shape[0] != shape[0]:
        raise QuantizedFileError(f"{path}: {key} has {codebook.shape[0]} per-channel alphabets for {shape[0]} "
                                 f"output channels")
    try:
        flat = unpack_codes(packed, bits, entry["count"])
    except ValueError as error:
        raise QuantizedFileError(f"{path}: {key}: {error}") from None
    if flat.numel() and int(flat.max()) >= levels:
        raise QuantizedFileError(f"{path}: {key} has codes up to {int(flat.max())}, but its alphabet has only "
                                 f"{levels} levels (corrupt file)")
    codes = flat.reshape(shape)
    return decode(codes, codebook), (codes, codebook)


# ---------------------------------------------------------------- loading into a model
def build_architecture(header: dict) -> nn.Module:
    """The float architecture a file's header names (embedded, torchvision or a user factory), folded if it was."""
    from gpfq.io import models
    name = (header.get("model") or {}).get("model_name")
    if not isinstance(name, str):
        raise QuantizedFileError("the file does not name its model; pass the architecture: "
                                 "gpfq.load_quantized(path, architecture=model)")
    try:
        models.check_model_name(name)
    except ValueError as error:
        raise QuantizedFileError(f"{error}; pass the architecture: gpfq.load_quantized(path, architecture=model)"
                                 ) from None
    if models.is_torchvision(name):  # built as for its pretrained weights (GoogLeNet, Inception differ)
        from torchvision import models as tv
        model = tv.get_model(name, weights=None, **models._architecture_kwargs(name))
    else:  # embedded models and user factories
        model = models.load_model(name, "random")
    if header["model"].get("fold_batchnorm"):
        from gpfq.pipeline.folding import fold_batchnorm
        model, _ = fold_batchnorm(model)
    return model.eval()


def load_quantized(path, architecture: nn.Module = None) -> nn.Module:
    """The quantized model of `path`: a copy of `architecture` (default: the one its header names) with the
    file's state dict, every quantized weight expanded from its codes bit for bit.

    Checks the format version, the checksums, codes below L, and every tensor's name and shape against the
    architecture (QuantizedFileError naming them).
    """
    return model_of(read_quantized(path), architecture, path)


def model_of(quantized: QuantizedFile, architecture: nn.Module = None, path="the file") -> nn.Module:
    """`load_quantized` for a file already read."""
    model = build_architecture(quantized.header) if architecture is None else copy.deepcopy(architecture)
    add_missing_biases(model, quantized.state_dict)  # layers that gained a bias (bias correction)
    own = model.state_dict()
    missing = sorted(set(own) - set(quantized.state_dict))
    unexpected = sorted(set(quantized.state_dict) - set(own))
    if missing or unexpected:
        raise QuantizedFileError(f"{path} does not fit the architecture {type(model).__name__}: missing "
                                 f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected "
                                 f"{unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
    wrong = [f"{k}: {tuple(quantized.state_dict[k].shape)} in the file, {tuple(v.shape)} in the model"
             for k, v in own.items() if tuple(quantized.state_dict[k].shape) != tuple(v.shape)]
    if wrong:
        raise QuantizedFileError(f"{path} does not fit the architecture {type(model).__name__}: "
                                 f"{'; '.join(wrong[:5])}")
    model.load_state_dict(quantized.state_dict)
    if quantized.header.get("activations"):
        from gpfq.pipeline.activations import ActivationQuantizers
        ActivationQuantizers.from_dict(quantized.header["activations"]).install(model)
    return model.eval()
