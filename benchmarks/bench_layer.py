"""Layer benchmark: per-column loop vs blocked engine vs the BLAS floor, in one run.

For each shape (m rows, N0 inputs, N1 neurons) on synthetic rows at `--bits` bits:
- columns: `gpfq.methods.gpfq.reference.gpfq_columns`, the per-column vectorized loop;
- engine: `gpfq.methods.gpfq.engine.gpfq_blocked` with form 'auto' (and each form on its own);
- floor: the matrix products G = X̃ᵀX and H = X̃ᵀX̃ alone;
- bound: the largest columns/engine any exact float32 engine could reach here: the per-column loop's
  time over the time of the layer's least arithmetic (min of the residual form's 3·m·N0·N1 and the Gram
  form's 2·m·N0² + N1·N0² multiply-adds) at the rate the floor's products reached.
Prints a markdown table with the ratios. Timings on a shared machine are noisy: compare
ratios within one run, not across runs.

    python benchmarks/bench_layer.py                 # S1 S2 S3 on the CPU, all cores
    python benchmarks/bench_layer.py --device cuda   # on a GPU
    python benchmarks/bench_layer.py --threads 1 --shapes S1 S2
"""
import argparse
import os
import statistics
import time

import torch

from gpfq.methods.alphabet import layer_radius, make_alphabet
from gpfq.methods.gpfq.engine import choose_form, gpfq_blocked, predicted_cost
from gpfq.methods.gpfq.reference import gpfq_columns

SHAPES = {"S1": (4096, 576, 64), "S2": (2048, 1152, 128), "S3": (1024, 4608, 512)}  # (m, N0, N1)


def synthetic_layer(m, n_inputs, n_neurons, bits, device, seed=0):
    """ReLU-like rows X, a perturbed X̃, Gaussian weights and the paper's alphabet (C = 1.3)."""
    generator = torch.Generator().manual_seed(seed)
    analog = torch.randn(1, m, n_inputs, generator=generator).relu()
    quantized = (analog + 0.1 * torch.randn(1, m, n_inputs, generator=generator)).relu()
    weight = torch.randn(1, n_neurons, n_inputs, generator=generator) / n_inputs ** 0.5
    alphabet = make_alphabet("gpfq2022", bits, 1.3, layer_radius(weight[0], 1.0))
    return weight.to(device), analog.to(device), quantized.to(device), alphabet.to(device)


def timed(function, device, repeats):
    """Median wall time of `repeats` calls and the last result."""
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="every timing: median of this many runs")
    parser.add_argument("--skip-columns", action="store_true", help="do not time the per-column loop")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA GPU")
    torch.set_num_threads(args.threads)
    device = args.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"# bench_layer: {args.bits} bits, {name}, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| shape | m | N0 | N1 | columns (s) | engine (s) | form | residual (s) | Gram (s) | floor (s) "
          "| columns/engine | bound | engine/floor | Q equal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        m, n_inputs, n_neurons = SHAPES[shape]
        weight, analog, quantized, alphabet = synthetic_layer(m, n_inputs, n_neurons, args.bits, device)
        floor_s, _ = timed(lambda: (torch.bmm(quantized.transpose(1, 2), analog),
                                    torch.bmm(quantized.transpose(1, 2), quantized)), device, args.repeats)
        engine_s, engine_q = timed(lambda: gpfq_blocked(weight, analog, quantized, alphabet), device, args.repeats)
        residual_s, _ = timed(lambda: gpfq_blocked(weight, analog, quantized, alphabet, form="residual"),
                              device, args.repeats)
        gram_s, _ = timed(lambda: gpfq_blocked(weight, analog, quantized, alphabet, form="gram"), device,
                          args.repeats)
        form = choose_form("auto", m, n_inputs, n_neurons)
        # least arithmetic of this layer at the floor's rate (its two products: 2·m·N0² multiply-adds)
        least_macs = min(3 * m * n_inputs * n_neurons, predicted_cost("gram", m, n_inputs, n_neurons))
        least_s = least_macs / (2 * m * n_inputs ** 2 / floor_s)
        if args.skip_columns:
            columns_s, equal, speedup, bound = float("nan"), "–", "–", "–"
        else:
            columns_s, columns_q = timed(lambda: gpfq_columns(weight, analog, quantized, alphabet), device,
                                         args.repeats)
            equal = f"{(columns_q == engine_q).double().mean().item():.5f}"
            speedup = f"{columns_s / engine_s:.1f}×"
            bound = f"{columns_s / least_s:.1f}×"
        print(f"| {shape} | {m} | {n_inputs} | {n_neurons} | {columns_s:.3f} | {engine_s:.3f} | {form} | "
              f"{residual_s:.3f} | {gram_s:.3f} | {floor_s:.3f} | {speedup} | {bound} | {engine_s / floor_s:.2f} | {equal} |",
              flush=True)


if __name__ == "__main__":
    main()
