"""Helpers for tests that spawn worker processes (torch.multiprocessing)."""

import os
import sys


def exit_after(rank, fn, *args) -> None:
    """``fn(rank, *args)`` in a spawned process, then exit at once when it returned.

    A worker that passed could still die in interpreter teardown: gloo's threads, torn down there,
    call std::terminate ("terminate called without an active exception", SIGABRT) now and then,
    even after a barrier and destroy_process_group. A failure still raises, so mp.spawn reports it.
    """
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
