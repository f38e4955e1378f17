"""Calibration across processes (gpfq.pipeline.distributed) against one process, on gloo on this machine.

The ranks are started from the tests (torch.multiprocessing, or a torchrun subprocess for the
scripts), one torch thread each, on the default model with a small m.
"""
import os

import pytest
import torch

from gpfq.pipeline import distributed
from gpfq.pipeline.streams import CalibrationStream

from distributed_workers import finish, quantize_default, run_ranks, start_script_ranks

M = 64  # calibration images per layer: 2 ranks × one chunk of 32


def shard_of(rank, world_size):
    shard = distributed.Shard(group=False)
    shard.rank, shard.world_size = rank, world_size
    return shard


def test_tuple_and_dict_inputs_are_shared_out_across_ranks():
    """A caller's tuple and dict inputs: under torch.distributed each rank keeps its share of the m inputs one
    process draws, for both forms."""
    from torch.utils.data import DataLoader
    from helpers import user_data_stream as calibration_stream
    from gpfq.pipeline.inputs import cat

    def shard(rank):
        shard = distributed.Shard(group=False)
        shard.rank, shard.world_size = rank, 3
        return shard
    a = torch.arange(90.0).reshape(90, 1)
    for make in (lambda: DataLoader([((x, -x), 0) for x in a], batch_size=8), lambda: {"a": a, "b": -a}):
        single = calibration_stream(make(), seed=0)
        ranks = [distributed.ShardedStream(calibration_stream(make(), seed=0), shard(r)) for r in range(3)]
        for _ in range(3):
            expected, shared = cat(single.draw(40)), cat([cat(rank.draw(40)) for rank in ranks])
            a_of, b_of = ((lambda x: x.args[0]), (lambda x: x.args[1])) if expected.args else \
                ((lambda x: x.kwargs["a"]), (lambda x: x.kwargs["b"]))
            assert shared.shape == (40,) and torch.equal(a_of(shared), a_of(expected))
            assert torch.equal(b_of(shared), -a_of(shared))  # each a still paired with its own b


@pytest.mark.parametrize("world_size, m", [(2, 64), (3, 50), (4, 7), (5, 3)])  # (5, 3): two ranks get none
def test_shares_cover_the_single_process_draw(world_size, m):
    """Layer after layer, the ranks' shares, in rank order, are the images one process draws."""
    data = torch.utils.data.TensorDataset(torch.arange(500.0).reshape(500, 1), torch.zeros(500))
    single = CalibrationStream(data, 3, chunk_size=16)
    streams = [distributed.ShardedStream(CalibrationStream(data, 3, chunk_size=16), shard_of(r, world_size))
               for r in range(world_size)]
    for _ in range(12):  # 12·m > 500: the shuffle wraps into a second epoch
        expected = torch.cat(single.draw(m)).flatten()
        shares = [torch.cat(s.draw(m)).flatten() if m * (r + 1) // world_size > m * r // world_size else
                  torch.empty(0) for r, s in enumerate(streams)]
        assert [len(s) for s in shares] == [m * (r + 1) // world_size - m * r // world_size
                                            for r in range(world_size)]
        assert torch.equal(torch.cat(shares), expected)


@pytest.mark.parametrize("before", [16, 40, 530])  # a whole chunk, a chunk and a half, past the first epoch
def test_shares_continue_a_stream_that_was_already_drawn(before):
    """gpfq.quantize draws act_bits' calibration images before the layer loop shards the stream: the shares
    go on from where one process's stream is (mid-epoch, with part of a chunk pending)."""
    data = torch.utils.data.TensorDataset(torch.arange(500.0).reshape(500, 1), torch.zeros(500))
    single = CalibrationStream(data, 3, chunk_size=16)
    single.draw(before)
    streams = []
    for rank in range(2):
        stream = CalibrationStream(data, 3, chunk_size=16)
        stream.draw(before)
        streams.append(distributed.ShardedStream(stream, shard_of(rank, 2)))
    for _ in range(10):
        expected = torch.cat(single.draw(50)).flatten()
        assert torch.equal(torch.cat([torch.cat(s.draw(50)).flatten() for s in streams]), expected)


