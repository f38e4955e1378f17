"""Helpers shared by the benchmarks: synthetic images and running one configuration per process."""
import json
import resource
import subprocess
import sys

import torch


class SyntheticImages(torch.utils.data.Dataset):
    """`n` Gaussian images of `shape`, each made from its own seed when read (nothing is held)."""

    def __init__(self, n, shape, seed=0):
        self.n, self.shape, self.seed = n, tuple(shape), seed

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(self.shape, generator=generator), 0


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script, arguments) -> dict:
    """Run `script --child arguments…` in a fresh Python (its own peak RSS); return its last stdout line as JSON."""
    done = subprocess.run([sys.executable, str(script), "--child", *map(str, arguments)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script} {arguments} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(result: dict) -> None:
    """What a child prints last: one JSON line."""
    print(json.dumps(result), flush=True)
