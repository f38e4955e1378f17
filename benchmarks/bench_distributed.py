"""Distributed benchmark: fresh-mode GPFQ of a ResNet-18-shaped network on 1 and 2 ranks (gloo).

torchvision's ResNet-18 architecture with random weights (timing only) on synthetic 3×224×224
images, m images per layer, 4 bits, calibration 'fresh' (the paper's). Every rank is its own
process with one torch thread, pinned to its own core where the machine has enough. World size 1
is one process without a process group, exactly as a run without torchrun; world size 2 runs the
same code under a gloo process group (the sums of every layer all-reduced).

Reported per world size: wall time of the layer loop, the time in collectives (waiting for the
slower rank included) and its fraction, the layer rule's time, and the speed-up over world size 1.
With --rules, world size 2 also runs with the rule on every rank instead of rank 0 + broadcast.

Then a paper-scale estimate, ResNet-50 at m = 512 on 8 ranks, EXTRAPOLATED (not run) from costs
measured here: ResNet-50's per-layer forward cost (prefix time to each layer, one thread), the
matrix-product rate of this machine's Gram sums and rule, and the all-reduce bandwidth of gloo
measured between the 2 ranks on this machine (loopback; a real network is slower, so the estimate
is also given for a 10 Gb/s link).

    python benchmarks/bench_distributed.py             # m = 32, world sizes 1 and 2
    python benchmarks/bench_distributed.py --m 64 --rules
"""
import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SyntheticImages  # noqa: E402

LINK_10GBE = 1.25e9  # bytes/s of a 10 Gb/s link, for the multi-machine estimate


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(rank: int) -> str:
    """Pin this process to core `rank` when the machine has that many; say where it runs."""
    cores = sorted(os.sched_getaffinity(0))
    if rank < len(cores):
        os.sched_setaffinity(0, {cores[rank]})
        return f"core {cores[rank]}"
    return "unpinned"


