"""ONNX export of a model quantized with `act_bits` as a standard QDQ graph, which ONNX Runtime runs on integer kernels.

For each quantized Linear/Conv layer with an activation grid (gpfq.pipeline.activations):
- its input goes through QuantizeLinear → DequantizeLinear (uint8 with the calibrated scale and zero point);
- its weight is an INT8 initializer k with DequantizeLinear(k, s) (per output channel: axis 0), where k·s are the
  layer's levels: every alphabet the project builds is a grid through 0 of step s or s/2 (`int8_levels`);
- its bias is INT32 with scale s_x·s (what QLinearConv takes; a rounding of at most s_x·s/2 per output).

ONNX Runtime's graph optimizer (level EXTENDED or ALL) then fuses DQ → Conv → Q into QLinearConv and
DQ → Gemm into QGemm where the pattern allows: a Conv needs its output quantized too, which holds where it feeds
(through a ReLU) the next quantized layer, so fold BatchNorm (`fold_batchnorm=True`) for a deployable model;
a Conv whose output goes to a BatchNorm or a residual add stays a float Conv on dequantized inputs.
"""
import warnings
from pathlib import Path

import numpy as np
import torch

import torch.ao.quantization.fx._decomposed  # noqa: F401 (quantize ops the ONNX exporter must see registered)

from gpfq.errors import ExportInputError
from gpfq.io.onnx_export import checked_shape, float_onnx_model, write_export


def int8_levels(codebook: torch.Tensor):
    """(K, scale): integers K (rows, L), |K| ≤ 128, and float32 scales (rows,) with K·scale = the levels, or None.

    codebook: (L,) or (…, C_out, L). The step tried is the smallest gap between levels, then half of it, each
    refitted to all the levels:
    `midtread`/`strict` levels are k·s; `gpfq2022` levels are (k + ½)·s, with 0 appended: on the grid of step s/2
    (odd integers and 0), so that mapping is exact too (to float32 rounding of k·scale).
    """
    # the float32 levels, as the weights hold them and a model file stores them: the same scales either way
    rows = codebook.float().double().reshape(-1, codebook.shape[-1])
    grid = torch.zeros(rows.shape, dtype=torch.int64)
    scale = torch.ones(rows.shape[0], dtype=torch.float64)
    for r, row in enumerate(rows):
        levels = row.unique()
        if bool((levels == 0).all()):
            continue
        gaps = levels.diff()
        step = float(gaps[gaps > 0].min()) if gaps.numel() else float(levels.abs().max())
        for s in (step, step / 2):
            k = (row / s).round()
            # fit the step to all levels (least squares): a float32 codebook's smallest gap is off by its rounding,
            # which at 8 bits moves the top level by 1e-3 of a step
            s = float((k * row).sum() / (k * k).sum())
            k = row / s
            # up to 128: midtread's top level; the weights actually used are checked against int8 on export
            if bool(((k - k.round()).abs() < 1e-3).all()) and float(k.abs().max()) <= 128.5:
                grid[r], scale[r] = k.round().long(), s
                break
        else:
            return None
    return grid, scale.float()


def _weight_integers(weight: torch.Tensor, codebook: torch.Tensor, key: str):
    """(int8 array of weight's shape, float32 scales (C_out,)): weight = ints · scale per output channel."""
    found = int8_levels(codebook)
    if found is None:
        raise ExportInputError(f"{key}: its alphabet is not on an int8 grid through 0; cannot export it as QDQ")
    _, scale = found
    scale = scale.expand(weight.shape[0]) if scale.numel() == 1 else scale.reshape(weight.shape[0])
    shape = (-1,) + (1,) * (weight.dim() - 1)
    integers = torch.round(weight.double() / scale.double().reshape(shape))
    rebuilt = integers * scale.double().reshape(shape)
    tolerance = 4 * torch.finfo(torch.float32).eps * float(weight.abs().max() + 1e-30)
    on_grid = bool(((rebuilt - weight.double()).abs() <= tolerance).all())
    if not on_grid or float(integers.min()) < -128 or float(integers.max()) > 127:
        raise ExportInputError(f"{key}: its weights are not on an int8 grid of its alphabet (8-bit `midtread` has the "
                         f"level +128·s: use `strict`, the signed 8-bit grid)")
    return integers.to(torch.int8).numpy(), scale.numpy().astype(np.float32)


