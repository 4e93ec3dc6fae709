"""Shared fixtures of the library tests: every test runs with one torch thread (`tests/conftest.py`)."""

from __future__ import annotations

import pytest



@pytest.fixture(autouse=True)
def _single_thread(single_thread: None) -> None:
    """The library tests' tiny tensors in long Python loops: one thread (the shared fixture) for every test."""