@pytest.mark.parametrize("world_size, m", [(2, 64), (3, 50)])
def test_a_dataloader_is_shared_out_in_its_own_order(world_size, m):
    """gpfq.quantize's stream of a user's DataLoader: each rank keeps its share of the m images one process
    takes, layer after layer, in the loader's order."""
    from helpers import user_data_stream as calibration_stream
    data = torch.utils.data.TensorDataset(torch.arange(300.0).reshape(300, 1), torch.zeros(300))
    loader = torch.utils.data.DataLoader(data, batch_size=32)  # the same order on every rank
    single = calibration_stream(loader, seed=0)
    streams = [distributed.ShardedStream(calibration_stream(loader, seed=0), shard_of(r, world_size))
               for r in range(world_size)]
    for _ in range(8):  # 8·m > 300: the loader is cycled
        expected = torch.cat(single.draw(m)).flatten()
        assert torch.equal(torch.cat([torch.cat(s.draw(m)).flatten() for s in streams]), expected)


def q_agreement(a, b):
    """Fraction of equal entries over all layers, and the layers whose Q differ while the sums agree bit for bit."""
    equal = total = 0
    exact_but_different = []
    for name, (q, sums) in a["layers"].items():
        q_b, sums_b = b["layers"][name]
        equal += int((q == q_b).sum())
        total += q.numel()
        if sums is not None and sums_b is not None and all(torch.equal(x, y) for x, y in zip(sums, sums_b)):
            if not torch.equal(q, q_b):
                exact_but_different.append(name)
    return equal / total, exact_but_different


def sums_agree(a, b):
    """The layers whose summed statistics are equal bit for bit in a and b (layers with sums in both)."""
    return [name for name, (_, sums) in a["layers"].items() if sums is not None and b["layers"][name][1] is not None
            and all(torch.equal(x, y) for x, y in zip(sums, b["layers"][name][1]))]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """2 gloo ranks calling gpfq.quantize in their process group (Q on rank 0, broadcast), m = 64 in chunks
    of 32: GPFQ (engine 'auto': rows gathered for the residual form, sums all-reduced for the Gram form)
    fresh and fixed, GPFQ's Gram form (sums all-reduced; at m = 64 'auto' takes the residual form on every layer
    of the default model), GPTQ and Qronos (float64 sums) from sums, and GPFQ with 8-bit activations."""
    runs = [dict(m=M, chunk_size=32), dict(m=M, chunk_size=32, calibration="fixed"), dict(m=M, chunk_size=32, engine="gram"),
            dict(m=M, chunk_size=32, engine="gram", method="gptq"),
            dict(m=M, chunk_size=32, engine="gram", method="qronos"),
            dict(m=M, chunk_size=32, act_bits=8)]  # activation scales drawn first: the ranks go on from there
    return runs, run_ranks(2, runs, tmp_path_factory.mktemp("two_ranks") / "q")


@pytest.mark.slow  # process groups on the default model
def test_two_ranks_equal_one_process_bit_for_bit(two_ranks):
    """Each rank's share is one chunk of one process's draw, so the float64 sums are a + b on both sides and
    the gathered rows are one process's rows: Q is equal bit for bit, in fresh and fixed mode, for GPFQ
    (residual and Gram forms, as one process chooses them), GPTQ and Qronos."""
    runs, ranks = two_ranks
    for run, distributed_result in zip(runs, ranks[0]):
        single = quantize_default(**run)
        assert distributed_result["forms"] == single["forms"], run
        streamed = [name for name, (_, sums) in single["layers"].items() if sums is not None]
        assert sums_agree(single, distributed_result) == streamed, run
        if run.get("engine") == "gram":  # every layer from all-reduced sums
            assert len(streamed) == len(single["layers"]), run
        else:  # 'auto': every layer from gathered rows here
            assert set(single["forms"]) == {"residual"}, (run, single["forms"])
        fraction, different = q_agreement(single, distributed_result)
        assert fraction == 1.0 and different == [], run
        # (the relative errors agree to rounding: ‖XWᵀ − X̃Qᵀ‖ over rows cut from a gathered buffer)
        assert distributed_result["errors"] == pytest.approx(single["errors"], rel=1e-12), run
    for run, rank0, rank1 in zip(runs, ranks[0], ranks[1]):  # every rank holds the same Q and sums
        assert q_agreement(rank0, rank1) == (1.0, [])
        assert sums_agree(rank0, rank1) == [name for name, (_, sums) in rank0["layers"].items() if sums is not None]


