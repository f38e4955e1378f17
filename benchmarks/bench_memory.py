"""Memory benchmark: one layer quantized from m = 512 and m = 4096 images, streamed and not.

The layer is a 3×3 convolution 64 → 64 (N0 = 576, N1 = 64) behind a float 3 → 64 stem, on
synthetic 3×56×56 images (91 patch rows per image at retain rate 0.25, so m = 4096 gives
373k rows: 1.7 GB of X and X̃ as rows). Each run is its own process and reports its peak RSS:

- streamed: engine 'gram', rows summed into X̃ᵀX, X̃ᵀX̃ chunk by chunk (64 images) and dropped;
- rows kept: engine 'residual', every row held (the only way before the engine).

    python benchmarks/bench_memory.py
    python benchmarks/bench_memory.py --m 16 64      # other calibration sizes (e.g. a quick check)
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` importable from any directory
from benchmarks.common import SyntheticImages, peak_rss_mb, report, run_child  # noqa: E402

SIZES = (512, 4096)
CHUNK = 64


def child(engine, m, threads):
    from gpfq.pipeline.streams import CalibrationStream
    from gpfq import QuantConfig
    from gpfq.pipeline.network import Calibration, Hooks, quantize_network
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
    stream = CalibrationStream(SyntheticImages(m, (3, 56, 56)), seed=0, chunk_size=CHUNK)
    settings = QuantConfig(bits=4, engine=engine).for_layer
    before = peak_rss_mb()  # torch, the model, the first images: what every run holds anyway
    start = time.perf_counter()
    _, reports = quantize_network(model, stream, settings, Calibration(m, 0.25, 0), Hooks(log=lambda *a: None),
                                  ignore_layers=[0])
    layer = reports[0]
    report({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "baseline_mb": before,
            "rows": layer.rows, "form": layer.form, "streamed": layer.streamed, "error": layer.relative_error})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--m", type=int, nargs=2, default=SIZES, metavar=("SMALL", "LARGE"),
                        help=f"the two calibration sizes, in images (default: {SIZES[0]} {SIZES[1]})")
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child[0], int(args.child[1]), args.threads)
    print(f"# bench_memory: Conv2d 64→64 3×3 (N0=576, N1=64), synthetic 3×56×56, chunks of {CHUNK} images, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    print("| mode | m (images) | rows | peak RSS (MiB) | above start (MiB) | wall (s) | rel. error |")
    print("|---|---|---|---|---|---|---|")
    sizes = tuple(args.m)
    for engine, label in (("gram", "streamed"), ("residual", "rows kept")):
        peaks = {}
        for m in sizes:
            result = run_child(Path(__file__), [engine, m, "--threads", args.threads])
            peaks[m] = result["peak_rss_mb"]
            print(f"| {label} | {m} | {result['rows']} | {result['peak_rss_mb']:.0f} | "
                  f"{result['peak_rss_mb'] - result['baseline_mb']:.0f} | {result['seconds']:.1f} | "
                  f"{result['error']:.4f} |", flush=True)
        print(f"| {label}: peak at m={sizes[1]} / m={sizes[0]} | | | {peaks[sizes[1]] / peaks[sizes[0]]:.2f} | | | |",
              flush=True)


if __name__ == "__main__":
    main()
