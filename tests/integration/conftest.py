"""With ``CELERY_UNIQUE_CHECK_KEYS=1`` (CI sets it on one server), every command a script
runs on the session's server is checked, as the suite runs, to touch only keys its
``EVALSHA`` declared in ``KEYS``: what Redis Cluster needs of a key's slot, an ACL of a
key's pattern, and Dragonfly of every key (it refuses an undeclared one)."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_unique.scripts import Scripts

#: A quoted argument of a MONITOR line, escapes kept as they are (keys compare so).
_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')
#: The position of the keys in each command our scripts run (1: the first argument).
_KEYS_AT: dict[bytes, str] = {b"TIME": "none", b"DEL": "all"}


def parse(line: bytes) -> tuple[bool, list[bytes]]:
    """A MONITOR line: whether a script ran it, and its arguments (the command first)."""
    head, _, rest = line.partition(b"] ")
    return head.endswith(b" lua"), _ARG.findall(rest)


def undeclared(lines: list[bytes]) -> list[str]:
    """The script commands that touched a key their ``EVALSHA`` did not declare.

    A script's commands run together, right after its ``EVALSHA`` (fed to MONITOR when it
    starts) or right before it (when it ends, as newer servers do): each run of them is
    matched with the ``EVALSHA`` beside it.
    """
    parsed = [parse(line) for line in lines]
    found: list[str] = []
    for i, (from_script, args) in enumerate(parsed):
        if not from_script or not args:
            continue
        declared = _declared_beside(parsed, i)
        if declared is None:
            found.append(f"no EVALSHA beside {args!r}")
            continue
        where = _KEYS_AT.get(args[0].upper(), "first")
        keys = [] if where == "none" else args[1:] if where == "all" else args[1:2]
        found.extend(f"{args[0].decode()} on {key.decode()!r}, not among {declared!r}"
                     for key in keys if key not in declared)
    return found


def _declared_beside(parsed: list[tuple[bool, list[bytes]]], i: int) -> set[bytes] | None:
    for step in (-1, 1):
        j = i
        while 0 <= j < len(parsed) and parsed[j][0]:
            j += step
        if 0 <= j < len(parsed) and parsed[j][1][:1] == [b"EVALSHA"]:
            args = parsed[j][1]
            return set(args[3:3 + int(args[2])])
    return None


class Monitor:
    """MONITOR on a raw socket, every line kept (redis-py's parser joins the arguments
    with spaces, which a message's JSON holds too). Some tests restart the server: the
    monitor connects again, and goes on."""

    def __init__(self, port: int) -> None:
        self.lines: list[bytes] = []
        self._port = port
        self._closed = threading.Event()
        self._sock = self._connect()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self._port))
        sock.sendall(b"MONITOR\r\n")
        return sock

    def _read(self) -> None:
        while not self._closed.is_set():
            self._read_until_closed()
            while not self._closed.is_set():
                try:
                    self._sock = self._connect()
                    break
                except OSError:  # restarting: try again shortly
                    self._closed.wait(0.02)

    def _read_until_closed(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = self._sock.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            *complete, buffer = buffer.split(b"\r\n")
            self.lines.extend(line[1:] for line in complete if line.startswith(b"+"))

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self._thread.join(5)


@pytest.fixture(scope="session", autouse=True)
def _keys_declared(request: pytest.FixtureRequest) -> Iterator[None]:
    if not os.environ.get("CELERY_UNIQUE_CHECK_KEYS"):
        yield
        return
    server: Any = request.getfixturevalue("unique_redis_server")
    monitor = Monitor(server.port)
    yield
    monitor.close()
    problems = undeclared(monitor.lines)
    assert not problems, "\n".join(sorted(set(problems))[:50])
    # Every script was run, so every script was checked: by this process's tests, or,
    # split over pytest-xdist's processes, by theirs together (the last one to end looks).
    sent = {args[1].decode() for _, args in map(parse, monitor.lines)
            if args[:1] == [b"EVALSHA"]}
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run:
        folder = Path(tempfile.gettempdir()) / f"celery-unique-scripts-{run}"
        folder.mkdir(exist_ok=True)
        (folder / os.environ["PYTEST_XDIST_WORKER"]).write_text("\n".join(sent))
        seen = list(folder.iterdir())
        if len(seen) < int(os.environ["PYTEST_XDIST_WORKER_COUNT"]):
            return  # another process ends later
        sent = {sha for path in seen for sha in path.read_text().split()}
    scripts = {name: hashlib.sha1(value.encode()).hexdigest()
               for name, value in vars(Scripts).items()
               if name.isupper() and isinstance(value, str) and "redis.call" in value}
    assert len(scripts) >= 13, scripts
    assert not [name for name, sha in scripts.items() if sha not in sent]
