"""The how-tos' examples (``docs/examples``), run as a user's project would run them."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery import Celery, signals

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
sys.path.insert(0, str(EXAMPLES))

from proj import services  # noqa: E402  (the examples' own layout: proj on the path)
from proj.celery import app as proj_app  # noqa: E402

# The examples name the Redis a project would use; the tests never touch it: the broker
# is in memory and the ``unique`` fixture gives the locks a store of their own.
proj_app.conf.update(broker_url="memory://", task_publish_retry=False)


@pytest.fixture
def unique_app() -> Celery:
    return proj_app


@pytest.fixture
def example(unique: Any) -> Any:
    """Import a how-to's example (once: Celery keeps a task name's first function)."""
    services.done.clear()

    def load(name: str) -> ModuleType:
        return importlib.import_module(name)

    return load


@pytest.fixture
def published() -> Iterator[list[str]]:
    """The names of the tasks published during the test."""
    sent: list[str] = []

    def record(sender: Any = None, **_: Any) -> None:
        sent.append(str(sender))

    signals.after_task_publish.connect(record, weak=False)
    yield sent
    signals.after_task_publish.disconnect(record)
