"""Calibration across processes on torch.distributed (data parallel per layer).

Started by `torchrun` (or inside a process group the caller initialized), every rank runs the
same layer loop. For each layer:

- the layer's m calibration images are drawn exactly as one process draws them (same seed, same
  order), and rank r takes the contiguous share [r·m/W, (r+1)·m/W) of them (`ShardedStream`);
- each rank runs its share through both networks and forms its rows with the patch indices one
  process would give those images;
- the layer takes the form one process would give it (`calibrator.layer_form` on all m images'
  rows). A streamed layer (the Gram form) adds the rows into float64 `GramStatistics`, which are
  all-reduced, so every rank holds the sums of all m images. A layer computed from rows (the
  residual form, GPTQ from rows, the per-column loop, or `after_layer` hooks that asked for rows)
  gathers every rank's rows in rank order, which is the single-process row order: the residual
  form is chosen exactly where rows are small next to N0², so their gather is also the cheaper
  message;
- the layer rule runs on rank 0, which broadcasts Q ('rank0', the default), or on every rank
  ('every'). `benchmarks/bench_distributed.py` measures both.

What is exact: the draw, the patch indices and every rank's rows are those of one process (with
the same thread count), so gathered layers give one process's Q. Summed layers are not bit for
bit: float64 addition in another order (chunks per rank, then the all-reduce) rounds differently,
so a weight whose argument lies within rounding of a midpoint between two levels can round the
other way, and later layers see that. With 2 ranks whose shares are one chunk each, the sums
(a + b on both sides) and so Q are bit for bit those of one process with that chunk size.

Faults: every collective is labelled and recorded in the rendezvous store, so when one fails
(a peer died, or did not answer within the process group's timeout) the message names the rank
that stopped and where. Errors raised on some ranks inside `Shard.step` reach every rank, which
all raise the same `DistributedError`. The layer's share of rows is formed in `calibrator.Calibrator.sharded_rows`.
"""
import atexit
import contextlib
import datetime
import hashlib
import json
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from gpfq.pipeline.streams import CalibrationStream
from gpfq.methods.gpfq.engine import GramStatistics
from gpfq.errors import GPFQError
from gpfq.pipeline.inputs import as_inputs, cat

RULE_PLACES = ("rank0", "every")  # where the layer rule runs: rank 0 then broadcast Q, or every rank
DEFAULT_TIMEOUT_SECONDS = 1800  # a rank that does not answer a collective for this long is taken as hung
TIMEOUT_VARIABLE = "GPFQ_DIST_TIMEOUT"  # seconds; overrides DEFAULT_TIMEOUT_SECONDS at launch
# Point keys that may differ between ranks without changing the result (machine-local settings).
LOCAL_KEYS = ("data_dir", "log_dir", "model_dir", "num_workers", "num_threads", "author")


# Collectives this process has entered, over every Shard: every rank enters the same sequence, so a rank
# whose count (in the store) is behind this one's has stopped.
_COLLECTIVES = [0]


class DistributedError(GPFQError, RuntimeError):
    """A rank failed, died or hung, or the ranks were started with different settings (the scripts print its
    message alone, exit status 1)."""


def backend_for(device) -> str:
    """gloo for CPU tensors, NCCL for CUDA."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def launch(device="cpu") -> "Shard":
    """The Shard of this process: the initialized default process group, or one initialized here
    when torchrun started several processes (WORLD_SIZE > 1), or SINGLE for one process.

    Under torchrun, SIGTERM (sent to the other ranks when one fails) becomes SystemExit, so the
    temporary files of an unfinished save are removed.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    seconds = float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_SECONDS))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # Close the group before the interpreter tears down: a gloo group left to static destruction can abort the
    # process ("terminate called without an active exception", SIGABRT) when a rank exits right away.
    atexit.register(_close_group)
    return current()


