"""Inference benchmark: file sizes and CPU latency of the float model against its quantized exports.

Two models: the default (fashion_resnet, shipped weights, 1×28×28) and a ResNet-18-shaped network
(torchvision's architecture, random weights, 3×224×224). Each is quantized at 4 bits by round to nearest
(the method does not change sizes or latency) with two alphabets: `strict` (16 levels, a uniform grid:
INT4 + DequantizeLinear in ONNX) and the paper's `gpfq2022` (17 levels: UINT8 codes + Gather).

Sizes: the float state dict (.pt), the quantized model's float state dict (.pt, what the scripts saved
before), the quantized model file (.safetensors), the float ONNX export and the quantized ONNX export.
Memory: the peak resident memory of a fresh process that opens each ONNX model in ONNX Runtime and runs
batch 1 (whether the runtime keeps the integer weights or expands them when it loads the model).
Latency: the fastest and the median wall time of one forward pass, batch 1 and 64, for torch float, ONNX Runtime on the float
export, and ONNX Runtime on each quantized export, all with the same number of threads.

    python benchmarks/bench_inference.py                 # 1 thread
    python benchmarks/bench_inference.py --threads 2 --repeats 20

`--qdq` measures instead the int8 model (ResNet-18 and MobileNetV2 at 224 px, random weights, BatchNorm folded),
in one process: torch float, ONNX Runtime on the float export, ONNX Runtime's own quantize_static of that export
(QDQ, per-channel int8 weights, uint8 activations, 16 random calibration images: the anchor), and our W8A8 and W4A8
exports (gpfq.io.qdq_export), batch 1 and 32, 1 and 2 threads, ≥ 20 calls, fastest and median, each with its ratio
to ORT float and to the anchor; the CPU flags and the load average before and after:

    python benchmarks/bench_inference.py --qdq --repeats 20
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SyntheticImages  # noqa: E402


def quantized_model(model, input_shape, alphabet, folder, name):
    """Round-to-nearest 4-bit quantization of `model`; returns (model, .safetensors path, .pt path)."""
    import gpfq
    config = gpfq.QuantConfig(method="msq", bits=4, alphabet=alphabet, batch_size=4, mlp_scalar=1.0, cnn_scalar=1.0)
    result = gpfq.quantize(model, SyntheticImages(8, input_shape), config, log=lambda *_: None)
    quantized, reports = result.model, result.reports
    safetensors_path = folder / f"{name}_{alphabet}.safetensors"
    gpfq.save_quantized(quantized, result, safetensors_path, model_name=name, input_shape=input_shape)
    pt_path = folder / f"{name}_{alphabet}.pt"
    torch.save(quantized.state_dict(), pt_path)
    return quantized, safetensors_path, pt_path


def seconds(run, repeats):
    """(fastest, median) wall time of `repeats` calls after one warm-up call (the first call allocates).

    On a machine shared with other jobs the fastest call is the one the scheduler left alone; the median
    includes the waits."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


# VmHWM, not getrusage's ru_maxrss: that one survives execve, so a child would report its parent's peak.
MEMORY_CHILD = """
import re, sys, numpy, onnxruntime
def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
before = peak()
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = 1
session = onnxruntime.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
session.run(None, {"images": numpy.zeros((1, *map(int, sys.argv[2:])), numpy.float32)})
print(before, peak())
"""


def peak_memory_mb(onnx_path, input_shape):
    """(peak resident memory after importing onnxruntime, peak after opening the ONNX model and running batch 1),
    MiB, of a fresh process (Linux: /proc/self/status)."""
    import subprocess
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(onnx_path), *map(str, input_shape)],
                          capture_output=True, text=True, check=True)
    before, after = done.stdout.strip().splitlines()[-1].split()
    return float(before), float(after)


