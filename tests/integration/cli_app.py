"""The app ``celery -A tests.integration.cli_app unique ...`` runs in the CLI tests.

Broker and lock store: ``CELERY_UNIQUE_CLI_REDIS`` (the tests' private server).
"""

from __future__ import annotations

import os

from celery import Celery

from celery_unique import UniqueTask

URL = os.environ["CELERY_UNIQUE_CLI_REDIS"]
app = Celery("cli", broker=URL)
app.conf.update(task_default_queue=os.environ.get("CELERY_UNIQUE_CLI_QUEUE", "cli"),
                task_publish_retry=False)


@app.task(base=UniqueTask, queueing_lock="report_{email}", name="cli.report")
def report(email: str) -> None: ...


@app.task(base=UniqueTask, lock="res_{n}", name="cli.locked")
def locked(n: int) -> None: ...


@app.task(name="cli.plain")
def plain() -> None: ...


@app.task(base=UniqueTask, global_rate_limit="2/m", rate_limit_key="api_{account}",
          name="cli.limited")
def limited(account: str) -> None: ...