@pytest.mark.slow  # process groups on the default model
def test_two_ranks_against_the_default_engine(two_ranks):
    """Against one process as it runs by default (engine 'auto': the residual form on some layers,
    chunks of 256), Q agrees on at least 99.9 % of the entries."""
    _, ranks = two_ranks
    single = quantize_default(M, 256)
    fraction, _ = q_agreement(single, ranks[0][0])
    assert "residual" in single["forms"]  # the default really computes some layers from rows
    assert fraction >= 0.999


@pytest.mark.slow
def test_three_ranks_uneven_m(tmp_path):
    """3 ranks (every rank runs the rule), m = 50 (shares 16, 17, 17): Q of one process on ≥ 99.9 % of the
    entries, exactly where the sums agree bit for bit, and the same Q on every rank. (SPFQ is compared in the
    Gram form on both sides: at m = 50 its layer stages.2.conv2 has fewer rows than columns, and one flipped
    weight there changes 20 % of the next layers' Q even between one process's two engine forms.)"""
    runs = [dict(m=50, chunk_size=256, engine="gram"), dict(m=50, chunk_size=256, method="spfq", engine="gram")]
    ranks = run_ranks(3, runs, tmp_path / "q", rule="every")
    for run, result in zip(runs, ranks[0]):
        single = quantize_default(**run)
        fraction, different = q_agreement(single, result)
        assert fraction >= 0.999 and different == [], run
        for other in ranks[1:]:
            assert q_agreement(result, other[runs.index(run)]) == (1.0, [])


# ---------------------------------------------------------------- the scripts on several ranks
def script_args(tmp_path, *extra, m=16):
    return ["--batch_size", m, "--num_threads", 1, "--log_dir", tmp_path / "logs", "--model_dir", tmp_path / "models",
            *extra]


def written_files(tmp_path):
    """Every file under the run's log and model folders (temporary ones included)."""
    return sorted(str(p) for folder in ("logs", "models") if (tmp_path / folder).exists()
                  for p in (tmp_path / folder).rglob("*") if p.is_file())


@pytest.mark.slow  # process groups on the default model
def test_mismatched_bits_stop_every_rank_before_any_work(tmp_path):
    """Ranks started with different --bits: every rank stops with one message naming the difference, before
    anything loads or any folder is made."""
    processes = start_script_ranks(2, lambda rank: script_args(tmp_path, "--bits", 4 if rank == 0 else 3))
    for code, output in finish(processes, timeout=300):
        assert code != 0
        assert "the ranks were started with different settings: rank 1 has bits=3 where rank 0 has bits=4" in output
        assert "float model" not in output  # nothing was evaluated
    assert not (tmp_path / "logs").exists() and not (tmp_path / "models").exists()


KILL_RANK_1_IN_LAYER_3 = """
import signal
if os.environ["RANK"] == "1":
    from gpfq.pipeline.calibrator import Calibrator
    original = Calibrator.sharded_rows

    def dying(calibrator, layer, settings, input_pairs, label):
        if label.startswith("layer 3 "):
            next(iter(input_pairs))  # mid-layer: after the first chunk's forward passes
            os.kill(os.getpid(), signal.SIG{signal})
        return original(calibrator, layer, settings, input_pairs, label)
    Calibrator.sharded_rows = dying
"""