def _model_file_parts(model_file, architecture):
    """(model, activation quantizers installed on it, {weight key: codebook}, recorded input shape) of a model file."""
    import dataclasses
    from gpfq.io.model_file import model_of, read_quantized
    from gpfq.pipeline.activations import ActivationQuantizers
    quantized = read_quantized(model_file)
    entries = quantized.header.get("activations")
    if not entries:
        raise ExportInputError(f"{model_file} holds float activations; a QDQ export needs a model quantized with "
                               f"act_bits=8 (scripts: --act_bits 8); export it with gpfq.export_onnx instead")
    bare = dataclasses.replace(quantized, header={k: v for k, v in quantized.header.items() if k != "activations"})
    model = model_of(bare, architecture, model_file)
    activations = ActivationQuantizers.from_dict(entries).install(model)
    alphabets = {key: codebook for key, (_, codebook) in quantized.codes.items()}
    return model, activations, alphabets, (quantized.header.get("model") or {}).get("input_shape")


def qdq_onnx_model(result, input_shape=None, *, architecture=None):
    """The QDQ ONNX model (ModelProto) of `result`, inputs (N, *input_shape).

    result: gpfq.quantize's result with act_bits=8, or the path of its model file (`save_quantized`; the scripts'
    .safetensors of an --act_bits 8 run). input_shape: one example's shape without the batch axis, e.g.
    (3, 32, 32); default for a file: the one it records. architecture: for a file, as for `load_quantized`.
    """
    from onnx import TensorProto, helper, numpy_helper
    if isinstance(result, (str, Path)):
        model, activations, alphabets, recorded = _model_file_parts(result, architecture)
        input_shape = input_shape or recorded
        if not input_shape:
            raise ExportInputError(f"{result} does not record the model's input shape; pass input_shape=")
    else:
        if not hasattr(result, "activations"):
            raise ExportInputError(f"export_qdq_onnx takes gpfq.quantize's result or the path of a quantized model "
                                   f"file, got {type(result).__name__}")
        if input_shape is None:
            raise ExportInputError("export_qdq_onnx needs input_shape, one example's shape without the batch axis, "
                                   "e.g. (3, 32, 32)")
        model, activations = result.model, result.activations
        alphabets = {report.parameter: report.alphabet for report in result.reports}
    checked_shape(input_shape)
    if activations is None:
        raise ExportInputError("a QDQ export needs quantized activations: quantize with QuantConfig(act_bits=8)")
    if any(grid.bits != 8 for grid in activations.scales.values()):
        raise ExportInputError("a QDQ export takes 8-bit activations (uint8): quantize with act_bits=8")
    if activations.at == "output":  # the rounding nodes are in the traced graph: the exporter writes them as Q/DQ
        proto = float_onnx_model(activations.rounded_graph(model), input_shape)
    else:
        activations.remove()  # the exporter traces the float ops; the layer-input grids become Q/DQ nodes below
        try:
            proto = float_onnx_model(model, input_shape)
        finally:
            activations.install(model)
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, position))
    added, inserted = [], []
    for module_name, grid in activations.input_grids(model).items():
        key = f"{module_name}.weight" if module_name else "weight"
        if key not in alphabets or key not in initializers:
            continue
        users = [(node, position) for node, position in consumers.get(key, []) if node.op_type in ("Conv", "Gemm")]
        if len(users) != 1 or users[0][1] != 1 or (users[0][0].op_type == "Gemm" and not _trans_b(users[0][0])):
            continue  # a weight the exporter used otherwise: left float
        node = users[0][0]
        weight = torch.from_numpy(numpy_helper.to_array(initializers[key]).copy())
        integers, weight_scale = _weight_integers(weight, alphabets[key], key)
        base = key.replace(".", "_")
        graph.initializer.remove(initializers[key])
        added += [numpy_helper.from_array(integers, base + "_int8"),
                  numpy_helper.from_array(weight_scale, base + "_scale"),
                  numpy_helper.from_array(np.zeros(weight_scale.shape, np.int8), base + "_zero")]
        inserted.append(helper.make_node("DequantizeLinear", [base + "_int8", base + "_scale", base + "_zero"], [key],
                                         name=base + "_dequantize", axis=0))
        if activations.at == "input":
            x_scale, x_zero = base + "_x_scale", base + "_x_zero"
            added += [numpy_helper.from_array(np.array(grid.scale, np.float32), x_scale),
                      numpy_helper.from_array(np.array(grid.zero_point, np.uint8), x_zero)]
            inserted.append(helper.make_node("QuantizeLinear", [node.input[0], x_scale, x_zero], [base + "_x_q"],
                                             name=base + "_quantize_x"))
            inserted.append(helper.make_node("DequantizeLinear", [base + "_x_q", x_scale, x_zero], [base + "_x_dq"],
                                             name=base + "_dequantize_x"))
            node.input[0] = base + "_x_dq"
        if len(node.input) > 2 and node.input[2] in initializers:
            bias_key = node.input[2]
            bias = numpy_helper.to_array(initializers[bias_key]).astype(np.float64)
            bias_scale = (np.float32(grid.scale) * weight_scale).astype(np.float32)
            graph.initializer.remove(initializers[bias_key])
            bias_base = bias_key.replace(".", "_")
            added += [numpy_helper.from_array(np.round(bias / bias_scale).astype(np.int32), bias_base + "_int32"),
                      numpy_helper.from_array(bias_scale, bias_base + "_scale"),
                      numpy_helper.from_array(np.zeros(bias_scale.shape, np.int32), bias_base + "_zero")]
            inserted.append(helper.make_node("DequantizeLinear", [bias_base + "_int32", bias_base + "_scale",
                                                                  bias_base + "_zero"], [bias_base + "_dq"],
                                             name=bias_base + "_dequantize", axis=0))
            node.input[2] = bias_base + "_dq"
    graph.initializer.extend(added)
    _insert_in_order(graph, inserted)
    _fold_constant_casts(graph)
    _global_average_pools(graph)
    import onnx
    onnx.checker.check_model(proto)
    return proto