def rank_main(rank, world_size, port, m, rule, out):
    """One rank: quantize ResNet-18 (random weights, seed 0) in fresh mode; rank 0 writes the timings."""
    import torch.distributed as dist
    import torchvision
    from gpfq.pipeline import distributed
    from gpfq.pipeline.streams import CalibrationStream
    from gpfq import QuantConfig
    from gpfq.pipeline.network import Calibration, Hooks, quantize_network
    where = pin(rank)
    torch.set_num_threads(1)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size))
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=1800))
        shard = distributed.Shard(rule=rule)
    else:
        shard = distributed.SINGLE
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    stream = CalibrationStream(SyntheticImages(4 * m, (3, 224, 224)), seed=0, chunk_size=m)

    settings = QuantConfig(bits=4, mlp_scalar=1.16, cnn_scalar=1.16).for_layer

    communication = []
    start = time.perf_counter()
    _, reports = quantize_network(model, stream, settings, Calibration(m, 0.25, 0, keep_rows=False, shard=shard),
                                  Hooks(log=lambda *a: None,
                                        after_layer=lambda step: communication.append(shard.communication_seconds)))
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "communication_seconds": shard.communication_seconds, "where": where,
              "rule_seconds": sum(r.rule_seconds for r in reports), "forms": sorted({r.form for r in reports}),
              "layers": [{"name": r.name, "shape": list(r.weight_shape), "rows": r.rows, "seconds": r.seconds,
                          "rule_seconds": r.rule_seconds, "form": r.form} for r in reports],
              "layer_communication": [b - a for a, b in zip([0.0] + communication, communication)]}
    if world_size > 1:
        result["allreduce_bytes_per_second"] = allreduce_bandwidth(shard)
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def allreduce_bandwidth(shard, megabytes=64, repeats=3) -> float:
    """Bytes of a float64 tensor all-reduced per second (best of `repeats`)."""
    tensor = torch.ones(megabytes * 2 ** 20 // 8, dtype=torch.float64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        shard.all_reduce_(tensor, "bandwidth")
        best = min(best, time.perf_counter() - start)
    return tensor.numel() * 8 / best


def run_world(world_size: int, m: int, rule: str = "rank0") -> dict:
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        start = time.perf_counter()
        if world_size == 1:
            mp.start_processes(rank_main, args=(1, 0, m, rule, str(out)), nprocs=1, start_method="spawn")
        else:
            mp.start_processes(rank_main, args=(world_size, free_port(), m, rule, str(out)), nprocs=world_size,
                               start_method="spawn")
        result = json.loads(out.read_text())
        result["process_seconds"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------- paper-scale estimate
def resnet50_layer_costs(images: int = 2) -> list:
    """ResNet-50 (random weights, 224 px, one thread): per Conv2d/Linear layer in execution order, the
    seconds per image of a forward pass up to the layer's input, and the layer's shape."""
    import torchvision
    torch.set_num_threads(1)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(images, 3, 224, 224)
    entries, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            def hook(mod, inputs, name=name):
                entries.append((name, time.perf_counter(), mod, tuple(inputs[0].shape)))
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x)  # warm-up
        entries.clear()
        start = time.perf_counter()
        model(x)
    for handle in handles:
        handle.remove()
    costs = []
    for name, stamp, module, shape in entries:
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            n0 = module.in_channels // module.groups * kh * kw
            patches = ((shape[2] + 2 * module.padding[0] - kh) // kh + 1) * ((shape[3] + 2 * module.padding[1] - kw)
                                                                             // kw + 1)
            rows_per_image = int(0.25 * patches + 1) if patches > 1 else 1
            n1 = module.out_channels
        else:
            n0, n1, rows_per_image = module.in_features, module.out_features, 1
        costs.append({"name": name, "prefix_seconds": (stamp - start) / images, "n0": n0, "n1": n1,
                      "rows_per_image": rows_per_image})
    return costs


def product_rate(n=1024, repeats=3) -> float:
    """Multiply-adds per second of a float32 n×n×n product on one thread (the Gram sums' and rule's kind)."""
    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return n ** 3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def layer_costs(n0, n1, rows, world_size):
    """Multiply-adds (parallel over ranks, serial on one rank) and bytes each rank receives, for one layer
    with `rows` rows in the form one process would choose (the distributed run takes the same form)."""
    from gpfq.methods.gpfq.engine import choose_form, predicted_cost
    form = choose_form("auto", rows, n0, n1)
    if form == "gram":  # rows summed on every rank (parallel), rule on one, two N0×N0 float64 sums all-reduced
        parallel, serial = 2 * rows * n0 ** 2, n1 * n0 ** 2
        received = 2 * (world_size - 1) / world_size * 2 * n0 ** 2 * 8
    else:  # rows gathered (X and X̃, float32), the residual form on one rank
        parallel, serial = 0, predicted_cost("residual", rows, n0, n1)
        received = (world_size - 1) / world_size * 2 * rows * n0 * 4
    return form, parallel, serial, received


def rule_rate(result) -> float:
    """Serial multiply-adds per second of the layer rules of a measured run (its forms and rows)."""
    serial = sum(layer_costs(_n0(layer["shape"]), layer["shape"][0], layer["rows"], 1)[2] for layer in result["layers"])
    return serial / max(result["rule_seconds"], 1e-9)


def estimate(costs, m, world_size, rate, serial_rate, bandwidth) -> dict:
    """Seconds of fresh-mode GPFQ of the layers `costs` at m images on `world_size` ranks.

    Per layer: both networks up to the layer on m/W images (measured prefix time); the Gram sums on the
    rank's rows at the product `rate`; the rule on one rank at `serial_rate` (measured on ResNet-18 above);
    the all-reduce (ring: 2(W−1)/W of the sums' bytes) or the rows' all-gather at `bandwidth`.
    """
    share = m / world_size
    forward = sum(2 * share * c["prefix_seconds"] for c in costs)
    sums = rule = received = 0.0
    for c in costs:
        _, parallel, serial, bytes_in = layer_costs(c["n0"], c["n1"], m * c["rows_per_image"], world_size)
        sums += parallel / world_size / rate
        rule += serial / serial_rate
        received += bytes_in
    communication = received / bandwidth if world_size > 1 else 0.0
    total = forward + sums + rule + communication
    return {"forward": forward, "sums": sums, "rule": rule, "communication": communication, "total": total}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=32, help="calibration images per layer")
    parser.add_argument("--rules", action="store_true", help="also run world size 2 with the rule on every rank")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    print(f"# bench_distributed: ResNet-18 (random weights), synthetic 3×224×224, fresh, m={args.m}, 4 bits, "
          f"GPFQ; one torch thread per rank; {os.cpu_count()} cores; load average {load[0]:.1f} / {load[1]:.1f} / "
          f"{load[2]:.1f} (1 / 5 / 15 min) at the start; torch {torch.__version__}")
    runs = [(1, "rank0"), (2, "rank0")] + ([(2, "every")] if args.rules else [])
    results = {}
    print("| world size | rule on | wall (s) | in collectives (s) | fraction | layer rule (s) | forms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for world_size, rule in runs:
        result = run_world(world_size, args.m, rule)
        results[(world_size, rule)] = result
        base = results[(1, "rank0")]["seconds"]
        print(f"| {world_size} | {'rank 0 + broadcast' if rule == 'rank0' else 'every rank'} | "
              f"{result['seconds']:.1f} | {result['communication_seconds']:.1f} | "
              f"{result['communication_seconds'] / result['seconds']:.1%} | {result['rule_seconds']:.1f} | "
              f"{'/'.join(result['forms'])} | {base / result['seconds']:.2f}× |", flush=True)
    load = os.getloadavg()
    print(f"# load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")

    # The extrapolation.
    two = results[(2, "rank0")]
    bandwidth = two["allreduce_bytes_per_second"]
    rate = product_rate()
    single = results[(1, "rank0")]
    serial_rate = rule_rate(single)
    costs = resnet50_layer_costs()
    print(f"\n# ESTIMATE (extrapolated, not run): ResNet-50 at m = 512, fresh, each layer in the form one process "
          f"chooses, from costs measured here: ResNet-50's forward prefix per layer ({len(costs)} layers, one thread, "
          f"{costs[-1]['prefix_seconds']:.2f} s per image to the last layer), product rate {rate / 1e9:.1f} G "
          f"multiply-adds/s on one thread, layer rules at {serial_rate / 1e9:.1f} G/s (world size 1 above: "
          f"{single['rule_seconds']:.1f} s), gloo all-reduce {bandwidth / 1e9:.2f} GB/s between 2 ranks on this "
          f"machine (loopback).")
    print("| ranks | link | forward (s) | Gram sums (s) | rule (s) | communication (s) | total (h) | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    one = estimate(costs, 512, 1, rate, serial_rate, bandwidth)
    for world_size, link, link_bandwidth in [(1, "-", bandwidth), (8, "loopback as measured", bandwidth),
                                             (8, "10 Gb/s", LINK_10GBE)]:
        e = estimate(costs, 512, world_size, rate, serial_rate, link_bandwidth)
        print(f"| {world_size} | {link} | {e['forward']:.0f} | {e['sums']:.0f} | {e['rule']:.0f} | "
              f"{e['communication']:.0f} | {e['total'] / 3600:.2f} | {one['total'] / e['total']:.1f}× |")


def _n0(shape) -> int:
    n0 = 1
    for size in shape[1:]:
        n0 *= size
    return n0


if __name__ == "__main__":
    main()
