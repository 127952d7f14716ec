"""The execution lock's scripts against a real Redis server (the session's private one).

Each test drives the store's lock methods as the worker does: ``acquire_lock``, ``park``,
``release_lock``, ``extend`` and ``sweep_lock`` on one lock, with tokens standing for jobs.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import uuid
from typing import Any

import pytest
import redis

from celery_unique.keys import lock_keys
from celery_unique.scripts import Grant
from celery_unique.store import Store
from celery_unique.testing import RedisServer, wait_for
from tests.helpers import flat

LEASE = 60_000


def text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


class Lock:
    """One lock's scripts, called as the worker calls them."""

    def __init__(self, store: Store, limit: int = 1, lease: int = LEASE) -> None:
        self.store, self.limit, self.lease = store, limit, lease
        self.base = f"celery_unique:l:{{test-{uuid.uuid4().hex[:8]}}}"

    def acquire(self, token: str, mode: str = "order", wait: int = 3_600_000,
                again: bool = False, run: str = "") -> list[Any]:
        return flat(self.store.acquire_lock(
            self.base, token=token, limit=self.limit, lease_ms=self.lease, mode=mode,
            wait_ms=wait, asks_again=again, run=run))

    def park(self, token: str, message: str) -> list[Any]:
        return flat(self.store.park(self.base, token=token, limit=self.limit,
                                    lease_ms=self.lease, message=message))

    def release(self, token: str, ran: str = "", keep: int = 60_000) -> list[Any]:
        return flat(self.store.release_lock(self.base, token=token, limit=self.limit,
                                            lease_ms=self.lease, ran=ran,
                                            remember_ms=keep if ran else 0))

    def extend(self, token: str) -> int:
        return int(self.store.extend(self.base, token=token, lease_ms=self.lease))

    def sweep(self) -> list[Any]:
        return flat(self.store.sweep_lock(self.base, limit=self.limit, lease_ms=self.lease))

    def keys(self) -> list[bytes]:
        return [k for k in self.store.client.keys(f"{self.base}:*")
                if not k.endswith((b":seq", b":ran"))]


def make_store(server: RedisServer) -> Store:
    return Store.from_url(f"{server.url}/1")


def test_release_is_owner_checked_and_hands_over_in_line_order(
    unique_redis_server: RedisServer,
) -> None:
    lock = Lock(make_store(unique_redis_server))
    held = lock.acquire("a")
    assert held[0] == 1
    for token in "bc":
        assert lock.acquire(token)[:2] == [0, "a"]
        assert lock.park(token, f"message-{token}")[:2] == [0, "a"]
    assert lock.release("x") == [0]  # not the holder: nothing happens
    assert lock.extend("a") == 1
    assert lock.release("a") == [1, "b", "message-b"]  # b is handed the lock
    assert lock.extend("b") == 1
    taken = lock.acquire("b")  # its message, published again, reaches a worker
    assert taken[0] == 1 and int(taken[1]) > int(held[1])
    assert lock.release("b") == [1, "c", "message-c"]
    assert lock.acquire("c")[0] == 1
    assert lock.release("c") == [1]
    assert lock.keys() == []
    # Only the fence counter stays, and not for long.
    assert 0 < lock.store.client.pttl(f"{lock.base}:seq") <= 3_600_000


def test_lease_runs_out_and_the_old_holder_is_told(unique_redis_server: RedisServer) -> None:
    lock = Lock(make_store(unique_redis_server), lease=300)
    first = lock.acquire("a", mode="retry")
    assert first[0] == 1
    assert lock.acquire("b", mode="retry")[:2] == [0, "a"]
    second = wait_for(lambda: (r := lock.acquire("b", mode="retry"))[0] == 1 and r,
                      timeout=5, what="a's lease to run out")
    assert int(second[1]) > int(first[1])  # fence
    assert lock.extend("a") == 0  # lost: renewal tells the job
    assert lock.release("a") == [0]  # and its late release leaves b's lock alone
    assert lock.extend("b") == 1