def _fold_constant_casts(graph) -> None:
    """CastLike(Constant c, x) of a float graph becomes the float32 initializer c: ONNX Runtime reads a Clip's bounds
    (ReLU6) only from initializers, and folds the Clip into the QuantizeLinear after it only then."""
    from onnx import numpy_helper
    constants = {node.output[0]: node for node in graph.node if node.op_type == "Constant"}
    for node in list(graph.node):
        if node.op_type != "CastLike" or node.input[0] not in constants:
            continue
        attribute = constants[node.input[0]].attribute[0]
        if attribute.name == "value_float":
            value = np.array(attribute.f, np.float32)
        elif attribute.name == "value" and attribute.t.data_type == 1:  # a float32 tensor
            value = numpy_helper.to_array(attribute.t)
        else:
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        graph.node.remove(node)


def _global_average_pools(graph) -> None:
    """ReduceMean of (N, C, H, W) to (N, C, 1, 1), what the exporter writes for adaptive_avg_pool2d(x, 1), becomes
    GlobalAveragePool, which ONNX Runtime runs on uint8 (QLinearGlobalAveragePool)."""
    from onnx import helper
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    for position, node in enumerate(list(graph.node)):
        if node.op_type != "ReduceMean" or any(a.name == "keepdims" and a.i == 0 for a in node.attribute):
            continue
        source, target = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not source or not target or len(source) != 4 or len(target) != 4:
            continue
        if target[:2] == source[:2] and target[2:] == [1, 1]:
            graph.node.remove(node)
            graph.node.insert(position, helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output),
                                                         name=node.name or node.output[0]))


def _trans_b(node) -> bool:
    return any(a.name == "transB" and a.i == 1 for a in node.attribute)


def _insert_in_order(graph, inserted):
    """Put each new node just before the first node that reads its output (nodes stay in topological order)."""
    nodes = list(graph.node)
    produced = {out for node in inserted for out in node.output}
    ordered, pending = [], list(inserted)
    by_output = {out: node for node in inserted for out in node.output}
    placed = set()

    def place(node):
        if id(node) in placed:
            return
        for name in node.input:
            if name in by_output:
                place(by_output[name])
        placed.add(id(node))
        ordered.append(node)
    for node in nodes:
        for name in node.input:
            if name in produced:
                place(by_output[name])
        ordered.append(node)
    ordered.extend(node for node in pending if id(node) not in placed)
    del graph.node[:]
    graph.node.extend(ordered)


def export_qdq_onnx(result, path, input_shape=None, *, architecture=None, overwrite=False) -> Path:
    """Write the QDQ ONNX model (`qdq_onnx_model`) of `result` (gpfq.quantize's, or a model file's path) at `path`;
    an existing `path` is replaced only with overwrite=True. Warns (`saturation_warning`) when this CPU's integer
    kernels would saturate on the weights."""
    proto = qdq_onnx_model(result, input_shape, architecture=architecture)
    warning = saturation_warning(proto)
    if warning:
        warnings.warn(warning, stacklevel=2)
    return write_export(path, proto.SerializeToString(), overwrite)


