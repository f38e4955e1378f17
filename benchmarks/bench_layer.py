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

`--grid`: the two forms of the engine, timed the way the pipeline runs them, on every distinct layer shape of
torchvision's ResNet-18, ResNet-50, VGG-16 and MobileNetV2 (224 px, random weights; conv rows = images × kept
patches, retain rate 0.25, stride = kernel) at m = 512 and 2048 images, plus a few tall, skinny layers. Gram:
the rows streamed into `GramStatistics` in chunks of 256 images, then `gpfq_gram`; residual: `gpfq_residual` on
the rows (the per-group strided view). Interleaved, median of `--repeats`. A form whose row-proportional
work passes `--work` multiply-adds is timed on a leading share of the rows (at least `--min-rows`) and that
part scaled to all rows (both forms are linear in m there; the Gram rule, timed whole, is not). Prints per
shape both times, auto's pick and auto / min(both); `--fit` also fits `engine.FORM_SECONDS` to the times.

    python benchmarks/bench_layer.py --grid --threads 2 --fit --json grid.json
"""
import argparse
import json
import math
import os
import statistics
import time

import numpy as np
import torch
from tqdm import tqdm

from gpfq.methods.alphabet import layer_radius, make_alphabet
from gpfq.pipeline.capture import ConvGeometry
from gpfq.pipeline.rows import patch_grid
from gpfq.methods.gpfq.engine import (DEFAULT_ROWS_BUDGET, FORM_SECONDS, FORMS, GramStatistics, choose_form, cost_terms,
                         gpfq_blocked, gpfq_gram, gpfq_residual, predicted_cost, rows_bytes)
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


# ---------------------------------------------------------------- the form grid
GRID_MODELS = ("resnet18", "resnet50", "vgg16", "mobilenet_v2")
GRID_IMAGES = (512, 2048)
CHUNK_IMAGES = 256  # images per calibration chunk (the pipeline's default chunk_size)
# Besides the models' layers (rows, N0, N1, G): an MNIST-size CNN's tall, skinny 3×3 convs, 32 → 32 / 64, and the
# wide 1×1 conv that tests/test_engine.py pins the choice of.
EXTRA_SHAPES = {"mnist conv 32→32": (196608, 288, 32, 1), "mnist conv 32→64": (196608, 288, 64, 1),
                "wide 1×1 conv": (8192, 64, 512, 1)}
MAX_GRAM_INPUTS = 8192  # wider layers (VGG-16's 25088-input Linear): the N0² float64 sums alone pass 1 GiB


def model_layer_shapes(name, size=224, retain_rate=0.25):
    """[(rows per image, N0, N1, G)] of a torchvision model's Conv2d and Linear layers, in call order."""
    import torchvision
    model = getattr(torchvision.models, name)(weights=None).eval()
    shapes = []

    def hook(module, inputs, _output):
        x = inputs[0]
        if isinstance(module, torch.nn.Conv2d):
            patches = math.prod(patch_grid(ConvGeometry.of_module(module), x.shape[2:], "kernel"))
            groups = module.groups
            shapes.append((int(retain_rate * patches + 1), module.in_channels // groups * math.prod(module.kernel_size),
                           module.out_channels // groups, groups))
        else:
            shapes.append((x.numel() // x.shape[-1], module.in_features, module.out_features, 1))

    handles = [module.register_forward_hook(hook) for module in model.modules()
               if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return shapes


def grid_shapes(models=GRID_MODELS, images=GRID_IMAGES):
    """{(rows, N0, N1, G): {"labels": [...], "chunk_rows": rows per chunk}} over the models' layers and EXTRA_SHAPES."""
    grid = {}
    for name in models:
        for per_image, n_inputs, n_neurons, groups in model_layer_shapes(name):
            for m in images:
                entry = grid.setdefault((per_image * m, n_inputs, n_neurons, groups),
                                        {"labels": [], "chunk_rows": per_image * CHUNK_IMAGES})
                label = f"{name} m={m}"
                if label not in entry["labels"]:
                    entry["labels"].append(label)
    for label, shape in EXTRA_SHAPES.items():
        grid.setdefault(shape, {"labels": [], "chunk_rows": 26 * CHUNK_IMAGES})["labels"].append(label)
    return grid


def timed_rows(form, rows, n_inputs, n_neurons, groups, work, min_rows):
    """Rows to time `form` on: all, or a share whose row-proportional work is about `work` multiply-adds."""
    per_row = groups * n_inputs * ((3 * n_neurons + 2 * min(64, n_inputs)) if form == "residual" else 2 * n_inputs)
    return min(rows, max(min_rows, int(work // per_row)))


def time_shape(shape, chunk_rows, work, min_rows, repeats, long_s=1.0, bits=4, seed=0):
    """{form: {"seconds" at all rows, "rows" timed, "measured" seconds at those rows, ...}} for one grid shape."""
    rows, n_inputs, n_neurons, groups = shape
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(groups, n_neurons, n_inputs, generator=generator) / n_inputs ** 0.5
    alphabet = make_alphabet("gpfq2022", bits, 1.3, layer_radius(weight.reshape(-1, n_inputs), 1.0))
    residual_rows = timed_rows("residual", rows, n_inputs, n_neurons, groups, work, min_rows)
    gram_rows = timed_rows("gram", rows, n_inputs, n_neurons, groups, work, min_rows)
    with_gram = n_inputs <= MAX_GRAM_INPUTS
    held = max(residual_rows, gram_rows if with_gram else 0)
    # rows (m, G·N0) as a layer's patches come, and the (G, m, N0) view the engine is given (capture.grouped)
    analog = torch.randn(held, groups * n_inputs, generator=generator).relu_()
    quantized = (analog + 0.1 * torch.randn(held, groups * n_inputs, generator=generator)).relu_()

    def per_group(x):
        return x.reshape(x.shape[0], groups, n_inputs).permute(1, 0, 2)

    def residual(share=residual_rows):
        return gpfq_residual(weight, per_group(analog[:share]), per_group(quantized[:share]), alphabet)

    def stream():
        sums = GramStatistics(groups, n_inputs, weight=weight)
        for start in range(0, gram_rows, chunk_rows):
            stop = min(start + chunk_rows, gram_rows)
            sums.add(per_group(analog[start:stop]), per_group(quantized[start:stop]))
        return sums

    # A residual form timed on a share of the rows is timed on half that share too: its in-block step does not
    # grow with m, so the time at all rows is the line through the two points (not a plain scale-up).
    half = residual_rows // 2 if residual_rows < rows else None
    times = {"residual": [], "half": [], "stream": [], "rule": []}
    for repeat in range(repeats):  # interleaved, so a slow spell of the shared machine hits both forms
        # a form whose first run took over `long_s` is not repeated (a median of 1), to keep the grid to minutes
        if repeat == 0 or times["residual"][0] + sum(times["half"][:1]) <= long_s:
            times["residual"].append(_seconds(residual))
            if half:
                times["half"].append(_seconds(lambda: residual(half)))
        if with_gram and (repeat == 0 or times["stream"][0] + times["rule"][0] <= long_s):
            start = time.perf_counter()
            sums = stream()
            times["stream"].append(time.perf_counter() - start)
            times["rule"].append(_seconds(lambda: gpfq_gram(weight, sums.cross, sums.quantized_gram, alphabet)))
    measured = statistics.median(times["residual"])
    result = {"residual": {"rows": residual_rows, "measured": measured, "seconds": measured,
                           "runs": len(times["residual"])}}
    if half:
        half_s = statistics.median(times["half"])
        slope = max(0.0, (measured - half_s) / (residual_rows - half))
        result["residual"].update(half_rows=half, half_measured=half_s,
                                  seconds=half_s + slope * (rows - half))
    if with_gram:
        stream_s, rule_s = statistics.median(times["stream"]), statistics.median(times["rule"])
        result["gram"] = {"rows": gram_rows, "measured": stream_s + rule_s, "stream": stream_s, "rule": rule_s,
                          "seconds": stream_s * rows / gram_rows + rule_s, "runs": len(times["stream"])}
    return result


def _seconds(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def fit_form_seconds(measurements):
    """FORM_SECONDS fitted to measured points: per form, non-negative least squares on the relative error
    (each point's equation divided by its measured seconds), so short and long layers weigh alike."""
    from scipy.optimize import nnls
    fitted = {}
    for form in FORMS:
        names = list(cost_terms(form, 1, 1, 1))
        matrix, target = [], []
        for point in measurements:
            if form not in point:
                continue
            _, n_inputs, n_neurons, groups = point["shape"]
            timing = point[form]
            timed = [(timing["rows"], timing["measured"])]
            if "half_rows" in timing:
                timed.append((timing["half_rows"], timing["half_measured"]))
            for rows, seconds in timed:
                terms = cost_terms(form, rows, n_inputs, n_neurons, groups, point["chunk_rows"])
                matrix.append([terms[name] / seconds for name in names])
                target.append(1.0)
        matrix = np.asarray(matrix, dtype=np.float64)
        scale = matrix.max(axis=0)
        scale[scale == 0] = 1.0
        solution, _ = nnls(matrix / scale, np.asarray(target))
        fitted[form] = {name: float(value / size) for name, value, size in zip(names, solution, scale)}
    return fitted


def model_seconds(constants, form, rows, n_inputs, n_neurons, groups, chunk_rows):
    terms = cost_terms(form, rows, n_inputs, n_neurons, groups, chunk_rows)
    return sum(constants[form][name] * count for name, count in terms.items())


def run_grid(args):
    """The --grid table: both forms per shape, auto's pick, auto / min(both); the worst ratio at the end."""
    torch.set_num_threads(args.threads)
    grid = grid_shapes(args.models, args.images)
    print(f"# bench_layer --grid: {args.threads} threads, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {len(grid)} shapes; work {args.work:.0e}, "
          f"min rows {args.min_rows}, median of {args.repeats}")
    measurements, untimed = [], []
    for shape in tqdm(sorted(grid), desc="shapes", leave=False):
        if shape[1] > MAX_GRAM_INPUTS:
            untimed.append(shape)
            continue
        timing = time_shape(shape, grid[shape]["chunk_rows"], args.work, args.min_rows, args.repeats, args.long)
        measurements.append({"shape": list(shape), "labels": grid[shape]["labels"],
                             "chunk_rows": grid[shape]["chunk_rows"], **timing})
    if args.json:
        temporary = f"{args.json}.tmp"
        with open(temporary, "w") as handle:
            json.dump({"threads": args.threads, "load": os.getloadavg(), "measurements": measurements}, handle)
        os.replace(temporary, args.json)
    print_grid(measurements, FORM_SECONDS)
    for shape in untimed:
        print(f"not timed: {shape} ({', '.join(grid[shape]['labels'])}): N0 > {MAX_GRAM_INPUTS}, the Gram form's "
              f"N0 × N0 float64 sums alone would pass 1 GiB")
    if args.fit:
        fitted = fit_form_seconds(measurements)
        print("\n# fitted FORM_SECONDS (seconds per count of engine.cost_terms):")
        print(json.dumps(fitted, indent=1))
        print("\n# the same grid with the fitted constants:")
        print_grid(measurements, fitted)


def print_grid(measurements, constants):
    """One markdown row per shape; 'auto' is `choose_form` with `constants` (None: the engine's own)."""
    print("| rows | N0 | N1 | G | layers | residual (s) | Gram (s) | timed rows res / Gram | auto | auto / min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst, worst_shape = 1.0, None
    for point in measurements:
        rows, n_inputs, n_neurons, groups = point["shape"]
        residual_s = point["residual"]["seconds"]
        gram_s = point["gram"]["seconds"] if "gram" in point else math.inf
        over_budget = rows_bytes(rows, n_inputs, groups) > DEFAULT_ROWS_BUDGET
        if over_budget:
            pick = "gram"
        elif constants is FORM_SECONDS:
            pick = choose_form("auto", rows, n_inputs, n_neurons, groups)
        else:
            pick = min(FORMS, key=lambda form: model_seconds(constants, form, rows, n_inputs, n_neurons, groups,
                                                              1 << 14))
        if over_budget or "gram" not in point:
            ratio = "–"  # one form only: rows over the budget must stream, and the Gram form was not timed
        else:
            value = (residual_s if pick == "residual" else gram_s) / min(residual_s, gram_s)
            ratio = f"{value:.2f}"
            if value > worst:
                worst, worst_shape = value, point["shape"]
        timed = f"{point['residual']['rows']} / {point['gram']['rows'] if 'gram' in point else '–'}"
        once = {form: "¹" if form in point and point[form]["runs"] == 1 else "" for form in FORMS}
        gram_text = f"{gram_s:.3f}{once['gram']}" if "gram" in point else "not timed"
        print(f"| {rows} | {n_inputs} | {n_neurons} | {groups} | {', '.join(point['labels'])} | {residual_s:.3f}{once['residual']} | "
              f"{gram_text} | {timed} | {pick}{' (budget)' if over_budget else ''} | {ratio} |")
    print(f"\nworst auto / min: {worst:.2f}" + (f" at {worst_shape}" if worst_shape else "")
          + "  (¹: one run, its first took over --long seconds)", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="every timing: median of this many runs")
    parser.add_argument("--skip-columns", action="store_true", help="do not time the per-column loop")
    parser.add_argument("--grid", action="store_true", help="both forms on the models' layer shapes (module docstring)")
    parser.add_argument("--models", nargs="+", default=list(GRID_MODELS), choices=list(GRID_MODELS))
    parser.add_argument("--images", nargs="+", type=int, default=list(GRID_IMAGES), help="--grid: m values")
    parser.add_argument("--work", type=float, default=2e9,
                        help="--grid: a form is timed on a share of the rows with about this many multiply-adds")
    parser.add_argument("--min-rows", type=int, default=2048, help="--grid: time at least this many rows")
    parser.add_argument("--long", type=float, default=1.0, help="--grid: a form whose first run takes longer is "
                        "not repeated")
    parser.add_argument("--fit", action="store_true", help="--grid: fit engine.FORM_SECONDS to the times")
    parser.add_argument("--json", help="--grid: also write the measurements here")
    args = parser.parse_args(argv)
    if args.grid:
        if args.device != "cpu":
            parser.error("--grid times the CPU engine; leave --device at cpu")
        if args.work <= 0 or args.min_rows < 1 or args.repeats < 1 or any(m < 1 for m in args.images):
            parser.error("--work, --min-rows, --repeats and --images must be positive")
        return run_grid(args)
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
