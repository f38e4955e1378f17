"""ONNX export of a quantized model file, with every quantized weight stored as integer codes.

The model is traced by torch's ONNX exporter (without its graph optimizer, which would fold BatchNorm
into the weights and take them off the alphabet); then each quantized weight's float initializer is
replaced by integers and a node that expands them when the model runs:

- a uniform alphabet (levels k·s for integers k, per layer or per output channel: `strict`, `midtread`,
  `gpfq2022` without 0): the integers k as an INT4 (|k| small enough) or INT8 initializer and
  DequantizeLinear(k, s, 0) (opset 21, where INT4 is defined);
- any other alphabet (the paper's `gpfq2022` with 0 appended): the codes as a UINT4/UINT8/UINT16
  initializer, Cast to int32 and Gather from the float codebook (per channel: from the flattened
  (C_out·L,) codebook at code + c·L).

DequantizeLinear computes k·s in float32, which may differ from the stored float32 level by one unit
in the last place; the Gather path reproduces the levels exactly.
"""
import contextlib
import io
from pathlib import Path

import numpy as np
import torch

from gpfq.errors import ExportInputError
from gpfq.io.model_file import QuantizedFileError, model_of, read_quantized
from gpfq.io.storage import _atomic_write, write_new_file
from gpfq.pipeline.inputs import floating_dtype

OPSET = 21  # INT4/UINT4 tensors and per-axis DequantizeLinear of them
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def _onnx():
    try:
        import onnx
    except ImportError as error:
        raise ImportError("ONNX export needs the onnx package: pip install 'gpfq[onnx]' (onnx, onnxruntime, "
                          "onnxscript)") from error
    return onnx


def integer_grid(codebook: torch.Tensor):
    """(K, scale) with float32(K[c, i]·scale[c]) ≈ codebook[c, i] for integers K, or None if the alphabet is not
    a uniform grid through 0 (or needs more than 8 bits of integer).

    codebook: (L,) or (C_out, L). K: int64 (rows, L); scale: float32 (rows,), rows = 1 or C_out. A row whose
    levels are all 0 (a channel of radius 0) gets K = 0, scale 1.
    """
    rows = codebook.double().reshape(-1, codebook.shape[-1])
    n_rows, levels = rows.shape
    grid = torch.zeros(n_rows, levels, dtype=torch.int64)
    scale = torch.ones(n_rows, dtype=torch.float64)
    for r, row in enumerate(rows):
        if bool((row == 0).all()):
            continue
        if levels < 2:
            return None
        step = float(row[-1] - row[0]) / (levels - 1)
        for divisor in (1, 2):  # levels on k·step, or on (k + ½)·step (gpfq2022 without 0)
            s = step / divisor
            k = row / s
            if bool(((k - k.round()).abs() < 1e-3).all()) and bool((k.round().diff() == divisor).all()):
                grid[r], scale[r] = k.round().long(), s
                break
        else:
            return None
    if grid.min() < -128 or grid.max() > 127:
        return None
    scale32 = scale.float()
    rebuilt = (grid.float() * scale32.unsqueeze(1)).double()
    tolerance = 4 * torch.finfo(torch.float32).eps * rows.abs().amax(dim=1, keepdim=True)
    if not bool(((rebuilt - rows).abs() <= tolerance).all()):
        return None
    return grid, scale32