# On x86 without VNNI, ONNX Runtime's u8s8 kernels add pairs of uint8 × int8 products in 16 bits (vpmaddubsw):
# 2 · 255 · |k| overflows 32767 once a weight integer |k| exceeds 64, so 8-bit weights can saturate there.
SATURATION_FREE = 64


def vnni() -> bool:
    """Whether this CPU has VNNI (AVX-512 VNNI or AVX-VNNI: 32-bit sums of u8·s8 products, no saturation)."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return True  # unknown (not Linux): no claim
    return bool({"avx512_vnni", "avx_vnni"} & flags) or not ({"avx2", "avx512f"} & flags)


def saturation_warning(proto):
    """A warning when the model's int8 weights exceed ±64 and this x86 CPU lacks VNNI, else None."""
    from onnx import numpy_helper
    largest = max((int(np.abs(numpy_helper.to_array(init).astype(np.int16)).max()) for init in proto.graph.initializer
                   if init.name.endswith("_int8")), default=0)
    if largest <= SATURATION_FREE or vnni():
        return None
    return (f"WARNING: int8 weights up to ±{largest}: this CPU has no VNNI, and ONNX Runtime's uint8 × int8 kernels "
            f"then add pairs of products in 16 bits, which saturate for weights beyond ±{SATURATION_FREE} (measured on "
            f"the default model: W8A8 top-1 3-5 points below the torch model, W7A8 and W4A8 within 0.05); use at most "
            f"7-bit weights (bits ≤ 7) to deploy on this CPU, or a CPU with VNNI")


def integer_kernels(path, optimized_path, level: str = "extended") -> dict:
    """{op type: count} of the integer ops in the graph ONNX Runtime makes of the model at `path` (saved at
    `optimized_path`): QLinearConv, QLinearMatMul, QGemm, ConvInteger, MatMulInteger, MatMulIntegerToFloat."""
    import onnx
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    options.optimized_model_filepath = str(optimized_path)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = {}
    for node in onnx.load(str(optimized_path)).graph.node:
        if node.op_type in INTEGER_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# Ops that do arithmetic on float tensors: in ONNX Runtime's optimized graph of a QDQ export, each is a place the
# integer model falls back to float (a layer or op without an integer kernel there).
FLOAT_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "AveragePool",
                     "GlobalAveragePool", "MaxPool", "ReduceMean", "Concat", "Softmax", "LayerNormalization",
                     "BatchNormalization", "Relu", "Clip", "Sigmoid", "HardSigmoid", "Tanh", "Erf", "Gelu")


def kernel_report(path) -> str:
    """One line: the ops ONNX Runtime (level 'extended') runs the QDQ model at `path` on integer kernels, and those
    it runs in float, e.g. 'integer kernels: 20 QLinearConv, 8 QLinearAdd, 1 QGemm; float: none'."""
    import tempfile
    import onnx
    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        integer_kernels(path, optimized)
        graph = onnx.load(str(optimized)).graph
    # values computed from constants and shapes only (a flatten's target shape): arithmetic on them is not the model's
    static = {init.name for init in graph.initializer}
    integer_values = set()  # uint8/int8 tensors: an op that reads one (a MaxPool, a Reshape) runs on integers too
    ops, floating_ops = [], []
    for node in graph.node:
        ops.append(node.op_type)
        if node.op_type in ("Shape", "Size", "Constant") or all(name in static for name in node.input if name):
            static.update(node.output)
        elif node.op_type == "QuantizeLinear" or node.op_type.startswith("QLinear") or node.op_type in INTEGER_OPS:
            integer_values.update(node.output)
        elif node.op_type != "DequantizeLinear" and node.input and node.input[0] in integer_values:
            integer_values.update(node.output)
        elif node.op_type in FLOAT_COMPUTE_OPS:
            floating_ops.append(node.op_type)
    integer = {op: ops.count(op) for op in sorted(set(ops)) if op.startswith("QLinear") or op in INTEGER_OPS}
    floating = {op: floating_ops.count(op) for op in sorted(set(floating_ops))}
    def listed(counts):
        return ", ".join(f"{n} {op}" for op, n in counts.items()) or "none"
    return (f"ONNX Runtime's integer kernels: {listed(integer)}; float ops: {listed(floating)}"
            + ("" if not floating else " (no integer kernel for them here: they run on dequantized tensors)"))


INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
               "NhwcQLinearConv")
