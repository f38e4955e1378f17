"""Model benchmark: quantize a ResNet-18-shaped network, per-column engine vs blocked engine.

torchvision's ResNet-18 architecture with random weights (timing only) on synthetic 3×224×224
images, m images per layer (default 64), 4 bits. Each configuration runs in its own process, so
its wall time and peak RSS are its own; all run in this one invocation:

- columns, fresh: the per-column loop, m new images per layer (the code before the engine);
- auto, fresh:    the blocked engine, m new images per layer (the paper's calibration);
- columns, fixed: the per-column loop, one set of m images run once through both networks;
- auto, fixed:    the blocked engine, one set of m images run once through both networks.
The "layer rule" column is the time inside the layer rule alone (`LayerReport.rule_seconds`: the engine
or the per-column loop, from rows or streamed sums); the rest is forward passes, patch extraction and
the Gram sums of streamed layers.

    python benchmarks/bench_model.py                # all cores
    python benchmarks/bench_model.py --threads 1 --m 32
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` importable from any directory
from benchmarks.common import SyntheticImages, peak_rss_mb, report, run_child  # noqa: E402

CONFIGURATIONS = [("columns", "fresh"), ("auto", "fresh"), ("columns", "fixed"), ("auto", "fixed")]


def child(engine, calibration, m, threads):
    import torchvision
    from gpfq.pipeline.streams import CalibrationStream
    from gpfq import QuantConfig
    from gpfq.pipeline.network import Calibration, Hooks, quantize_network
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    stream = CalibrationStream(SyntheticImages(4 * m, (3, 224, 224)), seed=0, chunk_size=m)
    settings = QuantConfig(bits=4, mlp_scalar=1.16, cnn_scalar=1.16, engine=engine).for_layer
    start = time.perf_counter()
    _, reports = quantize_network(model, stream, settings, Calibration(m, 0.25, 0, mode=calibration),
                                  Hooks(log=lambda *a: None))
    seconds = time.perf_counter() - start
    report({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "layers": len(reports),
            "layer_seconds": sum(r.seconds for r in reports), "rule_seconds": sum(r.rule_seconds for r in reports),
            "forms": sorted({r.form for r in reports}), "streamed": sum(r.streamed for r in reports)})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=64, help="calibration images per layer")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "CALIBRATION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child, args.m, args.threads)
    print(f"# bench_model: ResNet-18 (random weights), synthetic 3×224×224, m={args.m}, 4 bits, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| engine | calibration | wall (s) | layer rule (s) | peak RSS (MiB) | forms | streamed layers "
          "| speed-up vs columns, fresh |")
    print("|---|---|---|---|---|---|---|---|")
    baseline = None
    for engine, calibration in CONFIGURATIONS:
        result = run_child(Path(__file__), [engine, calibration, "--m", args.m, "--threads", args.threads])
        baseline = baseline or result["seconds"]
        print(f"| {engine} | {calibration} | {result['seconds']:.1f} | {result['rule_seconds']:.1f} | "
              f"{result['peak_rss_mb']:.0f} | "
              f"{'/'.join(result['forms'])} | {result['streamed']}/{result['layers']} | "
              f"{baseline / result['seconds']:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
