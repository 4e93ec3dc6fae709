"""An external command as a reward: ``rewards.simulator:Command`` (issue 3, item 1).

Protocol of one call on a chunk of B samples of dimension d:

1. the chunk is written to ``{input}``, a ``.npy`` float64 array of shape (B, d), in a fresh temporary
   directory of its own;
2. the command runs (argv as a list, no shell) in a new session, i.e. its own process group;
3. it must exit with code 0 within ``timeout_s`` and leave at ``{output}`` a ``.npy`` float array of
   shape (B,): the rewards, NaN marking an invalid sample.

A non-zero exit or death by a signal is a 'crash', running past ``timeout_s`` a 'timeout', a missing,
unreadable or wrongly shaped output 'malformed'. When the call ends, for whatever reason, the whole
process group is killed (SIGKILL), so no grandchild outlives it, and the temporary directory is removed.
Chunking, calls in flight, retries with back-off and bisection of failing chunks are
:func:`rewards.robust.evaluate_robust`'s.

Placeholders in argv: ``{input}``, ``{output}`` (file paths, both required) and ``{python}`` (the Python
interpreter running the reward, ``sys.executable``: use it instead of ``python``, which is only on PATH
when a virtual environment is activated). Example (YAML)::

    reward:
      target: rewards.simulator:Command
      kwargs: {argv: ["{python}", -m, rewards.examples.epidemic, "{input}", "{output}"], timeout_s: 30}
"""

from __future__ import annotations

import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rewards.base import Reward, RewardBatch
from rewards.kwarg_checks import as_float, as_int
from rewards.robust import (
    DEFAULT_BACKOFF_S,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_RETRIES,
    CallFailure,
    RobustResult,
    evaluate_robust,
)

__all__ = ["Command", "PLACEHOLDERS"]

PLACEHOLDERS = ("{input}", "{output}", "{python}")


