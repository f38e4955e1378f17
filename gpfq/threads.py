"""Thread control for small or memory-bound tensor operations."""
import contextlib

import torch


@contextlib.contextmanager
def single_thread():
    """Run the enclosed tensor operations on one thread.

    For small or memory-bound work (GPFQ's in-block step, patch unfolding) one thread is as
    fast as several, and a thread team costs a start-up per operation, which on a loaded
    machine becomes a wait for a time slice per operation.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
