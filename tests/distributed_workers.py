"""Worker processes for tests/test_distributed.py, started with torch.multiprocessing (spawn)."""
import datetime
import os

import torch
import torch.distributed as dist


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world_size: int, port: int, timeout: float = 60.0) -> None:
    """Join a gloo process group of `world_size` ranks on this machine, one torch thread per rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))


def default_settings(engine="auto", method="gpfq", bits=4):
    """settings_of for the plain script's default header (C = 1.3, percentile 1, gpfq2022 with 0)."""
    from gpfq.network import settings_for

    def settings_of(index, name, layer):
        return settings_for(layer, bits, method, "gpfq2022", True, 1.3, 1.3, 1.0, 1.0, engine=engine)
    return settings_of


def quantize_default(m: int, chunk_size: int, engine="auto", shard=None, method="gpfq", calibration="fresh",
                     rule=None):
    """Quantize fashion_resnet (seed 0, retain_rate 0.25) with the default settings; returns
    (model, reports, {layer name: (Q, summed statistics as float64 tensors)})."""
    from gpfq.data import CalibrationStream, calibration_set
    from gpfq.models import load_model
    from gpfq.network import quantize_network
    if rule is not None:
        from gpfq import distributed
        shard = distributed.Shard(rule=rule)
    layers = {}

    def keep(step):
        s = step.statistics
        sums = None if s is None else (s.cross.clone(), s.quantized_gram.clone(), s.analog_output_norm2.clone())
        layers[step.report.name] = (step.quantized_weight.clone(), sums)

    stream = CalibrationStream(calibration_set("fashion_mnist"), 0, chunk_size=chunk_size)
    model, reports = quantize_network(load_model("fashion_resnet"), stream, default_settings(engine, method), m,
                                      0.25, 0, after_layer=keep, keep_rows=False, log=lambda *a: None,
                                      calibration=calibration, shard=shard)
    return model, reports, layers


def quantize_worker(rank, world_size, port, m, chunk_size, out, engine="auto", method="gpfq", calibration="fresh",
                    rule="rank0"):
    """One rank of a distributed quantization of the default model; rank 0 saves Q and sums to `out`."""
    join(rank, world_size, port)
    try:
        _, reports, layers = quantize_default(m, chunk_size, engine, method=method, calibration=calibration,
                                              rule=rule)
        if rank == 0:
            torch.save({"layers": layers, "reports": [r.relative_error for r in reports]}, out)
        elif rank == 1:
            torch.save({"layers": layers}, str(out) + ".rank1")
    finally:
        dist.destroy_process_group()
