"""Stand-ins for the project's own code, which the examples call."""

from __future__ import annotations

from typing import Any

#: What the stand-ins did, in order (the examples' tests read it).
done: list[tuple[str, Any]] = []


class Report:
    def __init__(self, email: str) -> None:
        self.email = email

    def send(self, email: str) -> None:
        done.append(("report sent", email))


def generate_report(email: str) -> Report:
    return Report(email)


def import_feed(feed_url: str) -> str:
    done.append(("feed imported", feed_url))
    return feed_url


def charge_card(user_id: int, amount: int) -> None:
    done.append(("charged", (user_id, amount)))


def sync_account(account: str) -> None:
    done.append(("synced", account))


def remove_stale_sessions() -> None:
    done.append(("cleaned", None))
