"""Calibration streams: the images GPFQ draws layer inputs from, m at a time, in a seeded order that a
per-layer checkpoint can save and continue (`CalibrationStream.state` / `restore`)."""
import itertools

import torch
from torch.utils.data import DataLoader, RandomSampler

from gpfq.pipeline.inputs import as_inputs


class ImageStream:
    """Calibration images taken m at a time, chunk by chunk, from a subclass's `_next_chunk()` (a tensor of images);
    a chunk that is only partly taken is continued by the next draw."""

    def __init__(self):
        self._pending = []

    def draw(self, m: int) -> list:
        """The next m images as a list of (≤ chunk size, …) tensors."""
        return list(self.chunks(m))

    def chunks(self, m: int):
        """Yield the next m images chunk by chunk, as `draw` lists them, without holding them all."""
        count = 0
        while count < m:
            chunk = self._pending.pop(0) if self._pending else self._next_chunk()
            take = min(m - count, chunk.shape[0])
            if take < chunk.shape[0]:
                self._pending.insert(0, chunk[take:])
            count += take
            yield chunk[:take]


class _ResumedShuffle(RandomSampler):
    """RandomSampler whose next pass starts `skip` indices in: a stream restored mid-epoch draws the same
    permutation (same generator calls) without loading the images before `skip`."""

    def __init__(self, data_source, generator, skip: int = 0):
        super().__init__(data_source, generator=generator)
        self.skip = skip

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class CalibrationStream(ImageStream):
    """Endless seeded shuffle of a dataset; `draw(m)` returns the next m images in chunks.

    Each layer calls `draw(m)` for a fresh batch (the paper's default). The order depends
    only on the seed, not on num_workers. `state()` / `restore(state)` save and continue the
    stream at the same image, with the same chunk boundaries (a per-layer checkpoint).
    """

    def __init__(self, dataset, seed: int, chunk_size: int = 256, num_workers: int = 0):
        super().__init__()
        self.dataset = dataset
        self.chunk_size = chunk_size
        self.num_workers = num_workers
        self.generator = torch.Generator().manual_seed(seed)
        self._iterator = None
        # the generator's state when this epoch's loader started (it draws the worker seed, then the
        # permutation), where in the epoch the loader is, and where its last batch started
        self._epoch_state, self._loader_position, self._batch_start = None, 0, 0

    def _start_epoch(self, skip: int = 0):
        self._epoch_state = self.generator.get_state()
        # an explicit RandomSampler is what DataLoader(shuffle=True, generator=g) builds: the same order
        loader = DataLoader(self.dataset, batch_size=self.chunk_size, sampler=_ResumedShuffle(
            self.dataset, self.generator, skip), generator=self.generator, num_workers=self.num_workers)
        self._iterator, self._loader_position = iter(loader), skip

    def _next_chunk(self):
        while True:
            if self._iterator is None:
                self._start_epoch()
            try:
                chunk = as_inputs(next(self._iterator)[0])
            except StopIteration:
                self._iterator = None
                continue
            self._batch_start = self._loader_position
            self._loader_position += chunk.shape[0]
            return chunk

    def state(self) -> dict:
        """Where the stream is: {epoch_state (ByteTensor or None), loader_position, batch_start, pending,
        chunk_size, generator}; pending: images of the last batch not yet given out."""
        pending = sum(chunk.shape[0] for chunk in self._pending)
        return {"epoch_state": self._epoch_state, "loader_position": self._loader_position,
                "batch_start": self._batch_start, "pending": pending, "chunk_size": self.chunk_size,
                "generator": self.generator.get_state()}

    def restore(self, state: dict) -> None:
        """Continue where `state()` was taken (of a stream with the same dataset, seed and chunk size): the
        next images, in the same chunks. Loads at most one batch (the one the pending images are the end of).
        ValueError if the restored generator does not come out where it was (another dataset or torch)."""
        if state["chunk_size"] != self.chunk_size:
            raise ValueError(f"the stream was saved with chunk size {state['chunk_size']}, not {self.chunk_size}")
        self._pending, self._iterator = [], None
        if state["epoch_state"] is None:  # nothing drawn yet
            self.generator.set_state(state["generator"])
            self._epoch_state, self._loader_position, self._batch_start = None, 0, 0
            return
        self.generator.set_state(state["epoch_state"])
        pending = state["pending"]
        self._start_epoch(skip=state["batch_start"] if pending else state["loader_position"])
        if pending:
            chunk = self._next_chunk()
            self._pending = [chunk[chunk.shape[0] - pending:]]
        if self._loader_position != state["loader_position"]:
            raise ValueError(f"the stream came back at image {self._loader_position} of its epoch, not "
                             f"{state['loader_position']}")
