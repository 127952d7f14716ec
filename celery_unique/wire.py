"""What travels: the job header, the parked message and the sweepers' registry entry.

Every format that leaves a process, in a message or in Redis, is written and read here
and nowhere else; the Lua scripts that read them say so where they do. No I/O.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Union

from kombu.serialization import loads

__all__ = ["HEADER", "JobHeader", "Lock", "ParkedMessage", "ParkedSignature",
           "RegistryEntry", "decode_parked", "run_id", "wait_seconds"]

#: The message header carrying a job's locks to the worker (:class:`JobHeader`).
HEADER = "celery_unique"


class Lock(NamedTuple):
    """One job's execution lock, as carried in its message header."""

    base: str  #: the lock's Redis key prefix (``prefix:l:{name}``)
    mode: str  #: on_locked
    limit: int
    lease_ms: int
    wait_ms: int  #: how long a line entry may take to reach a worker

    @classmethod
    def of_header(cls, value: Any, p: str = "") -> Lock | None:
        """The lock a header's value names (:class:`JobHeader`), if any; reads nothing
        else (the worker's main process reads it for every message). ``p="r"``: its rate
        limit instead."""
        if not isinstance(value, dict) or not value.get(p + "l"):
            return None
        return cls(value[p + "l"], value[p + "o"], int(value[p + "n"]), int(value[p + "lt"]),
                   int(value[p + "lw"]))


class JobHeader(NamedTuple):
    """The job's locks, as its message carries them under :data:`HEADER`.

    The worker never rebuilds a key it can read here. (A named tuple: one is made for
    every enqueue, and a frozen dataclass costs several times as much to make.)
    """

    queueing_key: str | None = None  #: ``"q"``: the queueing lock's key
    lease_ms: int = 0  #: ``"t"``: the queueing lock's lease (ms)
    until: str | None = None  #: ``"until"``: ``"started"``, ``"finished"`` or ``"expired"``
    lock: Lock | None = None  #: ``"l"``, ``"o"``, ``"n"``, ``"lt"``, ``"lw"``
    on_store_error: str | None = None  #: ``"e"``: the worker's policy, when set per call
    #: ``"k"``: the job's queue as the broker hook pushed it (kombu's key)
    queue: str | None = None
    #: ``"w"``, ``"d"``, ``"s"``: how often the job was published again while it waited
    #: for its lock (``on_locked="retry"``), for a copy of itself, or for the lock store.
    attempts: Mapping[str, int] = MappingProxyType({})
    #: ``"p"``: when the job took its place in line (its enqueue, in "order" mode) or first
    #: asked for its lock, wall clock in ms; 0: not yet. Only measured (metrics), never
    #: decided on.
    placed_ms: int = 0
    #: ``"r"``: the job may be replaced (its task's ``on_duplicate="replace"``): it asks at
    #: its start whether it was.
    replaceable: bool = False
    #: ``"rl"``, ``"ro"``, ``"rn"``, ``"rlt"``, ``"rlw"``: its ``global_rate_limit``, kept
    #: as a lock whose ``limit`` jobs each hold a start for the period (``lease_ms``).
    rate: Lock | None = None

    def to_header(self) -> dict[str, Any]:
        """The header's value (JSON-ready, short names: it travels with every message)."""
        # Dict literals, not update(): this runs on every enqueue.
        out: dict[str, Any] = {} if self.queueing_key is None else {
            "q": self.queueing_key, "t": self.lease_ms, "until": self.until}
        lock = self.lock
        if lock is not None:
            out["l"], out["o"], out["n"] = lock.base, lock.mode, lock.limit
            out["lt"], out["lw"] = lock.lease_ms, lock.wait_ms
        if self.on_store_error is not None:
            out["e"] = self.on_store_error
        if self.queue is not None:
            out["k"] = self.queue
        if self.attempts:
            out.update(self.attempts)
        if self.placed_ms:
            out["p"] = self.placed_ms
        if self.replaceable:
            out["r"] = 1
        rate = self.rate
        if rate is not None:
            out["rl"], out["ro"], out["rn"] = rate.base, rate.mode, rate.limit
            out["rlt"], out["rlw"] = rate.lease_ms, rate.wait_ms
        return out

    @classmethod
    def from_header(cls, value: Any) -> JobHeader | None:
        """The header's value read back; None when it holds no lock of ours."""
        if not isinstance(value, dict) or not (value.get("q") or value.get("l") or
                                               value.get("rl")):
            return None
        return cls(value.get("q") or None, int(value.get("t") or 0), value.get("until"),
                   Lock.of_header(value),
                   value.get("e"), value.get("k"),
                   {k: int(value[k]) for k in ATTEMPTS if k in value},
                   int(value.get("p") or 0), bool(value.get("r")), Lock.of_header(value, "r"))

    @classmethod
    def of_request(cls, request: Any) -> JobHeader | None:
        """The header of a running job's request (Celery's task request)."""
        headers = getattr(request, "headers", None)
        # Celery's own tests run jobs eagerly with headers that are not a dict.
        value = (headers.get(HEADER) if isinstance(headers, dict) else None) or getattr(
            request, HEADER, None)
        return cls.from_header(value)

    def line_at_enqueue(self, later: bool) -> Lock | None:
        """The line whose place the job takes at enqueue (its creation order): its lock's
        in "order" mode, else its rate limit's when it waits; None when it starts
        ``later`` (a countdown or eta, eager mode) or has none: then it takes its place
        when it starts."""
        lock = self.lock if self.lock is not None and self.lock.mode == "order" else self.rate
        return None if later or lock is None or lock.mode != "order" else lock

    def lock_to_check(self, check: bool) -> Lock | None:
        """``lock_check_at_enqueue``: the lock whose holders refuse the enqueue (que-locks'
        preemptive check: only a job that would be skipped is not queued)."""
        lock = self.lock
        return lock if check and lock is not None and lock.mode == "skip" else None

    def attempt(self, counter: str) -> int:
        """How often the job was published again for ``counter`` (see :attr:`attempts`)."""
        return int(self.attempts.get(counter, 0))