def test_what_a_release_and_a_hand_over_tell_the_metrics(
    unique_redis_server: RedisServer,
) -> None:
    """A job handed the lock learns, when it takes it, how long ago (the store's clock);
    a release after the lease ran out says so (not "held", not nothing)."""
    lock = Lock(make_store(unique_redis_server), lease=300)
    store = lock.store
    assert lock.acquire("a")[0] == 1
    assert store.acquire_lock(lock.base, token="b", limit=1, lease_ms=300, mode="order",
                              wait_ms=3_600_000).handed_ms == -1  # not taken: no hand-over
    lock.park("b", "message-b")
    assert lock.release("a")[:2] == [1, "b"]
    taken = store.acquire_lock(lock.base, token="b", limit=1, lease_ms=300, mode="order",
                               wait_ms=3_600_000)
    assert taken.grant is Grant.TAKEN and 0 <= taken.handed_ms < 300
    # b's lease runs out before its end releases it: a frozen job, a lost pool process
    # seen late.
    deadline = store.client.zscore(lock_keys(lock.base)[0], "b")
    wait_for(lambda: (lambda t: t[0] * 1000 + t[1] // 1000)(store.client.time()) > deadline,
             timeout=5, what="b's lease to run out")
    released = store.release_lock(lock.base, token="b", limit=1, lease_ms=300)
    assert (released.held, released.expired) == (False, True)
    assert store.release_lock(lock.base, token="b", limit=1, lease_ms=300).expired is False


def test_a_place_gets_its_full_wait_once_published_unless_a_worker_marked_it(
    unique_redis_server: RedisServer,
) -> None:
    """Off the atomic path a place is taken on the publish lease; ``PUBLISHED`` gives it
    its full wait, but only over the deadline ENTER_LINE wrote: a worker that received the
    job first keeps its own (shorter) mark, which its sweep renews."""
    lock = Lock(make_store(unique_redis_server))
    store = lock.store
    arrival = lock_keys(lock.base)[4]
    first = store.enter_line(lock.base, "a", 1000)  # the publish lease
    assert store.published("a", place=(lock.base, first), wait_ms=3_600_000).place
    assert store.client.zscore(arrival, "a") > float(first.deadline) + 3_000_000
    second = store.enter_line(lock.base, "b", 1000)
    store.arrive(lock.base, lease_ms=30_000, tokens=["b"])  # received by a worker
    marked = store.client.zscore(arrival, "b")
    assert marked != float(second.deadline)
    assert not store.published("b", place=(lock.base, second), wait_ms=3_600_000).place
    assert store.client.zscore(arrival, "b") == marked


def test_limit_two_is_a_semaphore_in_order(unique_redis_server: RedisServer) -> None:
    lock = Lock(make_store(unique_redis_server), limit=2)
    a, b = lock.acquire("a"), lock.acquire("b")
    assert a[0] == b[0] == 1 and int(b[1]) > int(a[1])
    assert lock.acquire("c")[0] == 0
    lock.park("c", "message-c")
    assert lock.acquire("d")[0] == 0
    lock.park("d", "message-d")
    assert lock.release("b") == [1, "c", "message-c"]
    assert lock.release("a") == [1, "d", "message-d"]
    fences = [int(lock.acquire(t)[1]) for t in "cd"]
    assert int(b[1]) < fences[0] < fences[1]


def test_a_fence_is_above_every_earlier_one_and_the_time_of_its_grant(
    unique_redis_server: RedisServer,
) -> None:
    """The short take (nobody holds the lock, the job first in line) gives the next
    fence, never the job's ticket, though that ticket may be the last one given: a fence
    is above the server's time (µs) at its grant, so that after a failover that lost a
    grant and its fence, a later grant on the promoted replica has the higher one."""
    lock = Lock(make_store(unique_redis_server))
    store = lock.store
    given: dict[str, int] = {}  # every ticket and fence given, by its job

    def enter(token: str) -> None:
        given[token] = int(store.enter_line(lock.base, token, 3_600_000).ticket)

    def server_us() -> int:
        seconds, micros = store.client.time()
        return int(seconds * 1_000_000 + micros)

    def take(token: str, mode: str = "order") -> None:
        # Each grant in a later ms than anything given before (a ticket from the grant's
        # own ms would pass for a fresh fence).
        wait_for(lambda: server_us() // 1000 * 1000 > max(given.values(), default=0),
                 timeout=5, what="the server's clock to move on")
        granted_at = server_us() // 1000 * 1000
        fence = int(lock.acquire(token, mode=mode)[1])
        assert fence > max(given.values(), default=0), (token, fence, given)
        assert fence >= granted_at, (token, fence, granted_at)
        given[f"{token} fence"] = fence

    enter("a")  # its ticket is the last given when it takes the lock
    take("a")
    assert lock.release("a") == [1]
    enter("b")
    take("n", mode="retry")  # a job without a place takes the lock meanwhile
    assert lock.release("n") == [1]
    take("b")
    assert lock.release("b") == [1]
    enter("c")
    enter("d")
    take("c")
    assert lock.release("c") == [1]
    take("d")
    assert lock.release("d") == [1]
    assert lock.keys() == []


def test_the_fence_counter_is_written_in_place_within_a_minute_of_its_ttl(
    unique_redis_server: RedisServer,
) -> None:
    """The counter is given an hour when written; within a minute of that it is written
    in place (its TTL kept), past it written again with a new hour: the fence given is the
    counter's new value either way."""
    lock = Lock(make_store(unique_redis_server))
    client, seq = lock.store.client, lock_keys(lock.base)[3]
    for ttl, renewed in ((3_590_000, False), (1_800_000, True)):
        lock.store.enter_line(lock.base, "a", 3_600_000)
        client.pexpire(seq, ttl)
        fence = int(lock.acquire("a")[1])
        assert fence == int(client.get(seq))
        assert (client.pttl(seq) > ttl) is renewed, (ttl, client.pttl(seq))
        assert lock.release("a") == [1]


def test_the_ran_record_outlives_none_of_its_entries_and_never_lives_forever(
    unique_redis_server: RedisServer,
) -> None:
    """A release remembers its run for its window: expired runs are pruned, and a record
    whose last entry went with the pruning gets the new window as its TTL (not the TTL it
    had, which a key deleted and made again does not keep)."""
    lock = Lock(make_store(unique_redis_server))
    client, ran = lock.store.client, lock_keys(lock.base)[5]
    client.zadd(ran, {"old:0": 1})  # ended long ago, in a record kept ten minutes
    client.pexpire(ran, 600_000)
    assert lock.acquire("a", mode="retry")[0] == 1
    assert lock.release("a", ran="a:0", keep=5_000) == [1]
    assert client.zrange(ran, 0, -1) == [b"a:0"]
    assert 0 < client.pttl(ran) <= 5_000


def test_a_place_whose_job_never_arrives_is_given_up(unique_redis_server: RedisServer) -> None:
    store = make_store(unique_redis_server)
    lock = Lock(store)
    store.send_enter_line(lock.base, "lost", 300).result()  # created first, never arrives
    # No holder, but "lost" is first in line (place 0): b waits, second (place 1).
    assert lock.acquire("b", wait=300)[:3] == [0, "", 1]
    wait_for(lambda: lock.acquire("b", wait=300)[0] == 1, timeout=5,
             what="the lost job's place to be given up")
    assert lock.release("b") == [1]
    assert lock.keys() == []


def test_sweep_wakes_a_parked_job_when_its_holder_died(
    unique_redis_server: RedisServer,
) -> None:
    lock = Lock(make_store(unique_redis_server), lease=300)
    assert lock.acquire("dead")[0] == 1  # its worker is killed: never released
    lock.acquire("b")
    lock.park("b", "message-b")
    early = lock.sweep()
    assert early == [early[0]] and 0 <= int(early[0]) <= 300  # look again when it is due
    woken = wait_for(lambda: (r := lock.sweep())[1:] and r, timeout=5,
                     what="the sweep to hand the lock over")
    assert woken[1:] == ["b", "message-b"]
    assert lock.acquire("b")[0] == 1


def _contender(url: str, base: str, rounds: int, out: Any) -> None:
    store = Store.from_url(url)
    spans = []
    deadline = time.monotonic() + 60
    for n in range(rounds):
        token = f"{multiprocessing.current_process().name}-{n}"
        while True:  # "retry" mode, polled: the fastest path through the script
            reply = store.acquire_lock(base, token=token, limit=1, lease_ms=LEASE,
                                       mode="retry", wait_ms=1000)
            if reply.grant == 1:
                break
            if time.monotonic() > deadline:
                out.put([])  # the parent sees too few spans and fails
                return
            time.sleep(0.001)
        start = time.time()
        time.sleep(0.001)
        spans.append((start, time.time(), reply.fence))
        store.release_lock(base, token=token, limit=1, lease_ms=LEASE)
    out.put(spans)


def test_contending_processes_never_overlap(unique_redis_server: RedisServer) -> None:
    """python-redis-lock's test: forked processes fight for one lock."""
    base = f"celery_unique:l:{{contend-{uuid.uuid4().hex[:8]}}}"
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    procs = [context.Process(target=_contender,
                             args=(f"{unique_redis_server.url}/1", base, 25, out))
             for _ in range(8)]
    for p in procs:
        p.start()
    spans = sorted(span for _ in procs for span in out.get(timeout=60))
    for p in procs:
        p.join(10)
    assert len(spans) == 200
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "two holders at once"
    fences = [f for *_, f in spans]
    assert fences == sorted(fences) and len(set(fences)) == 200
    assert [k for k in redis.Redis.from_url(f"{unique_redis_server.url}/1").keys(f"{base}:*")
            if not k.endswith((b":seq", b":ran"))] == []


def test_park_registers_the_lock_for_the_sweepers_in_the_same_script(
    unique_redis_server: RedisServer,
) -> None:
    """Nothing after a park can leave a parked job where no sweep looks (a separate
    registration used to fail the parked job with a raw ConnectionError)."""
    store = make_store(unique_redis_server)
    lock = Lock(store)
    registry = "celery_unique:l:waiting"
    store.client.delete(registry)
    assert lock.acquire("a")[0] == 1
    lock.acquire("b")
    reply = store.park(lock.base, token="b", limit=lock.limit, lease_ms=lock.lease,
                       message="message-b", registry=registry)
    assert flat(reply)[:3] == [0, "a", 0]
    member = f"{lock.limit}|{lock.lease}|{lock.base}"
    server_ms = store.client.time()[0] * 1000
    assert server_ms < store.client.zscore(registry, member) <= server_ms + lock.lease + 1000


def test_a_sweep_reschedules_its_lock_in_its_own_script(
    unique_redis_server: RedisServer,
) -> None:
    """A worker's sweep of a registered lock is one round trip: the script that hands the
    places on also reschedules the lock (due when its first lease ends) or, nothing left
    parked, unregisters it. Only on a Cluster does the worker send a command more."""
    from celery import Celery

    from celery_unique.runtime import sweep_lock
    from celery_unique.wire import RegistryEntry

    store = make_store(unique_redis_server)
    lock = Lock(store, lease=300)
    registry = "celery_unique:l:waiting"
    entry = RegistryEntry(lock.limit, lock.lease, lock.base)
    assert lock.acquire("a")[0] == 1
    lock.acquire("b")
    store.park(lock.base, token="b", limit=lock.limit, lease_ms=lock.lease,
               message="message-b", registry=registry)
    store.client.zadd(registry, {entry.member(): 0})  # due now
    sent: list[str] = []
    real = store.reschedule
    store.reschedule = lambda *a: (sent.append("reschedule"), real(*a))  # type: ignore
    app = Celery("sweep", set_as_current=False)
    assert sweep_lock(app, store, registry, entry.member(), entry) == 0  # a holds it
    ends = store.client.zscore(f"{lock.base}:holders", "a")
    assert store.client.zscore(registry, entry.member()) == ends  # due when a's lease ends
    wait_for(lambda: sweep_lock(app, store, registry, entry.member(), entry) == 1,
             timeout=2, what="a's lease to run out and b to be woken")
    # b is handed the lock: looked at again when that lease ends, should it never start.
    handed = store.client.zscore(f"{lock.base}:holders", "b")
    assert store.client.zscore(registry, entry.member()) == handed
    assert lock.acquire("b")[0] == 1  # it starts
    assert sweep_lock(app, store, registry, entry.member(), entry) == 0
    assert store.client.zscore(registry, entry.member()) is None  # nothing parked
    assert sent == []


def test_a_volatile_lock_store_is_told_apart(unique_redis_server: RedisServer) -> None:
    """The worker's durability hint: warned of only where nothing survives a restart."""
    from celery_unique.runtime import volatile

    assert volatile(make_store(unique_redis_server))  # --save "" --appendonly no
    for options in (("--appendonly", "yes"), ("save", "900 1"),
                    ("--rename-command", "CONFIG", "")):  # managed Redis: cannot tell
        with RedisServer(*options if options[0].startswith("--") else ()) as server:
            if not options[0].startswith("--"):
                # Set once running: Redis 6.2 keeps the first of two --save options.
                redis.Redis.from_url(server.url).config_set(*options)
            assert not volatile(Store.from_url(server.url)), options


def test_a_received_place_not_renewed_is_given_up_within_a_lease(
    unique_redis_server: RedisServer,
) -> None:
    """A worker that received a job and died (its prefetched messages) stops renewing:
    the place is given up after one lease, not after queueing_lock_timeout."""
    store = make_store(unique_redis_server)
    lock = Lock(store, lease=400)
    for token in ("held", "b"):
        store.send_enter_line(lock.base, token, 3_600_000).result()
    store.arrive(lock.base, lease_ms=lock.lease, tokens=["held"])  # received by a worker
    assert lock.acquire("b")[:3] == [0, "", 1]  # behind "held"
    lock.park("b", "message-b")
    for _ in range(3):  # its worker renews it while it holds the message: kept
        store.arrive(lock.base, lease_ms=lock.lease, tokens=["held"])
        assert lock.sweep()[1:] == []
        time.sleep(0.2)  # the renewing worker's pace, not a wait for a condition
    woken = wait_for(lambda: (r := lock.sweep())[1:] and r, timeout=3,
                     what="the dead worker's place to be given up")
    assert woken[1:] == ["b", "message-b"]


def test_a_place_on_its_way_gets_one_lease_once_a_later_job_arrived(
    unique_redis_server: RedisServer,
) -> None:
    """A job created first whose message never reaches a worker (lost by the broker,
    or by a worker that died before receiving it): once a job created after it reaches a
    worker, it keeps its place for one lease, not for queueing_lock_timeout."""
    store = make_store(unique_redis_server)
    lock = Lock(store, lease=400)
    for token in ("lost", "b"):
        store.send_enter_line(lock.base, token, 3_600_000).result()
    assert lock.acquire("b")[:3] == [0, "", 1]
    start = time.monotonic()
    wait_for(lambda: lock.acquire("b")[0] == 1, timeout=3, what="lost's place to go")
    assert time.monotonic() - start >= 0.3


def test_a_copy_of_a_running_job_never_runs_beside_it(unique_redis_server: RedisServer) -> None:
    """A job id already holding the lock: its own when it was handed the lock (parked) or
    when the same process asks again after a lost reply; any other copy is told so."""
    lock = Lock(make_store(unique_redis_server))
    assert lock.acquire("a")[0] == 1
    for mode in ("order", "retry", "skip"):
        assert lock.acquire("a", mode) == [2, "a", -1]  # a copy: the broker gave it back
    assert lock.acquire("a", again=True)[0] == 1  # its own ask, whose reply was lost
    assert lock.acquire("b")[0] == 0
    assert lock.park("b", "message-b")[0] == 0
    woken = lock.release("a")
    assert woken == [1, "b", "message-b"]  # handed to b, its message still parked
    assert lock.acquire("b")[0] == 1  # the handed job takes what it was handed
    assert lock.acquire("b") == [2, "b", -1]  # and a later copy of it does not
    assert lock.release("b")[0] == 1
    assert lock.keys() == []


def test_a_run_that_ended_is_not_run_again_by_a_late_copy(
    unique_redis_server: RedisServer,
) -> None:
    """A run that ended on a worker ("token:retries") is remembered for the window the
    worker gives: a late copy of it is told so ({3}); its retry is another run."""
    lock = Lock(make_store(unique_redis_server))
    assert lock.acquire("a", run="a:0")[0] == 1
    assert lock.release("a", ran="a:0", keep=60_000)[0] == 1
    assert lock.acquire("a", run="a:0") == [3, "a", -1]  # a late copy of that run
    assert lock.acquire("a", "skip", run="a:0") == [3, "a", -1]
    assert lock.acquire("a", run="a:1")[0] == 1  # its retry runs
    assert lock.release("a", ran="a:1", keep=1)[0] == 1  # remembered for 1 ms only
    wait_for(lambda: lock.acquire("a", run="a:1")[0] == 1, timeout=5,
             what="the 1 ms window to pass")
    assert lock.release("a")[0] == 1
    assert lock.acquire("a", run="a:0") == [3, "a", -1]  # the longer window is kept
    assert 0 < lock.store.client.pttl(f"{lock.base}:ran") <= 60_000
    assert lock.keys() == []


def test_the_places_of_several_locks_are_marked_in_one_round_trip(
    unique_redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's sweep marks the places it holds for all its locks with one pipeline;
    a script the server lost (SCRIPT FLUSH, a restart) is loaded and run again."""
    store = make_store(unique_redis_server)
    locks = [Lock(store) for _ in range(3)]
    for lock in locks:
        store.send_enter_line(lock.base, "held", 3_600_000).result()
    marks = [(lock.base, 5_000, ["held"]) for lock in locks]
    def evalshas() -> int:
        stats = store.client.info("commandstats").get("cmdstat_evalsha", {})
        return int(stats.get("calls", 0))  # refused ones (NOSCRIPT) included

    store.arrive(locks[0].base, lease_ms=5_000, tokens=["held"])  # the script is loaded

    writes: list[int] = []
    send = redis.connection.Connection.send_packed_command

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        writes.append(1)
        return send(self, *args, **kwargs)

    for flush in (False, True):
        if flush:
            store.client.script_flush()
        before = evalshas()
        writes.clear()
        monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counted)
        store.arrive_many(marks)
        monkeypatch.undo()
        sent = evalshas() - before
        if not flush:
            assert len(writes) == 1  # one round trip for the three locks
        server_ms = store.client.time()[0] * 1000
        for lock in locks:  # each place now one lease ahead, not an hour
            deadline = store.client.zscore(f"{lock.base}:arrival", "held")
            assert deadline is not None and server_ms < deadline <= server_ms + 6_000
        # Three EVALSHAs, pipelined; after a flush, the three are refused and run again
        # alone (the first of those refused too, then loaded).
        assert sent == (3 if not flush else 7), sent


def test_a_job_coming_back_after_its_place_expired_still_waits_in_line(
    unique_redis_server: RedisServer,
) -> None:
    """Found by the broker-restart runs: a worker received two jobs (their places a lease
    ahead) and died with the holder; the broker gave the messages back after the places'
    deadline. Asking for the free lock, a job gave its own expired place up inside the
    script and was told to wait with no place at all: the worker failed it on that
    reply. A job that has arrived keeps its place now, and both run, in turn."""
    store = make_store(unique_redis_server)
    lock = Lock(store, lease=300)
    assert lock.acquire("holder")[0] == 1
    for token in ("first", "second"):
        store.send_enter_line(lock.base, token, 3_600_000).result()
    store.arrive(lock.base, lease_ms=lock.lease, tokens=["first", "second"])
    time.sleep(0.4)  # past the holder's lease and the places' deadline: the fault
    # "second"'s message comes back first: "first"'s place, expired and still away, is
    # given up (the liveness rule), so "second" takes the free lock.
    assert lock.acquire("second")[0] == 1
    reply = lock.acquire("first")  # back late: it waits, with a place (was: none)
    assert reply[0] == 0 and reply[1] == "second" and reply[2] == 0, reply
    lock.park("first", "message-first")
    assert lock.release("second")[1:] == ["first", "message-first"]


def test_a_rate_limits_starts_outlive_the_key_s_lease_when_handed_on(
    unique_redis_server: RedisServer,
) -> None:
    """A rate limit's holders key expires with its newest start (nothing releases it).
    A start the sweep hands a parked job is newer than the last one its workers took:
    the key must live until it ends too, or the limit would be forgotten and more jobs
    start than it allows."""
    store = make_store(unique_redis_server)
    base = f"celery_unique:r:{{rate-{uuid.uuid4().hex[:8]}}}"

    def ask(token: str) -> int:
        return int(store.acquire_lock(base, token=token, limit=2, lease_ms=300, mode="order",
                                      wait_ms=60_000, rate=True).grant)

    assert ask("a") == 1
    time.sleep(0.15)  # the scenario's timing: b starts half a period later
    assert ask("b") == 1  # the key now lives until b's start ends (t = 450 ms)
    assert ask("c") == 0
    store.park(base, token="c", limit=2, lease_ms=300, message="parked c")
    wait_for(lambda: store.sweep_lock(base, limit=2, lease_ms=300).woken, timeout=2,
             what="a's period to end and c to be handed a start")  # t = 300: until 600
    time.sleep(0.2)  # t = 500: b's period has ended, c's has not
    assert [ask(t) for t in ("d", "e")] == [1, 0], "c's start was forgotten"


def test_a_rate_limited_job_handed_its_start_twice_starts_once(
    unique_redis_server: RedisServer,
) -> None:
    """A parked job handed a start whose message comes late (behind a backlog) is handed
    one again when that start's period ends, and its message published again: two copies.
    The first to ask starts; the other is told its run started already."""
    store = make_store(unique_redis_server)
    base = f"celery_unique:r:{{rate-{uuid.uuid4().hex[:8]}}}"

    def ask(token: str) -> Grant:
        return store.acquire_lock(base, token=token, limit=1, lease_ms=200, mode="order",
                                  wait_ms=60_000, run=token, rate=True).grant

    assert ask("a") is Grant.TAKEN
    assert ask("b") is Grant.WAIT
    store.park(base, token="b", limit=1, lease_ms=200, message="parked b")
    for _ in range(2):  # handed, and, its copy not come, handed again: published twice
        wait_for(lambda: [w.token for w in store.sweep_lock(base, limit=1, lease_ms=200
                                                            ).woken] == ["b"],
                 timeout=2, what="b to be handed its start")
    assert [ask("b"), ask("b")] == [Grant.TAKEN, Grant.RAN]


def test_a_rate_limit_holds_exactly_on_the_store_s_clock(
    unique_redis_server: RedisServer,
) -> None:
    """Six threads ask for starts under one rate limit (5 per 200 ms) as fast as they
    can for 1.5 s, each ask a run of its own. The starts' grant times, on the store's
    clock (each run is remembered from its grant), never put more than 5 in any window
    of 200 ms, and the limit is used (no window longer than the period is idle)."""
    import threading

    store = make_store(unique_redis_server)
    base = f"celery_unique:r:{{rate-{uuid.uuid4().hex[:8]}}}"
    lease, keep = 200 + 5, 60_000
    until = time.monotonic() + 1.5

    def asker() -> None:
        while time.monotonic() < until:
            token = uuid.uuid4().hex
            store.acquire_lock(base, token=token, limit=5, lease_ms=lease, mode="skip",
                               wait_ms=0, run=token, rate=True)

    threads = [threading.Thread(target=asker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    granted = sorted(score - keep for run, score in store.client.zrange(
        f"{base}:ran", 0, -1, withscores=True) if b"#" not in run)  # not the asks
    fullest = max(sum(1 for t in granted[i:] if t < start + 200)
                  for i, start in enumerate(granted))
    assert fullest == 5, fullest
    assert len(granted) >= 5 * 1.5 / 0.21 - 5, len(granted)


def test_a_job_arriving_behind_a_long_line_costs_what_one_behind_a_few_does(
    unique_redis_server: RedisServer,
) -> None:
    """A rate limit's backlog puts thousands in one line. A job reaching a worker cuts
    the places of the jobs ahead of it still on their way to one lease: only the front
    of the line is looked at, not every place ahead (that made each ask cost the line's
    length). A job on its way deep in the line is cut when it reaches the front, by the
    wake that finds parked jobs behind it; then, not arriving, it is given up."""
    store = make_store(unique_redis_server)
    lock = Lock(store, limit=1, lease=300)
    assert lock.acquire("holder")[0] == 1
    for n in range(500):
        store.enter_line(lock.base, f"job-{n}", 3_600_000)

    def zscores() -> int:
        return int(store.client.info("commandstats")["cmdstat_zscore"]["calls"])

    before = zscores()
    assert lock.acquire("job-499")[0] == 0  # the back of the line reaches a worker
    assert zscores() - before < 100
    lock.park("job-499", "parked 499")
    # The front (job-0) never comes: once the holder's lease ends, the wake finds it
    # on its way with a job parked behind it, and gives it one lease.
    wait_for(lambda: lock.sweep() and store.client.zscore(f"{lock.base}:arrival", "job-0")
             < time.time() * 1000 + 1000, timeout=3, what="job-0's place to be cut")


def test_jobs_handed_the_lock_together_are_popped_in_line_order(
    unique_redis_server: RedisServer,
) -> None:
    """A script that hands places to several parked jobs at once (here: three leases ran
    out) pushes their messages at the head of their queue with the front of the line
    popped first (kombu pops from the right): from the script, when the queue is the
    asking job's, or from Python, after a sweep."""
    from celery_unique.broker import publish_woken
    from celery_unique.wire import ParkedMessage

    store = make_store(unique_redis_server)
    queue = f"order-{uuid.uuid4().hex[:8]}"
    tokens = ["first", "second", "third"]
    for in_script in (True, False):
        base = f"celery_unique:l:{{order-{uuid.uuid4().hex[:8]}}}"
        for token in ("a", "b", "c"):
            assert store.acquire_lock(base, token=token, limit=3, lease_ms=300,
                                      mode="order", wait_ms=60_000).grant is Grant.TAKEN
        for token in tokens:
            body = json.dumps({"id": token, "properties": {"delivery_tag": f"{token}.cu"}})
            store.park(base, token=token, limit=3, lease_ms=300,
                       message=ParkedMessage(queue, body).encode())
        time.sleep(0.35)  # the scenario: the three holders' leases run out together
        if in_script:  # a job asking behind them wakes them, onto its own queue
            reply = store.acquire_lock(base, token="late", limit=3, lease_ms=300,
                                       mode="order", wait_ms=60_000, queue=queue)
            assert reply.grant is Grant.WAIT
            woken = reply.woken
        else:
            woken = store.sweep_lock(base, limit=3, lease_ms=300).woken
            publish_woken(None, store, woken)  # type: ignore[arg-type]
        assert [w.token for w in woken] == tokens
        assert all(not w.message for w in woken) is in_script
        popped = [json.loads(store.client.rpop(queue))["id"] for _ in tokens]
        assert popped == tokens, in_script


def test_a_rate_limited_start_whose_reply_was_lost_is_its_own(
    unique_redis_server: RedisServer,
) -> None:
    """A start granted whose reply is lost (the connection drops while it is on its way)
    is asked again by the fallback, with the same command: the job is granted the start
    it took, not dropped as a copy of a run that started already. Another ask of the
    same run (a real copy of its message) still is."""
    from celery_unique.scripts import _raw, send

    store = make_store(unique_redis_server)
    base = f"celery_unique:r:{{rate-{uuid.uuid4().hex[:8]}}}"
    watcher = redis.Redis.from_url(f"{unique_redis_server.url}/1")
    lost = []
    store.acquire_lock(base + "-loaded", token="job", limit=1, lease_ms=1000, mode="order",
                       wait_ms=60_000, run="job", rate=True)  # the script is known

    def run_losing_the_reply(script: Any, keys: list[str], args: list[Any]) -> Any:
        pending = send(store.conns, store._call, script, keys, args, _raw)
        wait_for(lambda: watcher.zscore(f"{base}:holders", "job") is not None, timeout=5,
                 what="the start to be granted")
        lost.append(pending._conn)
        pending._conn.disconnect()  # the reply, on its way, is lost with the connection
        return pending.result()  # read fails: the fallback runs the command again

    store._run = run_losing_the_reply  # type: ignore[method-assign]
    reply = store.acquire_lock(base, token="job", limit=1, lease_ms=1000, mode="order",
                               wait_ms=60_000, run="job", rate=True)
    del store._run
    assert lost and reply.grant is Grant.TAKEN, reply
    assert store.acquire_lock(base, token="job", limit=1, lease_ms=1000, mode="order",
                              wait_ms=60_000, run="job", rate=True).grant is Grant.RAN
