"""Session-wide Ray fixtures: a two-node loopback cluster, and one local Ray for in-process runs.

``loopback_cluster``: a two-node Ray cluster on loopback, started with the commands of docs/cluster.md's
rehearsal. One cluster per test session, shared by the modules that need one (test_cluster.py,
test_bank_faults.py): the head and a second node each offer 2 CPUs and one ``reward_node`` and one
``train_node`` slot. Both ``ray start`` processes run with ``--block`` in a process group of their own, so
stopping them stops only this cluster (never ``ray stop``: that would end every Ray on the machine).

``local_ray``: one local Ray (2 CPUs) in this process for every module that runs the pipeline in process
(instead of a Ray start and stop per module, several seconds each on 2 cores). The tests that use it run last,
together, after every test that needs Ray not to be running in this process (config errors are refused before
Ray starts); it stops after the last of them.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).parents[2]
VENV_BIN = Path(sys.executable).parent
DOC = ROOT / "docs" / "cluster.md"

# A reward module on the cluster's PYTHONPATH: sleeps per sample, then appends one line per evaluated
# sample to ``log``, so tests can count how often each sample was scored.
COUNTING_REWARD = '''
import os, time
import torch
from rewards.base import Reward, RewardBatch

class Counting(Reward):
    """Sleeps per sample and appends one line per evaluated sample to ``log`` (count of calls)."""
    name = "counting"
    def __init__(self, log, seconds=0.01):
        self.log, self.seconds = log, seconds
    def evaluate(self, x):
        time.sleep(self.seconds * len(x))
        with open(self.log, "a") as f:
            f.write("".join(f"{float(row[0])!r},{float(row[1])!r}\\n" for row in x))
        r = x.sum(-1).to(torch.float64)
        return RewardBatch(r, torch.ones(len(r), dtype=torch.bool))
'''


def rehearsal_commands() -> list[str]:
    """The shell lines of the rehearsal block of docs/cluster.md, in order."""
    text = DOC.read_text()
    match = re.search(r"<!-- rehearsal:start -->\s*```bash\n(.*?)```\s*<!-- rehearsal:end -->", text, re.S)
    assert match, f"{DOC} has no rehearsal block"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_ports(line: str, ports: dict[str, int]) -> str:
    for default, port in ports.items():
        line = line.replace(default, str(port))
    return line


def _exported(lines: list[str], env: dict[str, str]) -> dict[str, str]:
    """``env`` after the block's ``export`` lines, run by bash in order (command substitutions included)."""
    exports = "\n".join(line for line in lines if line.startswith("export "))
    done = subprocess.run(["bash", "-c", exports + "\nenv -0"], env=env, capture_output=True, check=True)
    pairs = (item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
    return {k: v for k, v in pairs if k != "_"}


def _start_node(line: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    argv = shlex.split(line) + ["--block"]
    argv[0] = str(VENV_BIN / "ray")
    with open(log, "ab") as fh:
        return subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_nodes(address: str, env: dict[str, str], n: int, timeout: float = 120) -> None:
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(1 for x in ray.nodes() if x['Alive']))"
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        ok = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True)
        if ok.returncode == 0 and ok.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1)
    raise RuntimeError(f"the loopback cluster at {address} did not reach {n} live nodes")


# A shared Ray is stopped right after the last test that uses it, not at the end of the session: its idle
# raylets, GCS and dashboards would otherwise take CPU from every test that follows (2 cores).
_SHARED = ("loopback_cluster", "local_ray")
_LAST_TEST: dict[str, str] = {}
_STOP: dict[str, list[Callable[[], None]]] = {name: [] for name in _SHARED}


