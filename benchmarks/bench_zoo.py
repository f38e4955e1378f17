"""Zoo benchmark: quantize every torchvision classifier (random weights) and report its coverage.

For each name in `torchvision.models.list_models(module=torchvision.models)` (the classifiers): build it
with random weights, draw m synthetic images of a small size the model accepts, and run 4-bit GPFQ
through `quantize_network` in fixed calibration (fresh where fx cannot run the model). Each model has a
cap on the CPU time of its process (not wall time: on a shared machine wall time measures the other jobs);
models run one after another in a worker process, replaced if one crashes it. Models larger than
--max_parameters (torchvision's metadata) are not built. The table (model, calibration, image side,
layers, matmul weights quantized, parameters quantized/total, CPU and wall seconds, max relative error,
status) and a summary line go to stdout and to benchmarks/results/zoo.md, a row at a time, so a stopped run
keeps what it measured.

    python benchmarks/bench_zoo.py                        # every classifier, 60 CPU-s cap each, 32×32 images
    python benchmarks/bench_zoo.py --cap 30 --models resnet18 vit_b_32
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SyntheticImages, report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "zoo.md"
# Input sizes below the default for the models whose architecture needs it (else --size).
SIZES = {"maxvit_t": 224, "inception_v3": 96}


def build(name: str, size: int):
    """(model, image size): ViTs are built for the small image size (their position embedding depends on it)."""
    from torchvision import models
    kwargs = {}
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        size = max(patch * 2, size // patch * patch)
        kwargs["image_size"] = size
    return models.get_model(name, weights=None, **kwargs).eval(), SIZES.get(name, size)


def accepted_size(model, size: int) -> int:
    """The first of size, 64, 224 that the model runs on."""
    for side in dict.fromkeys((size, max(size, 64), 224)):
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, side, side))
            return side
        except Exception:  # too small for its pooling / windows: try the next size
            continue
    return 224


def parameter_count(name: str):
    """The parameter count in torchvision's weight metadata (no model built), or None."""
    from torchvision import models
    try:
        return models.get_model_weights(name).DEFAULT.meta["num_params"]
    except (KeyError, ValueError, AttributeError):
        return None


def write_row(out, result: dict) -> None:
    error = result.get("max_error")
    line = (f"| {result['name']} | {result.get('calibration', '')} | {result.get('size', '')} | "
            f"{result.get('layers', '')} | {result.get('weights', '')} | {result.get('parameters', '')} | "
            f"{result['cpu_seconds']:.1f} | {result['seconds']:.1f} | "
            f"{'' if error is None else format(error, '.4f')} | {result['status']} |\n")
    print(line, end="", flush=True)
    out.write(line)
    out.flush()


class _OverCap(Exception):
    pass


def _over_cap(signum, frame):
    raise _OverCap


def quantize_one(name, size, m):
    """Quantize one classifier; the result row as a dict."""
    from gpfq.pipeline.streams import CalibrationStream
    from gpfq import QuantConfig
    from gpfq.pipeline.network import Calibration, Hooks, quantize_network
    torch.manual_seed(0)
    model, size = build(name, size)
    if name not in SIZES and not name.startswith("vit_"):
        size = accepted_size(model, size)
    settings = QuantConfig(bits=4).for_layer
    calibration = "fixed"
    while True:
        stream = CalibrationStream(SyntheticImages(2 * m, (3, size, size)), seed=0, chunk_size=m)
        try:
            _, reports = quantize_network(model, stream, settings, Calibration(m, 0.25, 0, mode=calibration),
                                          Hooks(log=lambda *a: None))
            break
        except ValueError as error:
            if calibration == "fresh" or "calibration='fresh'" not in str(error):
                raise
            calibration = "fresh"
    coverage = reports.coverage
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    matmul = len(coverage.quantized) + len(coverage.chosen_float) + len(coverage.unsupported)
    float_matmul = [n for n, _, _ in coverage.unsupported]
    return {"calibration": calibration, "size": size, "layers": len(reports),
            "weights": f"{len(coverage.quantized)}/{matmul}",
            "parameters": f"{coverage._total(coverage.quantized)}/{total}",
            "max_error": max((r.relative_error for r in reports), default=0.0),
            "status": "ok" if not float_matmul else "float: " + " ".join(float_matmul[:3])}