def _close_group():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def threads_per_rank() -> int:
    """Torch threads for this process when num_threads is None.

    One process: OMP_NUM_THREADS when it is set (by the user or a job scheduler, as torch itself reads it),
    otherwise the cores this process may run on. Under torchrun: those cores shared among the ranks on this
    machine (LOCAL_WORLD_SIZE); OMP_NUM_THREADS is not read there, because torchrun sets it to 1 on its own.
    The cores are the CPU affinity (a container, `taskset` or a scheduler narrows it), not os.cpu_count():
    more threads than cores make OpenMP's threads wait on each other, 3× the CPU time here.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks = os.environ.get("LOCAL_WORLD_SIZE")
    if ranks is None:
        requested = os.environ.get("OMP_NUM_THREADS", "").strip()
        if requested.isdigit() and int(requested) >= 1:
            return int(requested)
        return max(1, cores)
    return max(1, cores // int(ranks))


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def current(group=None) -> "Shard":
    """The Shard of `group` (default: the default process group) if one is initialized, else SINGLE."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    if dist.get_world_size(group) == 1:
        return SINGLE
    return Shard(group)


class Shard:
    """This process's place among the ranks, and the collectives the layer loop needs.

    rank, world_size, backend; `communication_seconds` totals the time spent in collectives
    (waiting for slower ranks included).
    """

    def __init__(self, group=None, rule="rank0"):
        if rule not in RULE_PLACES:
            raise ValueError(f"rule must be one of {RULE_PLACES}, got {rule!r}")
        self.group = group
        self.rule = rule
        self.communication_seconds = 0.0
        if group is False:  # SINGLE
            self.rank, self.world_size, self.backend, self._store = 0, 1, "", None
            return
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        try:
            self._store = dist.distributed_c10d._get_default_store()
        except (RuntimeError, AttributeError, ValueError):
            self._store = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def writer(self) -> bool:
        """Only rank 0 writes logs and models."""
        return self.rank == 0

    def span(self, n: int):
        """This rank's contiguous share [lo, hi) of n items; the shares of ranks 0 … W−1 cover 0 … n−1 in order."""
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size

    # ------------------------------------------------------------ collectives, labelled
    def _mark(self, label: str) -> None:
        _COLLECTIVES[0] += 1
        if self._store is not None:
            try:
                self._store.set(f"gpfq/at/{self.rank}", f"{_COLLECTIVES[0]}\t{label}")
            except Exception:  # noqa: BLE001  a store that is gone shows up in the collective itself
                pass

    @contextlib.contextmanager
    def _collective(self, label: str):
        """Time a collective; turn its failure into a DistributedError naming the rank that stopped."""
        self._mark(label)
        start = time.perf_counter()
        try:
            yield
        except DistributedError:
            raise
        except Exception as error:  # noqa: BLE001  gloo/NCCL raise RuntimeError, DistBackendError, …
            raise DistributedError(self._diagnose(label, error)) from error
        finally:
            self.communication_seconds += time.perf_counter() - start

    def _diagnose(self, label: str, error: Exception) -> str:
        """Which rank stopped: one that recorded an error, else one behind this rank's collective count."""
        text = str(error).splitlines()[0] if str(error) else ""
        cause = f"({type(error).__name__}: {text.split('. ')[0][-200:]})"  # gloo's first sentence says what broke
        here = f"rank {self.rank} of {self.world_size}: {label} failed"
        if self._store is None:
            return f"{here}: a rank died or did not answer {cause}"
        try:
            for rank in range(self.world_size):
                key = f"gpfq/error/{rank}"
                if rank != self.rank and self._store.check([key]):
                    return f"{here} because rank {rank} failed: {self._store.get(key).decode()}"
            behind = []
            for rank in range(self.world_size):
                key = f"gpfq/at/{rank}"
                if rank == self.rank:
                    continue
                if not self._store.check([key]):
                    behind.append((rank, "before its first collective"))
                    continue
                count, where = self._store.get(key).decode().split("\t", 1)
                if int(count) < _COLLECTIVES[0]:
                    behind.append((rank, f"after '{where}'"))
        except Exception:  # noqa: BLE001  the store itself is unreachable
            return (f"{here}: the rendezvous store is unreachable, so the rank hosting it (rank 0 when started "
                    f"without torchrun) died {cause}")
        if behind:
            names = "; ".join(f"rank {rank} stopped {where}" for rank, where in behind)
            return f"{here}: {names} (it died, or hung past the timeout) {cause}"
        return f"{here}: a rank died or did not answer {cause}"

    def record_error(self, error: BaseException) -> None:
        """Leave this rank's error in the store, where the other ranks' diagnosis finds it."""
        if self._store is not None and self.active:
            try:
                self._store.set(f"gpfq/error/{self.rank}", f"{type(error).__name__}: {error}")
            except Exception:  # noqa: BLE001
                pass

    def all_gather_object(self, value, label: str) -> list:
        """Every rank's `value` (small, picklable), in rank order."""
        gathered = [None] * self.world_size
        with self._collective(label):
            dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def broadcast_object(self, value, label: str, source: int = 0):
        """Rank `source`'s `value` on every rank."""
        box = [value]
        with self._collective(label):
            dist.broadcast_object_list(box, src=source, group=self.group)
        return box[0]

    def broadcast_(self, tensor: torch.Tensor, label: str, source: int = 0) -> torch.Tensor:
        with self._collective(label):
            dist.broadcast(tensor, src=source, group=self.group)
        return tensor

    def all_reduce_(self, tensor: torch.Tensor, label: str) -> torch.Tensor:
        """Sum over the ranks, in place."""
        with self._collective(label):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    # ------------------------------------------------------------ agreement
    @contextlib.contextmanager
    def step(self, label: str):
        """Run the enclosed local work; then every rank learns whether any rank failed in it. A rank that
        failed raises its own error; the others raise a DistributedError naming the first rank that failed
        and its message. So no rank is left waiting in a later collective."""
        if not self.active:
            yield
            return
        failure = None
        try:
            yield
        except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001  reported to every rank below
            failure = error
        messages = self.all_gather_object(None if failure is None else f"{type(failure).__name__}: {failure}",
                                          f"{label} (checking every rank finished it)")
        failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
        if failure is not None:  # this rank's own error (bad input fails the same way on every rank)
            raise failure
        if failed:
            rank, text = failed[0]
            if text.startswith("KeyboardInterrupt"):  # Ctrl-C on another rank: stop as that rank does, quietly
                raise KeyboardInterrupt
            raise DistributedError(f"rank {rank} of {self.world_size} failed in {label}: {text}")

    def check_same(self, settings: dict, label: str = "comparing the ranks' settings") -> None:
        """DistributedError on every rank, naming the ranks and keys, unless every rank has the same
        `settings` (machine-local keys aside). Compares a SHA-256 of the settings first."""
        if not self.active:
            return
        shared = {k: v for k, v in settings.items() if k not in LOCAL_KEYS}
        digest = settings_digest(shared)
        digests = self.all_gather_object(digest, label)
        if len(set(digests)) == 1:
            return
        every = self.all_gather_object(shared, label + " (finding the difference)")
        differences = []
        for rank in range(1, self.world_size):
            keys = sorted(k for k in set(every[0]) | set(every[rank]) if every[0].get(k) != every[rank].get(k))
            if keys:
                differences.append(f"rank {rank} has " + ", ".join(f"{k}={every[rank].get(k)!r}" for k in keys)
                                   + " where rank 0 has " + ", ".join(f"{k}={every[0].get(k)!r}" for k in keys))
        raise DistributedError("the ranks were started with different settings: " + "; ".join(differences)
                               + ". Start every rank with the same command line.")

    # ------------------------------------------------------------ the layer's data
    def stream(self, stream: CalibrationStream) -> "ShardedStream":
        return ShardedStream(stream, self)

    def all_reduce_statistics(self, statistics: GramStatistics, label: str) -> GramStatistics:
        """Sum every rank's statistics into each rank's (in place, float64)."""
        self.all_reduce_(statistics.cross, f"{label}: all-reduce X̃ᵀX")
        self.all_reduce_(statistics.quantized_gram, f"{label}: all-reduce X̃ᵀX̃")
        small = torch.cat([statistics.analog_sum.flatten(), statistics.quantized_sum.flatten(),
                           statistics.analog_output_norm2.reshape(1), statistics.analog_square_sum.reshape(1),
                           torch.tensor([float(statistics.rows)], dtype=statistics.cross.dtype,
                                        device=statistics.cross.device)])
        self.all_reduce_(small, f"{label}: all-reduce column sums and row count")
        n = statistics.analog_sum.numel()
        statistics.analog_sum.copy_(small[:n].reshape(statistics.analog_sum.shape))
        statistics.quantized_sum.copy_(small[n:2 * n].reshape(statistics.quantized_sum.shape))
        statistics.analog_output_norm2.copy_(small[2 * n])
        statistics.analog_square_sum.copy_(small[2 * n + 1])
        statistics.rows = int(small[2 * n + 2])
        return statistics

    def gather_rows(self, rows: torch.Tensor, label: str) -> torch.Tensor:
        """Every rank's rows (n_r, width), concatenated in rank order: (Σ n_r, width) on every rank."""
        counts = self.all_gather_object(int(rows.shape[0]), f"{label}: row counts")
        padded = torch.zeros(max(counts), rows.shape[1], dtype=rows.dtype, device=rows.device)
        padded[:rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in counts]
        with self._collective(f"{label}: all-gather rows"):
            dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:count] for part, count in zip(parts, counts)])

    def run_rule(self, compute, like: torch.Tensor, label: str) -> torch.Tensor:
        """Q from `compute()`: on rank 0 and broadcast ('rank0'), or on every rank ('every').

        `like`: a tensor of Q's shape, dtype and device (the layer's grouped weight).
        """
        if not self.active or self.rule == "every":
            return compute()
        if self.rank != 0:
            return self.broadcast_(torch.empty_like(like), f"{label}: broadcast Q")
        try:  # one collective per layer: a failure here reaches the others through the store and the broken broadcast
            quantized = compute()
        except BaseException as error:
            self.record_error(error)
            raise
        return self.broadcast_(quantized.contiguous(), f"{label}: broadcast Q")

    def agree_on(self, tensor: torch.Tensor, label: str) -> torch.Tensor:
        """Rank 0's `tensor` on every rank (with rule 'rank0'); unchanged with 'every'."""
        if not self.active or self.rule == "every":
            return tensor
        return self.broadcast_(tensor.contiguous(), label)

    def evaluation_loader(self, loader: DataLoader) -> DataLoader:
        """A loader over this rank's contiguous share of `loader`'s dataset (same batch size and workers)."""
        lo, hi = self.span(len(loader.dataset))
        return DataLoader(Subset(loader.dataset, range(lo, hi)), batch_size=loader.batch_size,
                          num_workers=loader.num_workers)


