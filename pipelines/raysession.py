"""Starting or joining Ray: a local Ray on a laptop, or an existing cluster (``--address``/RAY_ADDRESS)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from pipelines.schema import FinetuneConfig, RayConfig

__all__ = ["connect", "check_address", "check_local_capacity", "environ"]


def _address(ray_cfg: RayConfig) -> str:
    return ray_cfg.address or os.environ.get("RAY_ADDRESS", "")


def check_address(ray_cfg: RayConfig, timeout_s: float = 5.0) -> None:
    """A ``host:port`` cluster address (``ray.address``, ``--address`` or RAY_ADDRESS) must accept a TCP connection
    within ``timeout_s``; ConfigError naming the address otherwise. Before any expensive work: Ray itself would
    retry for about a minute and end in a traceback. ``auto`` and ``ray://`` addresses are left to Ray."""
    import socket

    from pipelines.config import ConfigError

    address = _address(ray_cfg)
    if not address or address == "auto" or "://" in address or address.startswith("local"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"'ray.address' must look like host:port, auto or ray://host:port, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"'ray.address': cannot reach a Ray cluster at {address} ({exc.strerror or exc}); start it "
            "(`ray start --head`) or fix --address / ray.address / RAY_ADDRESS"
        ) from None


def check_local_capacity(ray_cfg: RayConfig, finetune: FinetuneConfig) -> None:
    """The local Ray a run is about to start must hold the fine-tuning worker group: ConfigError naming the keys
    otherwise (Ray Train would wait for the workers, time out and retry forever). Skipped for a cluster
    (``ray.address`` or RAY_ADDRESS, where autoscaling may add nodes) and when Ray is already running."""
    import ray

    from pipelines.config import ConfigError

    if _address(ray_cfg) or ray.is_initialized():
        return
    cpus = ray_cfg.num_cpus or _local_cpus()
    need = finetune.num_workers * finetune.cpus_per_worker
    if need > cpus and finetune.backend == "ray":  # local: the loop runs in this process, not on Ray's CPUs
        raise ConfigError(
            f"'finetune.num_workers' ({finetune.num_workers}) x 'finetune.cpus_per_worker' "
            f"({finetune.cpus_per_worker:g}) needs {need:g} CPUs, but the local Ray has {cpus} ('ray.num_cpus'"
            f"{'' if ray_cfg.num_cpus else ': all cores'}); lower finetune.num_workers or raise ray.num_cpus"
        )
    if finetune.use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if gpus < finetune.num_workers:
            raise ConfigError(
                f"'finetune.use_gpu' asks for one GPU per worker ('finetune.num_workers' {finetune.num_workers}), "
                f"but this machine has {gpus}; lower finetune.num_workers or set finetune.use_gpu=false"
            )


def connect(ray_cfg: RayConfig, *, log=print) -> None:
    """Initialise Ray once per process. A running session (e.g. a test's) is reused as it is."""
    import ray

    if ray.is_initialized():
        return
    address = _address(ray_cfg)
    # Workers must import the same project modules and user reward modules as the driver.
    paths = [p for p in [os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)] if p]
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        runtime_env = {}  # under `ray job submit` the job's own runtime env (--working-dir) ships the code
    if address:
        log(f"[ray] connecting to {address}")
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except Exception as exc:
            if "auth" not in str(exc).lower():
                raise
            from pipelines.config import ConfigError

            raise ConfigError(
                f"'ray.address': the cluster at {address} refused this client's token; set RAY_AUTH_MODE=token and "
                "RAY_AUTH_TOKEN to the cluster's token (its head writes it to ~/.ray/auth_token)"
            ) from None
    else:
        kwargs = {"num_cpus": ray_cfg.num_cpus} if ray_cfg.num_cpus > 0 else {}
        # The dashboard serves the state API that Ray Train's controller polls (without it, the
        # controller warns every few seconds) and the job API; it listens on loopback only.
        # address="local": always a fresh local Ray, never a leftover `ray start` cluster on this machine
        port = _free_port()
        # Ray's own processes that look the cluster up by address (Ray Train's placement-group cleaner, the state
        # API) would otherwise find every local Ray on this machine and pick the latest: another run's. Fixing
        # the GCS port before the start lets the workers be told which cluster is theirs.
        runtime_env = {**runtime_env, "env_vars": {**runtime_env.get("env_vars", {}), "RAY_ADDRESS": f"127.0.0.1:{port}"}}
        with environ(RAY_GCS_SERVER_PORT=str(port)):
            ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=runtime_env,
                     **kwargs)
    res = ray.cluster_resources()
    log(f"[ray] {int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs, python {sys.version.split()[0]}")


def _local_cpus() -> int:
    """The cores this process may run on (what a local Ray counts by default)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _free_port() -> int:
    """A TCP port free on this machine now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Set environment variables (None: unset them) for the duration of the block, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