def _pack_nibbles(values: np.ndarray) -> bytes:
    """4-bit values (two's complement for negatives), two per byte, the first in the low nibble (ONNX INT4)."""
    nibbles = (values.reshape(-1).astype(np.int64) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


def _integer_tensor(name: str, values: np.ndarray, low: int, high: int):
    """The smallest ONNX integer initializer (4, 8 or 16 bits) for `values` that holds every integer in
    [low, high] (the alphabet's whole range, not only the values used); signed when low < 0."""
    onnx = _onnx()
    from onnx import TensorProto, helper
    signed = low < 0
    dims = list(values.shape)
    if signed and -8 <= low and high <= 7:
        return helper.make_tensor(name, TensorProto.INT4, dims, _pack_nibbles(values), raw=True)
    if not signed and high <= 15:
        return helper.make_tensor(name, TensorProto.UINT4, dims, _pack_nibbles(values), raw=True)
    dtype = np.int8 if signed else (np.uint8 if high <= 255 else np.uint16)
    return onnx.numpy_helper.from_array(values.astype(dtype), name)


def expansion(key: str, codes: torch.Tensor, codebook: torch.Tensor):
    """(initializers, nodes, kind) that compute the weight `key` (an ONNX value of that name) from its codes.

    kind: 'dequantize-int4', 'dequantize-int8' or 'gather-uint4/8/16', naming the path taken.
    """
    from onnx import TensorProto, helper, numpy_helper
    grid = integer_grid(codebook)
    base = key + "_q"
    if grid is not None:
        k, scale = grid
        rows = codes.reshape(codes.shape[0], -1) if k.shape[0] > 1 else codes.reshape(1, -1)
        integers = k.gather(1, rows).reshape(codes.shape).numpy()
        values = _integer_tensor(base + "_int", integers, min(int(k.min()), -1), int(k.max()))
        per_channel = k.shape[0] > 1
        scale_array = scale.numpy() if per_channel else scale.numpy().reshape(())
        zero = helper.make_tensor(base + "_zero", values.data_type, list(scale_array.shape),
                                  _pack_nibbles(np.zeros(scale_array.shape)) if values.data_type == TensorProto.INT4
                                  else np.zeros(scale_array.shape, np.int8).tobytes(), raw=True)
        node = helper.make_node("DequantizeLinear", [values.name, base + "_scale", zero.name], [key],
                                name=base + "_dequantize", **({"axis": 0} if per_channel else {}))
        kind = "dequantize-int4" if values.data_type == TensorProto.INT4 else "dequantize-int8"
        return [values, numpy_helper.from_array(scale_array, base + "_scale"), zero], [node], kind
    levels = codebook.shape[-1]
    values = _integer_tensor(base + "_codes", codes.numpy(), 0, levels - 1)
    initializers = [values, numpy_helper.from_array(codebook.float().reshape(-1).numpy(), base + "_codebook")]
    nodes = [helper.make_node("Cast", [values.name], [base + "_index"], to=TensorProto.INT32, name=base + "_cast")]
    index = base + "_index"
    if codebook.dim() == 2:  # per channel: row c of the codebook starts at c·L in the flattened codebook
        offsets = (np.arange(codes.shape[0], dtype=np.int32) * levels).reshape((-1,) + (1,) * (codes.dim() - 1))
        initializers.append(numpy_helper.from_array(offsets, base + "_offsets"))
        nodes.append(helper.make_node("Add", [index, base + "_offsets"], [base + "_flat_index"], name=base + "_add"))
        index = base + "_flat_index"
    nodes.append(helper.make_node("Gather", [base + "_codebook", index], [key], axis=0, name=base + "_gather"))
    kinds = {TensorProto.UINT4: "uint4", TensorProto.UINT8: "uint8", TensorProto.UINT16: "uint16"}
    return initializers, nodes, f"gather-{kinds[values.data_type]}"


# a batch of 1 lets the exporter fix the batch axis at 1 in some models (torchvision's ConvNeXt: "Invalid ranges [2:1]")
EXAMPLE_BATCH = 2


def checked_shape(input_shape) -> tuple:
    """input_shape as a tuple of positive integers (one example's shape), or ExportInputError."""
    if not isinstance(input_shape, (list, tuple)) or not input_shape or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in input_shape):
        raise ExportInputError(f"input_shape must be one example's shape without the batch axis, a tuple of positive "
                               f"integers such as (1, 28, 28), got {input_shape!r}")
    return tuple(input_shape)


def example_input(model: torch.nn.Module, input_shape, input_dtype=None) -> torch.Tensor:
    """Zeros (2, *input_shape) that `model` runs on: of `input_dtype`; by default of the model's float dtype, or
    int64 (token ids: an Embedding first) when only that runs. ExportInputError, in one line, when none runs."""
    shape = checked_shape(input_shape)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtypes = [input_dtype] if input_dtype is not None else [floating_dtype(model) or torch.float32, torch.int64]
    failure = None
    for dtype in dtypes:
        example = torch.zeros((EXAMPLE_BATCH, *shape), dtype=dtype, device=device)
        try:
            with torch.no_grad():
                model.eval()(example)
            return example
        except Exception as error:  # the model's own complaint, reported below in one line
            failure = failure or error
    reason = (str(failure).strip().splitlines() or [""])[0][:300]
    hint = f" (input_shape={shape[1:]}?)" if len(shape) > 1 and shape[0] == 1 else ""
    tried = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
    raise ExportInputError(f"cannot export: the model does not run on a batch of zeros of shape "
                           f"{(EXAMPLE_BATCH, *shape)} ({tried}): {type(failure).__name__}: {reason}. input_shape is "
                           f"one example's shape without the batch axis{hint}; input_dtype= sets the input's dtype")


