"""The one door to a Ray cluster: every command, step and Ray Train run connects through here.

It never joins a cluster by accident: with ``RAY_ADDRESS`` set (a ``ray job submit`` driver, or
``RAY_ADDRESS=auto`` for a ``ray start`` cluster on this machine) it joins that one; otherwise it
starts a local cluster of its own with more logical CPUs than cores (each Serve replica reserves a
fraction of one) that ends with the process.
"""

from __future__ import annotations

import os

LOCAL_NUM_CPUS = 8
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def connect_ray(num_cpus: int = LOCAL_NUM_CPUS) -> bool:
    """Connect this process to Ray; True when it started the cluster itself (it then ends with it)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return False
    env = dict(WORKER_ENV)
    if os.environ.get("TSO_HOME"):
        env["TSO_HOME"] = os.environ["TSO_HOME"]
    ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env}, include_dashboard=True)
    return True