def bench_model(name, model, input_shape, threads, repeats, folder, log, latency=True):
    import onnxruntime as ort
    from gpfq.io.onnx_export import export_float_onnx, export_onnx
    model = model.eval()
    sizes = {}
    float_pt = folder / f"{name}_float.pt"
    torch.save(model.state_dict(), float_pt)
    sizes["float .pt"] = float_pt.stat().st_size
    float_onnx = export_float_onnx(model, folder / f"{name}_float.onnx", input_shape)
    sizes["float .onnx"] = float_onnx.stat().st_size
    exports = {}
    for alphabet in ("strict", "gpfq2022"):
        _, safetensors_path, pt_path = quantized_model(model, input_shape, alphabet, folder, name)
        onnx_path = folder / f"{name}_{alphabet}.onnx"
        kinds = export_onnx(safetensors_path, onnx_path)
        sizes[f"{alphabet} .pt"] = pt_path.stat().st_size
        sizes[f"{alphabet} .safetensors"] = safetensors_path.stat().st_size
        sizes[f"{alphabet} .onnx ({'/'.join(sorted(set(kinds.values())))})"] = onnx_path.stat().st_size
        exports[alphabet] = onnx_path
    log(f"\n## {name} {tuple(input_shape)}: file sizes")
    for label, size in sizes.items():
        log(f"  {label:40s} {size:>12,d} bytes  {size / sizes['float .pt']:6.3f} of the float .pt")

    log(f"## {name}: peak resident memory of a process that opens the model in ONNX Runtime and runs batch 1 "
        f"(after importing onnxruntime -> after the run; the growth)")
    for label, path in [("float", float_onnx)] + [(f"{a} 4-bit", p) for a, p in exports.items()]:
        before, after = peak_memory_mb(path, input_shape)
        log(f"  onnxruntime {label:20s} {before:8.1f} -> {after:8.1f} MiB  (+{after - before:.1f} MiB)")
    if not latency:
        return
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sessions = {"onnxruntime float": ort.InferenceSession(str(float_onnx), options,
                                                          providers=["CPUExecutionProvider"])}
    for alphabet, path in exports.items():
        sessions[f"onnxruntime {alphabet} 4-bit"] = ort.InferenceSession(str(path), options,
                                                                        providers=["CPUExecutionProvider"])
    log(f"## {name}: latency per forward pass, {threads} thread(s), {repeats} repeats: fastest and median, "
        f"and the fastest relative to torch float's")
    for batch in (1, 64):
        images = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            reference, median = seconds(lambda: model(images), repeats)
        log(f"  batch {batch:2d}  {'torch float':32s} {reference * 1000:9.2f} ms  {median * 1000:9.2f} ms  1.00")
        feed = {"images": images.numpy()}
        for label, session in sessions.items():
            fastest, median = seconds(lambda: session.run(None, feed), repeats)
            log(f"  batch {batch:2d}  {label:32s} {fastest * 1000:9.2f} ms  {median * 1000:9.2f} ms  "
                f"{fastest / reference:4.2f}")


