"""Starting or joining Ray: a local Ray on a laptop, or an existing cluster (``--address``/RAY_ADDRESS)."""

from __future__ import annotations

import os
import sys

from pipelines.schema import RayConfig

__all__ = ["connect"]


def connect(ray_cfg: RayConfig, *, log=print) -> None:
    """Initialise Ray once per process. A running session (e.g. a test's) is reused as it is."""
    import ray

    if ray.is_initialized():
        return
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS", "")
    # Workers must import the same project modules and user reward modules as the driver.
    paths = [p for p in [os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)] if p]
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        runtime_env = {}  # under `ray job submit` the job's own runtime env (--working-dir) ships the code
    if address:
        log(f"[ray] connecting to {address}")
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        kwargs = {"num_cpus": ray_cfg.num_cpus} if ray_cfg.num_cpus > 0 else {}
        # The dashboard serves the state API that Ray Train's controller polls (without it, the
        # controller warns every few seconds) and the job API; it listens on loopback only.
        # address="local": always a fresh local Ray, never a leftover `ray start` cluster on this machine
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=runtime_env, **kwargs)
    res = ray.cluster_resources()
    log(f"[ray] {int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs, python {sys.version.split()[0]}")
