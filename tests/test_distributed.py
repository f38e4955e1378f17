"""Calibration across processes (gpfq.distributed) against one process, on gloo on this machine.

The ranks are started from the tests (torch.multiprocessing, or a torchrun subprocess for the
scripts), one torch thread each, on the default model with a small m.
"""
import torch
import pytest

from gpfq import distributed
from gpfq.data import CalibrationStream

from distributed_workers import quantize_default, run_ranks

M = 64  # calibration images per layer: 2 ranks × one chunk of 32


def shard_of(rank, world_size):
    shard = distributed.Shard(group=False)
    shard.rank, shard.world_size = rank, world_size
    return shard


@pytest.mark.parametrize("world_size, m", [(2, 64), (3, 50), (4, 7)])
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
    """2 gloo ranks (Q on rank 0, broadcast), m = 64 in chunks of 32: GPFQ (engine 'auto': rows gathered for
    the residual form, sums all-reduced for the Gram form) fresh and fixed, GPTQ from sums."""
    runs = [dict(m=M, chunk_size=32), dict(m=M, chunk_size=32, calibration="fixed"),
            dict(m=M, chunk_size=32, engine="gram", method="gptq")]
    return runs, run_ranks(2, runs, tmp_path_factory.mktemp("two_ranks") / "q")


def test_two_ranks_equal_one_process_bit_for_bit(two_ranks):
    """Each rank's share is one chunk of one process's draw, so the float64 sums are a + b on both sides and
    the gathered rows are one process's rows: Q is equal bit for bit, in fresh and fixed mode, for GPFQ
    (residual and Gram forms, as one process chooses them) and GPTQ."""
    runs, ranks = two_ranks
    for run, distributed_result in zip(runs, ranks[0]):
        single = quantize_default(**run)
        assert distributed_result["forms"] == single["forms"], run
        streamed = [name for name, (_, sums) in single["layers"].items() if sums is not None]
        assert streamed and sums_agree(single, distributed_result) == streamed, run
        fraction, different = q_agreement(single, distributed_result)
        assert fraction == 1.0 and different == [], run
        # (the relative errors agree to rounding: ‖XWᵀ − X̃Qᵀ‖ over rows cut from a gathered buffer)
        assert distributed_result["errors"] == pytest.approx(single["errors"], rel=1e-12), run
    for run, rank0, rank1 in zip(runs, ranks[0], ranks[1]):  # every rank holds the same Q and sums
        assert q_agreement(rank0, rank1) == (1.0, [])
        assert sums_agree(rank0, rank1) == [name for name, (_, sums) in rank0["layers"].items() if sums is not None]


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
