"""One independent job in a second process, beside the main one.

The demo's retrained oracle is a fine-tune of its own, independent of the vanilla fine-tune and the
unlearning run, and every job runs on one torch thread (``cli.main``): on a 2-core machine the second
core would sit idle. The job runs in a *spawned* process (it shares no state with this one, so it gives
the bytes it gives in-process: every fine-tune seeds itself), with its progress bars and any traceback
written to a log file instead of over the main process's bars. ``join`` raises, naming the job and
quoting the log, if it failed; leaving the ``with`` block stops a job that is still running.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def spare_cores(threads: int) -> bool:
    """Whether this process may use more cores than its ``threads`` (a second job would not just share them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores > threads


def _child(log: str, threads: int, target: Callable, args: tuple) -> None:
    import torch

    with open(log, "w") as f:
        sys.stderr = f  # tqdm writes to sys.stderr when a bar is made
        torch.set_num_threads(threads)
        try:
            target(*args)
        except BaseException:
            traceback.print_exc(file=f)
            f.flush()
            os._exit(1)


class BackgroundJob:
    """A started job: ``join`` it for its result (raises if it failed), ``stop`` it to give up on it."""

    def __init__(self, name: str, target: Callable, args: tuple, *, log: Path, threads: int):
        self.name, self.log = name, Path(log)
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(target=_child, args=(str(self.log), threads, target, args), daemon=True)
        self.process.start()

    def join(self) -> None:
        """Wait for the job; raise if it failed (its log is kept and quoted), else remove the log."""
        self.process.join()
        if self.process.exitcode != 0:
            tail = self.log.read_text()[-3000:] if self.log.is_file() else "(no log was written)"
            raise RuntimeError(
                f"{self.name} failed in its second process (exit code {self.process.exitcode}); "
                f"its log, {self.log}, ends:\n{tail}"
            )
        self.log.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


@contextmanager
def background(
    name: str, target: Callable, *args, log: str | Path, threads: int | None = None
) -> Iterator[BackgroundJob]:
    """Run ``target(*args)`` (a module-level function: it is pickled for the new process) with ``threads``
    torch threads (default: this process's) in a second process for the ``with`` block."""
    import torch

    job = BackgroundJob(name, target, args, log=Path(log), threads=threads or torch.get_num_threads())
    try:
        yield job
    finally:
        job.stop()
