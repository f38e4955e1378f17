"""Worker processes for tests/test_distributed.py, forked from the tests' script server (helpers.ForkedProcess)."""
import datetime
import os
import signal

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


def quantize_default(m: int, chunk_size: int, engine="auto", method="gpfq", calibration="fresh", shard=None,
                     calibration_set=None, act_bits=None):
    """Quantize fashion_resnet with gpfq.QuantConfig's defaults (the plain script's: 4 bits, C = 1.3, seed 0,
    retain_rate 0.25) at m images per layer, chunks of `chunk_size`, one torch thread. With `shard`, through
    the network loop with that Shard; else through gpfq.quantize (which finds an initialized process group).
    Returns {"layers": {name: (Q, summed (X̃ᵀX, X̃ᵀX̃, ||XWᵀ||²) or None)}, "errors": [...], "forms": [...]}."""
    import gpfq
    from gpfq.io.data import calibration_set as load_calibration
    from gpfq.pipeline.streams import CalibrationStream
    from gpfq.io.models import load_model
    from gpfq.pipeline.network import Calibration, Hooks, quantize_network
    layers = {}

    def keep(step):
        s = step.statistics
        sums = None if s is None else (s.cross.clone(), s.quantized_gram.clone(), s.analog_output_norm2.clone())
        layers[step.report.name] = (step.quantized_weight.clone(), sums)

    data = load_calibration("fashion_mnist") if calibration_set is None else calibration_set
    stream = CalibrationStream(data, 0, chunk_size=chunk_size)
    config = gpfq.QuantConfig(batch_size=m, engine=engine, method=method, calibration=calibration, act_bits=act_bits)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every rank runs: float sums of products depend on the thread count
    try:
        if shard is None:
            reports = gpfq.quantize(load_model("fashion_resnet"), stream, config, after_layer=keep,
                                    log=lambda *a: None).reports
        else:
            _, reports = quantize_network(load_model("fashion_resnet"), stream, config.for_layer,
                                          Calibration(m, config.retain_rate, config.seed, mode=calibration,
                                                       keep_rows=False, shard=shard),
                                          Hooks(log=lambda *a: None, after_layer=keep))
    finally:
        torch.set_num_threads(threads)
    return {"layers": layers, "errors": [r.relative_error for r in reports], "forms": [r.form for r in reports]}


def quantize_worker(rank, world_size, port, runs, out, rule=None):
    """One rank: quantize the default model for each run (kwargs of quantize_default), through gpfq.quantize
    in the process group (rule None) or with Shard(rule=rule); saves [result per run] to <out>.rank<r>."""
    from gpfq.pipeline import distributed
    from gpfq.io.data import calibration_set
    join(rank, world_size, port)
    try:
        shard = None if rule is None else distributed.Shard(rule=rule)
        data = calibration_set("fashion_mnist")
        results = [quantize_default(**run, shard=shard, calibration_set=data) for run in runs]
        torch.save(results, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, runs, out, rule=None) -> list:
    """Start `world_size` gloo ranks on this machine (processes forked from the tests' script server) doing `runs`;
    every rank's results."""
    import sys
    from conftest import TESTS_DIR, python_env
    from helpers import ForkedProcess
    torch.save(runs, f"{out}.runs")
    code = ("import sys, torch\nfrom distributed_workers import quantize_worker\n"
            f"quantize_worker(int(sys.argv[1]), {world_size}, {free_port()}, torch.load({f'{out}.runs'!r}), "
            f"{str(out)!r}, {rule!r})\n")
    ranks = [ForkedProcess([sys.executable, "-c", code, str(rank)], env=python_env(TESTS_DIR))
             for rank in range(world_size)]
    for rank, process in enumerate(ranks):
        _, err = process.communicate(timeout=900)
        if process.returncode != 0:
            raise RuntimeError(f"rank {rank} failed ({process.returncode}):\n{err[-3000:]}")
    return [torch.load(f"{out}.rank{rank}") for rank in range(world_size)]


def start_script_ranks(world_size: int, argv_of, env=None, prelude: str = "", script="quantization_scripts"):
    """Start `world_size` processes of <script>/quantize.py with the environment torchrun gives its workers
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), without torchrun's agent, so each rank's exit and
    output are its own. argv_of(rank) -> the rank's command-line arguments; `prelude`: Python run first
    in every rank (it sees RANK). Returns the processes (helpers.ForkedProcess, Popen's surface)."""
    import sys
    from gpfq.paths import REPO_ROOT
    from helpers import ForkedProcess
    port = free_port()
    processes = []
    for rank in range(world_size):
        rank_env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                        OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **(env or {}))
        code = (f"import os, runpy, sys\n{prelude}\n"
                f"sys.argv = [{str(REPO_ROOT / script / 'quantize.py')!r}] + {list(map(str, argv_of(rank)))!r}\n"
                f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
        # Ctrl-C as a terminal gives it (interrupt): a shell without job control (CI, `make test &`) starts its
        # background jobs with SIGINT ignored, which the ranks would inherit, and Python then never raises
        # KeyboardInterrupt.
        processes.append(ForkedProcess([sys.executable, "-c", code], env=rank_env, cwd=REPO_ROOT, interrupt=True))
    return processes


def finish(processes, timeout=300):
    """(return code, stdout + stderr) of each process, in rank order."""
    results = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        results.append((process.returncode, out + err))
    return results
