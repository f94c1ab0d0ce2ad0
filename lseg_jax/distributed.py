"""Joining the processes of a run: one function for train.py and eval.py.

A process learns the run it belongs to, in this order:
- the flags `--coordinator_address --num_processes --process_id`: each one
  given overrides what the environment says;
- a cluster that JAX recognises from the environment, joined by
  `jax.distributed.initialize()` without arguments (as big_vision does): a
  Cloud TPU pod slice (its workers' metadata, or TPU_WORKER_HOSTNAMES /
  TPU_PROCESS_ADDRESSES on GKE), a SLURM `srun` step (SLURM_JOB_ID,
  SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID), Open MPI
  (OMPI_MCA_orte_hnp_uri), a Kubernetes Job or JobSet (KUBERNETES_SERVICE_HOST
  with the `kubernetes` package). The detection is JAX's own
  (`jax._src.clusters`), so it is exactly the one `initialize()` would use;
- neither: one process on its local devices, and no `initialize()` (it
  would wait for a coordinator that never comes).

Without joining, the processes of a SLURM job or of a multi-process GPU node
would each train alone on their local devices, all into one workdir, and a
TPU pod slice would lack the coordination service that preemption sync needs.
"""

from absl import flags
import jax

from lseg_jax import config_lib


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The three multi-process flags, into `flag_values` (train.py's global
  flags, eval.py's own FlagValues)."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (default: from the cluster's "
                      "environment, see README 'Multi-host').", flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Number of processes (default: from the cluster's environment).",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "This process's index (default: from the cluster's environment).",
                       flag_values=flag_values)


def detected_cluster() -> str | None:
  """The name of the cluster environment ("slurm", "ompi", "gcetpu",
  "gketpu", "K8sCluster") that `jax.distributed.initialize()` would bootstrap from,
  or None on a plain machine. JAX's own detection, in JAX's order; the
  opt-in-only methods (mpi4py) are skipped, as `initialize()` skips them."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top  # JAX's cluster table; no public API

  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if not env.opt_in_only_method and env.is_env_present():
      return env.name or env.__name__
  return None


def topology() -> str:
  """'2 processes x 4 local cpu devices = 8 devices' (touches the backend:
  call it after `start`)."""
  processes, local, total = jax.process_count(), jax.local_device_count(), jax.device_count()
  noun = lambda n, word: word if n == 1 else f"{word}es" if word.endswith("s") else f"{word}s"
  return (f"{processes} {noun(processes, 'process')} x {local} local {jax.default_backend()} "
          f"{noun(local, 'device')} = {total} {noun(total, 'device')}")


def start(flag_values: flags.FlagValues = flags.FLAGS) -> str:
  """Joins the run's processes (before anything touches a JAX backend) from
  the flags or the cluster's environment; returns the line the scripts print
  at start: 'processes: 2 processes x 4 local gpu devices = 8 devices (slurm)'.
  A plain machine without the flags stays one process. Flags that cannot
  start a run (a process count without a coordinator on a plain machine, an
  id out of range) are a config_lib.UserError."""
  flag_args = (flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id)
  cluster = detected_cluster()
  if not jax.distributed.is_initialized() and (cluster or any(a is not None for a in flag_args)):
    # Collectives between CPU processes (tests, CPU clusters); GPUs and TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
      jax.distributed.initialize(*flag_args)
    except (ValueError, TypeError) as e:  # JAX's checks of missing or inconsistent arguments
      raise config_lib.UserError(f"cannot join the run's processes ({e}): give all of --coordinator_address, "
                                 "--num_processes and --process_id, or launch under a cluster") from None
  joined = f" ({cluster})" if cluster and not any(a is not None for a in flag_args) else ""
  return f"processes: {topology()}{joined}"
