"""Fixtures shared by every test directory."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator

import pytest
import torch


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One torch thread for the test: tiny tensors in long Python loops run fastest so, and immune to other
    processes on the cores; the caller's setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def import_path() -> Iterator[Callable[[str | os.PathLike[str]], None]]:
    """``import_path(folder)`` puts ``folder`` first on ``sys.path`` for the test (user modules written by the test,
    or next to it); the caller's ``sys.path`` is restored."""
    saved = list(sys.path)

    def prepend(folder: str | os.PathLike[str]) -> None:
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()

    yield prepend
    sys.path[:] = saved


@pytest.fixture
def set_env() -> Iterator[Callable[..., None]]:
    """``set_env(NAME="value", OTHER=None)`` sets (None: unsets) environment variables for the test
    (`pipelines.raysession.environ`); every variable it touched is restored afterwards, in reverse order."""
    from pipelines.raysession import environ

    with contextlib.ExitStack() as stack:
        yield lambda **values: stack.enter_context(environ(**values))