def _uses(item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    # the tests on the local Ray last, in their order: a local Ray must not be running during the others
    items[:] = [i for i in items if not _uses(i, "local_ray")] + [i for i in items if _uses(i, "local_ray")]
    _LAST_TEST.clear()
    for name in _SHARED:
        users = [item.nodeid for item in items if _uses(item, name)]
        if users:
            _LAST_TEST[name] = users[-1]


@pytest.hookimpl(trylast=True)  # after the item's own fixtures are torn down
def pytest_runtest_teardown(item, nextitem):
    for name, last in _LAST_TEST.items():
        if item.nodeid == last:
            while _STOP[name]:
                _STOP[name].pop()()


def _stop_nodes(nodes: list[subprocess.Popen], port: int) -> None:
    for proc in reversed(nodes):  # both nodes shut down at once: each takes a while to stop
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 3  # a graceful stop takes about 30 s; nothing of the nodes is needed after
    for proc in reversed(nodes):
        try:
            proc.wait(max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    # `ray start` records its address for later `ray.init()` calls; a stale record would misdirect
    # Ray Train's placement-group cleaner in the test modules that follow.
    current = Path("/tmp/ray/ray_current_cluster")
    if current.is_file() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


@pytest.fixture(scope="session")
def loopback_cluster(tmp_path_factory):
    """Start the rehearsal's two nodes; yields address, dashboard URL, env, the shared dir and the lines."""
    root = tmp_path_factory.mktemp("cluster")
    ports = {"6379": free_port(), "8265": free_port()}
    # A clean environment, as a new user's shell: no Ray authentication of the test's own. The block's export
    # lines (the token among them) are evaluated by bash, as pasted; only TFFT_SHARED is redirected.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    clean.update(PATH=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]),
                 PYTHONPATH=os.pathsep.join([str(root / "user"), str(ROOT)]))
    lines = [with_ports(line, ports) for line in rehearsal_commands()]
    env = {**_exported(lines, clean), "TFFT_SHARED": str(root / "shared")}
    (root / "user").mkdir()
    (root / "user" / "counting_reward.py").write_text(COUNTING_REWARD)
    starts = [line for line in lines if line.startswith("ray start")]
    assert len(starts) == 2 and "--head" in starts[0], starts
    address = f"127.0.0.1:{ports['6379']}"
    nodes = [_start_node(starts[0], env, root / "head.log")]
    stopped: list[bool] = []

    def stop() -> None:  # once: after the last test that uses the cluster, or at the end of the session
        if not stopped:
            stopped.append(True)
            _stop_nodes(nodes, ports["6379"])

    _STOP["loopback_cluster"].append(stop)
    try:
        _wait_for_nodes(address, env, 1)
        nodes.append(_start_node(starts[1], env, root / "worker.log"))
        _wait_for_nodes(address, env, 2)
        yield {
            "root": root,
            "env": env,
            "address": address,
            "dashboard": f"http://127.0.0.1:{ports['8265']}",
            "lines": lines,
        }
    finally:
        stop()


@pytest.fixture(scope="session")
def pretrain_cache(tmp_path_factory) -> Path:
    """One pretraining cache for the session: the modules that run the default 2-D base model (the end-to-end
    runs, the sweep) train it once. The cache is keyed by the settings, so a module with other settings still
    gets its own base model."""
    return tmp_path_factory.mktemp("pretrain_cache")



@pytest.fixture(scope="session")
def local_ray(tmp_path_factory) -> Iterator[Path]:
    """One local Ray (2 CPUs) for the session's in-process runs (module docstring); yields a directory on this
    process's ``sys.path`` and on the Ray workers' PYTHONPATH, where a module puts its user modules (reward,
    data source, flow model files) before it uses them."""
    import ray

    from pipelines.raysession import connect
    from pipelines.schema import RayConfig

    user = tmp_path_factory.mktemp("user_modules")
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(user), old) if p)  # read by connect()
    sys.path.insert(0, str(user))
    if ray.is_initialized():
        ray.shutdown()
    connect(RayConfig(num_cpus=2))
    stopped: list[bool] = []

    def stop() -> None:  # once: after the last test that uses it, or at the end of the session
        if not stopped:
            stopped.append(True)
            ray.shutdown()
            sys.path.remove(str(user))
            os.environ["PYTHONPATH"] = old

    _STOP["local_ray"].append(stop)
    try:
        yield user
    finally:
        stop()
