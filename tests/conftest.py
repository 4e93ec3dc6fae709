"""Fixtures shared by every test directory."""

from __future__ import annotations

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
    """``set_env(NAME="value", OTHER=None)`` sets (None: unsets) environment variables for the test; every variable it
    touched is restored afterwards."""
    saved: dict[str, str | None] = {}

    def setter(**values: str | None) -> None:
        for key, value in values.items():
            saved.setdefault(key, os.environ.get(key))
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    yield setter
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