SINGLE = Shard(group=False)  # one process: no collectives, every share is everything


def settings_digest(settings: dict) -> str:
    """SHA-256 of settings as sorted JSON (values without a JSON form by their str)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class _Positions(Dataset):
    """Dataset of its own indices: drawing it with a DataLoader gives the order a dataset of that length
    would be drawn in, without loading a single image."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return index, 0


class ShardedStream:
    """This rank's share of a calibration stream's draws.

    For a CalibrationStream, `chunks(m)` draws the same m dataset indices the stream would (the same
    seeded shuffle, continued across layers), keeps this rank's contiguous share and loads only those
    images, in chunks of the stream's chunk size. Any other stream (a user's DataLoader, with its own
    order) is drawn in full on every rank and cut to the share, so loading is not divided.
    """

    def __init__(self, stream, shard: Shard):
        self.stream = stream
        self.dataset = stream.dataset
        self.shard = shard
        self.positions = None
        if isinstance(stream, CalibrationStream):
            self.chunk_size = stream.chunk_size
            self.num_workers = stream.num_workers
            self.positions = CalibrationStream(_Positions(len(stream.dataset)), 0, chunk_size=stream.chunk_size)
            # go on exactly where the stream is: mid-epoch, part of a chunk pending (e.g. after act_bits' scales
            # were calibrated on m images drawn before the layer loop), not at a new epoch
            self.positions.restore(stream.state())

    def chunks(self, m: int):
        lo, hi = self.shard.span(m)
        if self.positions is None:
            images = cat(list(self.stream.chunks(m)))[lo:hi]
            size = max(1, getattr(self.stream, "chunk_size", 256))
            # as Tensor.split cuts it (an empty share is one empty chunk), for ModelInputs too
            yield from (images[start:start + size] for start in range(0, max(images.shape[0], 1), size))
            return
        order = torch.cat(list(self.positions.chunks(m)))
        loader = DataLoader(Subset(self.dataset, order[lo:hi].tolist()), batch_size=self.chunk_size,
                            num_workers=self.num_workers)
        for batch in loader:
            yield as_inputs(batch[0])

    def draw(self, m: int) -> list:
        return list(self.chunks(m))
