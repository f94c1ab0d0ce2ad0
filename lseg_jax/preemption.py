"""Stop requests (SIGTERM, Ctrl-C, a scheduler's preemption notice) turned
into one stop step that every process of a run agrees on.

A signal reaches one process of a multi-process run, or all of them at
slightly different steps. Each process acting on its own would enter the
collective checkpoint save alone and hang (measured: 2 processes x 4 CPU
devices, SIGTERM to process 1 only). Here a signal only sets a local flag;
`StopRequest.agreed()` is called by every process at the same points of the
program (after every training step, before every evaluation batch) and
returns the same answer everywhere:

- one process: the local flag;
- several: the flags all-gathered over the processes (one int per process, a
  collective every process runs at that point), OR'ed with JAX's preemption
  sync point where the coordination service has a preemption notifier (TPU
  maintenance events arrive there, not as signals). The all-gather works on
  every backend and launcher (CPU gloo collectives, SLURM), where JAX's
  preemption service learns of SIGTERM only through its own C++ handler,
  which the Python handler replaces.

The exit status is 128 + the signal: 143 for SIGTERM (and a preemption
notice), 130 for Ctrl-C. A second signal of a process leaves at once (an
unfinished save stays invisible: orbax finalises a checkpoint by a rename).

Before the training loop (restore, first compile) nothing is lost by
stopping: a one-process run leaves at once (`abort_now`) instead of waiting
for the compile to end; a multi-process run stops at the first agreement,
so that no process enters a collective its peers have left.
"""

from collections.abc import Callable, Iterator
import contextlib
import os
import signal
import sys
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal, after saving


class Stopped(Exception):
  """The run stops on a signal, after saving what it must; exit EXIT_SIGNAL[signum]."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


class StopRequest:
  """The process's signal flag and the run-wide agreement on it.

  `on_abort` runs before a one-process run leaves from its setup phase
  (`setup_phase`): it releases what the run holds (the workdir lock)."""

  def __init__(self, on_abort: Callable[[], None] = lambda: None):
    self.signum: int | None = None
    self._setup = False
    self._on_abort = on_abort
    self._sync_point = _preemption_sync_point()

  def install(self) -> None:
    for signum in EXIT_SIGNAL:
      signal.signal(signum, self._handle)

  def _handle(self, signum: int, _frame: Any) -> None:
    if self.signum is not None:  # a second signal: leave now
      os._exit(EXIT_SIGNAL.get(signum, 1))
    self.signum = signum
    if self._setup and jax.process_count() == 1:
      raise Stopped(signum)  # unwinds the restore (or the wait for the compile) at once

  @contextlib.contextmanager
  def setup_phase(self) -> Iterator[None]:
    """A block with nothing to save (restore, compile): in a one-process run
    a signal inside it (or before it) raises Stopped at once."""
    if self.signum is not None and jax.process_count() == 1:
      raise Stopped(self.signum)
    self._setup = True
    try:
      yield
    finally:
      self._setup = False

  def agreed(self, step: int | None = None) -> int | None:
    """The signal every process stops on, or None to go on. Every process
    must call it at the same points of the program; `step` (after a training
    step, every step from the first) also consults JAX's preemption sync
    point, None (within an evaluation) does not."""
    if jax.process_count() == 1:
      return self.signum
    flags = np.asarray(multihost_utils.process_allgather(np.int32(self.signum or 0))).reshape(-1)
    raised = [int(f) for f in flags if f]
    if raised:
      return raised[0]
    if step is not None and self._sync_point is not None and self._sync_point(step):
      return signal.SIGTERM
    return None

  def abort_now(self) -> None:
    """Leaves a one-process run from its setup phase: nothing to save."""
    self._on_abort()
    sys.stdout.flush()
    os._exit(EXIT_SIGNAL[self.signum])


def _preemption_sync_point() -> Callable[[int], bool] | None:
  """JAX's `reached_preemption_sync_point` where the coordination service
  runs a preemption sync manager (jax.distributed initialised), else None."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  if distributed.global_state.preemption_sync_manager is None:
    return None
  return multihost_utils.reached_preemption_sync_point


def run_interruptibly(fn: Callable[[], Any], request: StopRequest) -> Any:
  """fn() in a worker thread while the main thread waits, so that a signal's
  handler runs (and, in a one-process setup phase, raises Stopped) during a
  long C++ call such as XLA's compile, which would otherwise hold it off."""
  box: dict[str, Any] = {}

  def target():
    try:
      box["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except  # re-raised in the caller
      box["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  try:
    while thread.is_alive():
      thread.join(0.1)
  except Stopped:
    request.abort_now()  # the compile thread cannot be stopped: leave the process
  if "error" in box:
    raise box["error"]
  return box["value"]
