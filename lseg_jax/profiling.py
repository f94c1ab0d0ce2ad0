"""Profiling on demand: a `jax.profiler` trace of a few training steps.

`config.profile` (start_step, num_steps, all_processes) names the window;
num_steps=0 (the default) traces nothing. The trace goes where TensorBoard's
profile tab (and XProf) look for it, beside the run's scalars:
WORKDIR/tb/plugins/profile/<time>/<host>.xplane.pb, on process 0 only unless
all_processes (then process i > 0 writes under WORKDIR/tb/process_<i>, so
processes on one host never share a file). Every step, traced or not, runs
inside `jax.profiler.StepTraceAnnotation("train", step_num=step)`, so the
profiler's step view (and a profile captured from outside, by
`jax.profiler.start_server`) separates the steps.

The window starts and ends at a synchronisation point (the step's inputs and
outputs are waited for), so it holds exactly its steps' device work; the
train loop leaves those steps out of its speed figures (`in_window`).
"""

from collections.abc import Callable
import os
from pathlib import Path

import jax
import ml_collections


class StepProfiler:
  """Runs each training step, and traces those of the window."""

  def __init__(self, log_dir: str | os.PathLike, start_step: int, num_steps: int, enabled: bool = True):
    self.log_dir = Path(log_dir)
    self.first, self.last = start_step, start_step + num_steps - 1
    self.enabled = enabled and num_steps > 0
    self.traced: list[int] = []  # the steps of the open trace

  @classmethod
  def from_config(cls, profile: ml_collections.ConfigDict, tb_dir: str | os.PathLike) -> "StepProfiler":
    """`config.profile` of a run whose TensorBoard directory is `tb_dir`."""
    index = jax.process_index()
    log_dir = Path(tb_dir) / (f"process_{index}" if index else "")
    return cls(log_dir, profile.start_step, profile.num_steps, enabled=index == 0 or profile.all_processes)

  def in_window(self, step: int) -> bool:
    """Whether `step` is traced (on any process: the speed figures of every
    process leave the same steps out)."""
    return self.first <= step <= self.last

  def step(self, step: int, fn: Callable, *args):
    """`fn(*args)`, the update of `step`, annotated; the window's first step
    starts the trace once `args` are ready, its last one stops it once the
    outputs are."""
    traced = self.enabled and self.in_window(step)
    if traced and not self.traced:
      jax.block_until_ready(args)  # the earlier steps' work stays out of the trace
      jax.profiler.start_trace(str(self.log_dir))
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      out = fn(*args)
    if traced:
      self.traced.append(step)
      if step == self.last:
        jax.block_until_ready(out)
        self.stop()
    return out

  def stop(self) -> None:
    """Ends an open trace: at the window's end, or when the run ends (or
    stops on a signal) inside it."""
    if self.traced:
      jax.profiler.stop_trace()
      print(f"profile of steps {self.traced[0]}..{self.traced[-1]} written to {self.log_dir} "
            "(TensorBoard's Profile tab)", flush=True)
      self.traced = []