@pytest.mark.slow  # process groups on the default model
def test_killed_rank_ends_the_run_with_its_name(tmp_path):
    """Rank 1 is killed in the middle of layer 3: rank 0 stops at its next collective with a message naming
    rank 1 and where it stopped; no log row and no model (not even a temporary file) is left."""
    processes = start_script_ranks(2, lambda rank: script_args(tmp_path),
                                   prelude=KILL_RANK_1_IN_LAYER_3.replace("{signal}", "KILL"))
    (code0, output0), (code1, _) = finish(processes, timeout=300)
    assert code1 == -9
    assert code0 != 0
    assert "rank 1 stopped after 'layer 2 (stages.0.conv1)" in output0, output0[-3000:]
    assert "[2/10] stages.0.conv1" in output0 and "[3/10]" not in output0
    assert written_files(tmp_path) == []


@pytest.mark.slow
def test_hung_rank_ends_the_run_after_the_timeout(tmp_path):
    """Rank 1 stops (SIGSTOP) in layer 3: with GPFQ_DIST_TIMEOUT=10, rank 0 gives up at its next collective
    and names rank 1; nothing is written."""
    processes = start_script_ranks(2, lambda rank: script_args(tmp_path), env={"GPFQ_DIST_TIMEOUT": "10"},
                                   prelude=KILL_RANK_1_IN_LAYER_3.replace("{signal}", "STOP"))
    try:
        out, err = processes[0].communicate(timeout=300)
    finally:
        processes[1].kill()
        out1, err1 = processes[1].communicate()
    assert processes[0].returncode != 0
    assert "rank 1 stopped after 'layer 2 (stages.0.conv1)" in out + err, (out + err)[-3000:]
    assert "layers:" in err and "layers:" not in out1 + err1  # one progress bar: rank 0's
    assert written_files(tmp_path) == []


@pytest.mark.slow
def test_torchrun_two_ranks_one_row_and_resume(tmp_path, default_data):
    """`torchrun --nproc_per_node 2` on the plain script (m = 64): one row, with World Size 2 and Backend gloo;
    the float top-1 is exactly one process's (sharded counts), the quantized top-1 within 0.05 points of one
    process's and Q equal on ≥ 99.9 % of the entries; --resume then runs nothing."""
    import subprocess
    import sys
    from gpfq.io.models import load_saved_model
    from helpers import logged_rows as read_rows
    from helpers import scored
    from gpfq.paths import REPO_ROOT
    _, evaluation, model = default_data
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "quantization_scripts" / "quantize.py"), *map(str, script_args(tmp_path, m=M))]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(tmp_path / "logs" / "Quantization_Log.csv")
    assert len(rows) == 1 and rows[0]["World Size"] == "2" and rows[0]["Backend"] == "gloo"
    row = rows[0]

    single = quantize_default(M, 256)  # one thread, as each rank ran
    loader = torch.utils.data.DataLoader(evaluation, batch_size=256)
    float_top1, _ = scored(model, loader)
    quantized = load_saved_model(REPO_ROOT / row["Model File"] if not os.path.isabs(row["Model File"])
                                 else row["Model File"], model)
    distributed_q = {name: module.weight for name, module in quantized.named_modules() if name in single["layers"]}
    equal = sum(int((distributed_q[n].reshape(q.shape) == q).sum()) for n, (q, _) in single["layers"].items())
    total = sum(q.numel() for q, _ in single["layers"].values())
    single_top1, _ = scored(copy_with_weights(model, single), loader)
    assert float(row["Original Top1 Accuracy"]) == round(float_top1, 6)
    assert equal / total >= 0.999
    assert abs(float(row["Quantized Top1 Accuracy"]) - single_top1) <= 0.0005

    done = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resume: 1 of 1 grid points are already in" in done.stdout
    assert len(read_rows(tmp_path / "logs" / "Quantization_Log.csv")) == 1


def copy_with_weights(model, result):
    """A copy of `model` with the quantized weights of `result` (quantize_default's)."""
    import copy
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for name, (q, _) in result["layers"].items():
            layer = quantized.get_submodule(name)
            layer.weight.copy_(q.reshape(layer.weight.shape))
    return quantized
