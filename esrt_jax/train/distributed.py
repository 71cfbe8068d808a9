"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

- Explicit: `--coordinator host:port --num-processes N --process-id i` (or the env vars
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
- TPU VM pods (and other clusters jax detects: SLURM, Open MPI, ...): pass `--distributed`
  or run on a multi-host TPU slice; `jax.distributed.initialize()` needs no arguments there.
- Otherwise: a single process, nothing to do.
On CPU, cross-process collectives need an implementation (gloo), set before start-up.
Must run before anything touches jax devices.
"""

from __future__ import annotations

import os

import jax


def _multihost_tpu() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: list[int] | None = None,
               auto: bool = False) -> bool:
    """Start jax.distributed when asked (flags/env) or on a multi-host TPU; True if started."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError("distributed: a coordinator address needs --num-processes and --process-id "
                             "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"distributed: process id {process_id} not in [0, {num_processes})")
        # CPU backends need a collectives implementation for cross-process all-reduces.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
        return True
    if auto or _multihost_tpu():
        jax.distributed.initialize()
        return True
    return False
