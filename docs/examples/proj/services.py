"""Stand-ins for the project's own code, which the examples call."""

from __future__ import annotations

import json
import os
from typing import Any

#: What the stand-ins did, in order (the examples' tests read it).
done: list[tuple[str, Any]] = []


def _did(what: str, value: Any) -> None:
    done.append((what, value))
    # Under a real worker (the examples' live test), also where the test can read it.
    if os.environ.get("PROJ_DONE_URL"):
        import redis

        redis.Redis.from_url(os.environ["PROJ_DONE_URL"]).rpush(
            "done", json.dumps([what, value]))


class Report:
    def __init__(self, email: str) -> None:
        self.email = email

    def send(self, email: str) -> None:
        _did("report sent", email)


def generate_report(email: str) -> Report:
    return Report(email)


def import_feed(feed_url: str) -> str:
    _did("feed imported", feed_url)
    return feed_url


def charge_card(user_id: int, amount: int) -> None:
    _did("charged", (user_id, amount))


def sync_account(account: str) -> None:
    _did("synced", account)


def remove_stale_sessions() -> None:
    _did("cleaned", None)


def send_digest(user_id: int) -> None:
    _did("digest sent", user_id)


def rebuild_index(document_id: int, revision: int) -> None:
    _did("index rebuilt", [document_id, revision])


def save_draft(document_id: int, text: str) -> None:
    _did("draft saved", [document_id, text])


def call_partner_api(account: str, since: str) -> None:
    _did("orders synced", [account, since])