#: The counters of :attr:`JobHeader.attempts`: waiting for the lock ("retry" mode), for a
#: copy of the job, for the lock store.
ATTEMPTS = ("w", "d", "s")


def set_queue(value: dict[str, Any], queue: str) -> None:
    """Write the job's queue (``"k"``) into a header value about to be pushed."""
    value["k"] = queue


def set_placed(value: dict[str, Any], at_ms: int) -> None:
    """Write when the job took its place in line (``"p"``) into a header value."""
    value["p"] = at_ms


def now_ms() -> int:
    """The wall clock in ms, as :attr:`JobHeader.placed_ms` takes it."""
    return int(time.time() * 1000)


def wait_seconds(countdown: Any, eta: Any) -> float:
    """How long a message waits before it may run (its ``countdown`` or ``eta``)."""
    if countdown:
        return max(0.0, float(countdown))
    if eta:
        if isinstance(eta, str):
            eta = datetime.datetime.fromisoformat(eta)
        if isinstance(eta, datetime.datetime):
            now = datetime.datetime.now(eta.tzinfo) if eta.tzinfo else datetime.datetime.now()
            return max(0.0, (eta - now).total_seconds())
    return 0.0


def rate_token(job_id: str, retries: Any) -> str:
    """A run's token under its rate limit: each run is a start of its own (its first is
    the job's id: the place in line its enqueue took)."""
    return f"{job_id}:{int(retries)}" if retries else job_id


def run_id(request: Any) -> str:
    """One run of a job: its task id and retries (a retry is another run)."""
    return f"{request.id}:{int(request.retries or 0)}"


# -- the parked message ------------------------------------------------------------------
#
# A job waiting for its lock without a worker slot is kept in Redis as one string:
# - kombu's own message (the atomic path): "\x01" queue "\n" message, pushed as it is onto
#   its queue when the job is handed the lock (the lock scripts' ``push`` reads this form);
#   its delivery tag is "<task id>.cu", replaced by a fresh one at each push, so that a
#   message pushed twice never shares kombu's unacked entry;
# - a Celery signature: content type "\n" encoding "\n" data, published again by Celery.

_KOMBU = "\x01"


@dataclasses.dataclass(frozen=True)
class ParkedMessage:
    """kombu's own message, parked with the queue it is pushed back onto."""

    queue: str
    body: str  #: the message as kombu's Redis transport pushes it (JSON)

    @staticmethod
    def captured_tag(task_id: str) -> str:
        """The delivery tag a parked message carries until it is pushed."""
        return f"{task_id}.cu"

    def encode(self) -> str:
        return f"{_KOMBU}{self.queue}\n{self.body}"

    def fresh_body(self, token: str) -> str:
        """The body under a delivery tag of its own, as the lock scripts push it."""
        return self.body.replace(f'"{self.captured_tag(token)}"',
                                 f'"{token}.{time.time_ns()}"', 1)

    def task_name(self) -> str:
        return str(json.loads(self.body)["headers"]["task"])


@dataclasses.dataclass(frozen=True)
class ParkedSignature:
    """A Celery signature, serialized as the task's serializer does."""

    content_type: str
    encoding: str
    data: str

    def encode(self) -> str:
        return f"{self.content_type}\n{self.encoding}\n{self.data}"

    def signature(self) -> dict[str, Any]:
        """The signature's fields (``Signature(fields, app=app)`` makes it again)."""
        raw: Any = self.data.encode("latin-1") if self.encoding == "binary" else self.data
        body: dict[str, Any] = loads(  # type: ignore[no-untyped-call]
            raw, self.content_type, self.encoding, accept=[self.content_type])
        return body

    def task_name(self) -> str:
        return str(self.signature()["task"])

    @classmethod
    def of(cls, content_type: str, encoding: str, data: str | bytes) -> ParkedSignature:
        """From kombu's ``dumps`` (bytes for a binary serializer such as pickle)."""
        if isinstance(data, bytes):
            data = data.decode(encoding if encoding != "binary" else "latin-1")
        return cls(content_type, encoding, data)


Parked = Union[ParkedMessage, ParkedSignature]


def decode_parked(text: str) -> Parked:
    """A parked message read back from Redis."""
    if text.startswith(_KOMBU):
        queue, body = text[1:].split("\n", 1)
        return ParkedMessage(queue, body)
    content_type, encoding, data = text.split("\n", 2)
    return ParkedSignature(content_type, encoding, data)


# -- the sweepers' registry --------------------------------------------------------------

class RegistryEntry(NamedTuple):
    """A lock with parked jobs, as the sweepers' registry lists it (``limit|lease|base``)."""

    limit: int
    lease_ms: int
    base: str

    def member(self) -> str:
        return f"{self.limit}|{self.lease_ms}|{self.base}"

    @classmethod
    def parse(cls, member: str) -> RegistryEntry:
        limit, lease_ms, base = member.split("|", 2)
        return cls(int(limit), int(lease_ms), base)

    @staticmethod
    def suffix(base: str) -> str:
        """What every member for the lock ``base`` ends with (to find it by ``ZSCAN``)."""
        return f"|{base}"