def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """True if ``proc`` exits within ``timeout_s``. It is left unreaped, so that its pid (the process
    group id) cannot be reused before the group is killed."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll instead
        return _poll_exit(proc, timeout_s)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)  # readable once the process has exited
        return bool(poller.poll(math.ceil(min(timeout_s, 1e6) * 1000)))
    finally:
        os.close(fd)


def _poll_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    deadline, pause = time.monotonic() + timeout_s, 0.001
    while True:
        if hasattr(os, "waitid"):
            exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        else:
            exited = proc.poll() is not None
        if exited:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(2 * pause, 0.01)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str, limit: int = 500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _read_rewards(path: str, size: int) -> np.ndarray:
    """The (size,) float64 rewards at ``path``; CallFailure('malformed') otherwise."""
    if not os.path.isfile(path):
        raise CallFailure("malformed", "the command wrote no output file")
    try:
        out = np.load(path, allow_pickle=False)
    except Exception as exc:  # garbage, truncated file, pickled object...
        raise CallFailure("malformed", f"unreadable output: {exc}") from None
    if not isinstance(out, np.ndarray):  # an .npz archive
        out.close()
        raise CallFailure("malformed", "output is not a single .npy array")
    if out.dtype.kind not in "biuf" or out.shape != (size,):
        wanted = f"expected float output of shape ({size},)"
        raise CallFailure("malformed", f"{wanted}, got {out.dtype} {out.shape}")
    return out.astype(np.float64)


class Command(Reward):
    """An external command evaluated on chunks of samples (see the module doc for the protocol).

    Args:
        argv: the command as a list of strings, with ``{input}`` and ``{output}`` (and optionally
            ``{python}``) placeholders; no shell is involved.
        timeout_s: seconds one call (one chunk of up to ``batch_size`` samples) may take.
        retries: extra calls of a sample after failures (bisection counts; see rewards.robust).
        batch_size: samples per call.
        max_in_flight: calls running at once (for latency-bound commands; each is a process).
        backoff_s: base back-off before calling again after a failure (doubles per repeat).
        name: identity of the reward (default: ``command:`` + argv); ``version``: bump it when the
            command's results change (it keys caches).
        env: extra environment variables for the command (merged over the caller's environment;
            numbers are turned into strings).
        scratch_dir: where each call's directory (input, output, stdout and stderr files) is made and removed
            again (default: the system's temporary directory); a fast local disk helps with large samples.

    Picklable (plain attributes only); ``differentiable = False``, so the pipeline uses the weighted
    solver.
    """

    differentiable = False

    def __init__(
        self,
        argv: Sequence[str],
        timeout_s: float = 60.0,
        retries: int = DEFAULT_RETRIES,
        batch_size: int = 16,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        backoff_s: float = DEFAULT_BACKOFF_S,
        name: str | None = None,
        version: str = "1",
        env: Mapping[str, str | int | float] | None = None,
        scratch_dir: str | None = None,
    ):
        if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence) or not argv:
            raise ValueError(f"Command: argv must be a non-empty list of strings, got {argv!r}")
        if not all(isinstance(a, str) for a in argv):
            raise ValueError(f"Command: argv must contain only strings, got {list(argv)!r}")
        self.argv = list(argv)
        text = "\0".join(self.argv)
        missing = [p for p in ("{input}", "{output}") if p not in text]
        if missing:
            raise ValueError(
                f"Command: argv must contain the placeholders {{input}} and {{output}}; "
                f"{' and '.join(missing)} missing in {self.argv!r}"
            )
        program = self.argv[0]
        if program != "{python}" and os.sep not in program and shutil.which(program) is None:
            raise ValueError(
                f"Command: argv[0] {program!r} is not a program on PATH (for Python use '{{python}}')"
            )
        self.timeout_s = as_float("Command", "timeout_s", timeout_s, positive=True)
        self.retries = as_int("Command", "retries", retries, 0)
        self.batch_size = as_int("Command", "batch_size", batch_size, 1)
        self.max_in_flight = as_int("Command", "max_in_flight", max_in_flight, 1)
        self.backoff_s = as_float("Command", "backoff_s", backoff_s, positive=False)
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"Command: name must be a non-empty string or None, got {name!r}")
        self.name = name or "command:" + " ".join(self.argv)
        if not isinstance(version, (str, int)) or isinstance(version, bool):
            raise ValueError(f"Command: version must be a string, got {version!r}")
        self.version = str(version)
        if env is not None and not isinstance(env, Mapping):
            raise ValueError(f"Command: env must be a mapping of names to strings, got {env!r}")
        env = dict(env or {})
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in env.values()):
            raise ValueError(f"Command: env values must be strings (or numbers), got {env!r}")
        self.env = {str(k): str(v) for k, v in env.items()}  # numbers as a YAML override types them
        if scratch_dir is not None and not os.path.isdir(str(scratch_dir)):
            raise ValueError(f"Command: scratch_dir must be an existing directory, got {scratch_dir!r}")
        self.scratch_dir = None if scratch_dir is None else str(scratch_dir)

    def resolve_argv(self, input_path: str, output_path: str) -> list[str]:
        """argv with the placeholders replaced (``{python}`` by this process's ``sys.executable``)."""
        subs = {"{input}": input_path, "{output}": output_path, "{python}": sys.executable}
        out = []
        for arg in self.argv:
            for key, value in subs.items():
                arg = arg.replace(key, value)
            out.append(arg)
        return out

    def run_once(self, chunk: np.ndarray) -> np.ndarray:
        """One call on ``chunk`` (B, d) -> rewards (B,) float64; raises CallFailure on failure."""
        chunk = np.ascontiguousarray(chunk, dtype=np.float64)
        workdir = tempfile.mkdtemp(prefix="tfft-command-", dir=self.scratch_dir)
        try:
            input_path = os.path.join(workdir, "input.npy")
            output_path = os.path.join(workdir, "output.npy")
            stderr_path = os.path.join(workdir, "stderr.txt")
            np.save(input_path, chunk)
            argv = self.resolve_argv(input_path, output_path)
            env = {**os.environ, **self.env} if self.env else None
            with open(os.path.join(workdir, "stdout.txt"), "wb") as out, open(stderr_path, "wb") as err:
                try:  # files, not pipes: a chatty command cannot block on a full pipe
                    proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                        start_new_session=True,  # its own process group, killed as a whole below
                    )
                except OSError as exc:
                    raise CallFailure("crash", f"cannot start {argv[0]!r}: {exc}") from None
                try:
                    exited = _wait_exit(proc, self.timeout_s)
                finally:
                    _kill_group(proc.pid)  # the leader is not reaped yet: its group id is still ours
                    code = proc.wait()
            if not exited:
                raise CallFailure("timeout", f"no exit after {self.timeout_s} s")
            if code != 0:
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                raise CallFailure("crash", f"{how}; stderr: {_tail(stderr_path)}")
            return _read_rewards(output_path, len(chunk))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def evaluate_detailed(self, x: np.ndarray) -> RobustResult:
        """Rewards of ``x`` (n, d) with failure accounting (reasons, attempts, seconds per sample)."""
        return evaluate_robust(
            self.run_once,
            np.asarray(x, dtype=np.float64),
            batch_size=self.batch_size,
            max_in_flight=self.max_in_flight,
            retries=self.retries,
            backoff_s=self.backoff_s,
        )

    def evaluate(self, x: torch.Tensor) -> RewardBatch:
        """x: (n, d) -> RewardBatch with errors and attempts (int64)."""
        if x.ndim != 2:
            raise ValueError(f"Command expects samples of shape (n, d), got {tuple(x.shape)}")
        return self.evaluate_detailed(x.detach().cpu().to(torch.float64).numpy()).to_reward_batch()

    def value_kwargs(self) -> dict[str, Any]:
        """The kwargs that change reward values (the cache key): not timeouts, retries or batching."""
        return {"argv": self.argv, "env": self.env, "name": self.name}

    def __repr__(self) -> str:
        return f"Command(argv={self.argv!r}, timeout_s={self.timeout_s}, batch_size={self.batch_size})"