def anchor_export(float_path, input_shape, folder):
    """ONNX Runtime's own post-training int8 model of the float export: quant_pre_process, then quantize_static
    (QDQ, per-channel int8 weights, uint8 activations, min-max on 16 random images)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)
    prepared, out = folder / f"{float_path.stem}_prepared.onnx", folder / f"{float_path.stem}_ort_int8.onnx"
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)  # its symbolic pass fails on torch's Constant nodes
    images = torch.randn(16, *input_shape, generator=torch.Generator().manual_seed(0)).numpy()

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": images[i:i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.batches, None)
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def qdq_exports(name, model, input_shape, folder, log):
    """{label: ONNX path}: the float export, ONNX Runtime's quantize_static of it (the anchor) and our W8A8 / W4A8
    QDQ exports of `model` (BatchNorm folded)."""
    import gpfq
    from gpfq.io.onnx_export import export_float_onnx
    from gpfq.io.qdq_export import export_qdq_onnx, kernel_report
    from gpfq.pipeline.folding import fold_batchnorm
    model, _ = fold_batchnorm(model.eval())
    float_path = export_float_onnx(model, folder / f"{name}_float.onnx", input_shape)
    paths = {"onnxruntime float": float_path, "ORT quantize_static int8": anchor_export(float_path, input_shape, folder)}
    log(f"  ORT quantize_static: {kernel_report(paths['ORT quantize_static int8'])}")
    for bits in (8, 4):
        config = gpfq.QuantConfig(method="msq", bits=bits, alphabet="strict", batch_size=16, mlp_scalar=1.0,
                                  cnn_scalar=1.0, act_bits=8)
        result = gpfq.quantize(model, SyntheticImages(16, input_shape), config, log=lambda *_: None)
        path = export_qdq_onnx(result, folder / f"{name}_w{bits}a8.onnx", input_shape)
        log(f"  ours W{bits}A8: {path.stat().st_size:,d} bytes; {kernel_report(path)}")
        paths[f"ours W{bits}A8 QDQ"] = path
    return model, paths


QDQ_MODELS = {"resnet18": (3, 224, 224), "mobilenet_v2": (3, 224, 224)}


def bench_qdq(repeats, folder, log):
    """Per model, threads and batch: torch float, ORT float, ORT's quantize_static (the anchor) and our exports,
    each timed in this process, with its ratio to ORT float and to the anchor."""
    import onnxruntime as ort
    import torchvision
    for name, input_shape in QDQ_MODELS.items():
        torch.manual_seed(0)
        log(f"## {name} {tuple(input_shape)}, random weights, BatchNorm folded: exports")
        model, paths = qdq_exports(name, getattr(torchvision.models, name)(weights=None), input_shape, folder, log)
        log(f"## {name}: latency per forward pass, {repeats} calls after a warm-up: fastest and median (ms); "
            f"ratios = ORT float's or the anchor's fastest / this one's fastest (same run)")
        for threads in (1, 2):
            torch.set_num_threads(threads)
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            sessions = {label: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                        for label, path in paths.items()}
            for batch in (1, 32):
                images = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(batch))
                feed = {"images": images.numpy()}
                rows = []
                with torch.no_grad():
                    rows.append(("torch float",) + seconds(lambda: model(images), repeats))
                for label, session in sessions.items():
                    rows.append((label,) + seconds(lambda: session.run(None, feed), repeats))
                fastest = {label: best for label, best, _ in rows}
                for label, best, median in rows:
                    log(f"  {threads} thread(s) batch {batch:2d}  {label:26s} {best * 1000:9.2f} {median * 1000:9.2f}"
                        f"  vs ORT float x{fastest['onnxruntime float'] / best:5.2f}"
                        f"  vs anchor x{fastest['ORT quantize_static int8'] / best:5.2f}")


def cpu_flags() -> str:
    try:
        words = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return "unknown"
    return " ".join(flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if flag in words) \
        or "none of avx2/avx512f/vnni/amx"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", nargs="*", default=["fashion_resnet", "resnet18"])
    parser.add_argument("--qdq", action="store_true", help="W8A8/W4A8 QDQ exports on int8 kernels against float")
    parser.add_argument("--no-latency", dest="latency", action="store_false", help="sizes and memory only")
    args = parser.parse_args()
    import onnxruntime
    import torchvision
    from gpfq.io.models import load_model
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = []

    def log(line):
        print(line, flush=True)
        lines.append(line)
    threads = "1 and 2 threads" if args.qdq else f"{args.threads} thread(s)"
    log(f"# bench_inference: torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {threads}, "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores at the start")
    models = {"fashion_resnet": (lambda: load_model("fashion_resnet"), (1, 28, 28)),
              "resnet18": (lambda: torchvision.models.resnet18(weights=None), (3, 224, 224))}
    if args.qdq:
        log(f"# CPU flags: {cpu_flags()}")
        with tempfile.TemporaryDirectory() as folder:
            bench_qdq(max(args.repeats, 20), Path(folder), log)
        log(f"# load average {os.getloadavg()[0]:.2f} at the end")
        return
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            make, shape = models[name]
            bench_model(name, make(), shape, args.threads, args.repeats, Path(folder), log, args.latency)
    log(f"# load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