def float_onnx_model(model: torch.nn.Module, input_shape, input_dtype=None):
    """The ONNX model (a ModelProto) of `model` as torch's exporter writes it, with a dynamic batch axis,
    without the exporter's graph optimizer and without per-node metadata (source locations).

    The example input is `example_input`'s (its dtype is the ONNX input's)."""
    torch_input = example_input(model, input_shape, input_dtype)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates its steps
        program = torch.onnx.export(model.eval(), (torch_input,), dynamo=True, optimize=False, opset_version=OPSET,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    proto = program.model_proto
    for node in proto.graph.node:
        del node.metadata_props[:]
    for value in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        del value.metadata_props[:]
    return proto


def write_export(path, data: bytes, overwrite: bool = False) -> Path:
    """Write an export's bytes at `path`: never over an existing file unless `overwrite` (then in one step)."""
    path = Path(path)
    if overwrite:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda f: f.write(data))
        return path
    try:
        write_new_file(path, data)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; an export never replaces a file unless overwrite=True") from None
    return path


def export_float_onnx(model: torch.nn.Module, path, input_shape, *, input_dtype=None, overwrite=False) -> Path:
    """Write `model` as a float ONNX model (as `float_onnx_model`); an existing `path` only with overwrite=True."""
    return write_export(path, float_onnx_model(model, input_shape, input_dtype).SerializeToString(), overwrite)


def export_onnx(model_file, path, *, input_shape=None, architecture=None, input_dtype=None,
                overwrite=False) -> dict:
    """Write the quantized model file `model_file` as an ONNX model at `path`, each quantized weight stored as
    integer codes (see the module docstring). An existing `path` is replaced only with overwrite=True.

    input_shape: one example's shape without the batch axis, e.g. (1, 28, 28); default: the one the file records.
    input_dtype: the input's dtype; default: float, or int64 for a model that runs only on that (token ids).
    architecture: as for `load_quantized`. Returns {weight key: 'dequantize-int4' | … | 'gather-uint8' …}.
    """
    onnx = _onnx()
    quantized = read_quantized(model_file)
    model = model_of(quantized, architecture, model_file)
    input_shape = input_shape or (quantized.header.get("model") or {}).get("input_shape")
    if not input_shape:
        raise QuantizedFileError(f"{model_file} does not record the model's input shape; pass input_shape=")
    proto = float_onnx_model(model, input_shape, input_dtype)
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    kinds, new_nodes = {}, []
    for key, (codes, codebook) in quantized.codes.items():
        if key not in initializers:
            raise RuntimeError(f"the ONNX exporter did not keep {key} as an initializer of that name; cannot store "
                               f"it as codes")
        exported = onnx.numpy_helper.to_array(initializers[key])
        if not np.array_equal(exported, quantized.state_dict[key].numpy()):
            raise RuntimeError(f"the ONNX exporter changed the values of {key}; cannot store it as codes")
        graph.initializer.remove(initializers[key])
        if quantized.header["coded"][key].get("transposed"):  # codes of Wᵀ for a weight W used as x @ W
            added, nodes, kinds[key] = expansion(key + "_t", codes, codebook)
            nodes.append(onnx.helper.make_node("Transpose", [key + "_t"], [key], perm=[1, 0], name=key + "_transpose"))
        else:
            added, nodes, kinds[key] = expansion(key, codes, codebook)
        graph.initializer.extend(added)
        new_nodes.extend(nodes)
    for node in reversed(new_nodes):  # before every use: nodes must be in topological order
        graph.node.insert(0, node)
    onnx.checker.check_model(proto)
    write_export(path, proto.SerializeToString(), overwrite)
    return kinds