def worker(names, size, m, threads, cap):
    """Quantize each model in turn, each under `cap` seconds of this process's CPU time; one JSON line each."""
    import warnings
    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    signal.signal(signal.SIGPROF, _over_cap)
    for name in names:
        print(json.dumps({"start": name}), flush=True)
        cpu, wall = time.process_time(), time.perf_counter()
        signal.setitimer(signal.ITIMER_PROF, cap)
        try:
            result = quantize_one(name, size, m)
        except _OverCap:
            result = {"status": f"over the {cap:.0f} s CPU cap"}
        except Exception as error:  # a model this code cannot handle: its row says why
            first_line = (str(error).splitlines() or [""])[0][:160]
            result = {"status": f"error: {type(error).__name__}: {first_line}"}
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        result.update(name=name, cpu_seconds=time.process_time() - cpu, seconds=time.perf_counter() - wall)
        report(result)


def run_all(names, args):
    """Yield a result per model from worker processes; a worker that dies is replaced after its model."""
    pending = list(names)
    while pending:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", *pending, "--size", str(args.size),
                   "--m", str(args.m), "--threads", str(args.threads), "--cap", str(args.cap)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        current = None
        for line in process.stdout:
            message = json.loads(line)
            if "start" in message:
                current = message["start"]
                continue
            pending.remove(message["name"])
            current = None
            yield message
        process.wait()
        if current is not None:  # the worker died inside this model
            pending.remove(current)
            yield {"name": current, "status": f"error: the process died (exit {process.returncode})",
                   "seconds": 0.0, "cpu_seconds": 0.0}
        elif pending:
            raise RuntimeError(f"the worker stopped early (exit {process.returncode})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=float, default=60.0, help="seconds of CPU time per model")
    parser.add_argument("--m", type=int, default=4, help="calibration images")
    parser.add_argument("--size", type=int, default=32, help="image side (larger where a model needs it)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--max_parameters", type=float, default=150e6, help="skip larger models (not built)")
    parser.add_argument("--models", nargs="*", help="a subset (default: every classifier)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="the Markdown table")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.size, args.m, args.threads, args.cap)
    import torchvision
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    head = (f"# bench_zoo: {len(names)} torchvision classifiers, random weights, 4-bit GPFQ, m={args.m}, "
            f"synthetic {args.size}×{args.size} images (larger where needed), cap {args.cap:.0f} s of CPU time per "
            f"model, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}\n\n"
            "| model | calibration | image | layers | matmul weights quantized | parameters quantized/total "
            "| CPU s | wall s | max rel. error | status |\n|---|---|---|---|---|---|---|---|---|---|\n")
    print(head, end="", flush=True)
    with open(args.output, "w") as out:
        out.write(head)
        out.flush()
        results = {}
        runnable = []
        for name in names:
            count = parameter_count(name)
            if count is not None and count > args.max_parameters:
                results[name] = {"name": name, "seconds": 0.0, "cpu_seconds": 0.0,
                                 "status": f"skipped: {count / 1e6:.0f} M parameters (over --max_parameters)"}
            else:
                runnable.append(name)
        runnable.sort(key=lambda n: parameter_count(n) or 0)  # small first: a stopped run has the most rows
        for result in list(results.values()):
            write_row(out, result)
        stopped = ""
        try:
            for result in run_all(runnable, args):
                results[result["name"]] = result
                write_row(out, result)
        except KeyboardInterrupt:  # Ctrl-C: the summary of the models measured so far
            stopped = f" Stopped (interrupted) after {len(results)} of {len(names)} models."
        ok = [n for n, r in results.items() if r["status"] == "ok"]
        full = [n for n in ok if results[n]["weights"].split("/")[0] == results[n]["weights"].split("/")[1]]
        capped = [n for n, r in results.items() if r["status"].startswith("over")]
        failed = [n for n, r in results.items() if r["status"].startswith("error")]
        skipped = [n for n, r in results.items() if r["status"].startswith("skipped")]
        partial = [n for n, r in results.items() if r["status"].startswith("float")]
        summary = (f"\nSummary: {len(ok)} of {len(names)} classifiers quantized within the {args.cap:.0f} CPU-s cap, "
                   f"{len(full)} of them with every matmul weight quantized; {len(partial)} with float matmul "
                   f"weights{' (' + ', '.join(partial) + ')' if partial else ''}; {len(capped)} over the cap"
                   f"{' (' + ', '.join(capped) + ')' if capped else ''}; {len(skipped)} skipped as larger than "
                   f"{args.max_parameters / 1e6:.0f} M parameters{' (' + ', '.join(skipped) + ')' if skipped else ''}; "
                   f"{len(failed)} errors"
                   f"{' (' + ', '.join(failed) + ')' if failed else ''}.{stopped}\n")
        print(summary, end="")
        out.write(summary)


if __name__ == "__main__":
    main()
