"""UniqueTask's caller side against fakeredis and Celery's in-memory broker."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from celery import Celery, signals
from celery.exceptions import Ignore, Reject

from celery_unique import AlreadyQueued, ConfigurationError, KeyBuildError, UniqueTask
from celery_unique import signals as unique_signals
from celery_unique.state import app_state


@pytest.fixture
def published() -> Iterator[list[str]]:
    """Ids of the messages Celery published during the test."""
    ids: list[str] = []

    def record(headers: Any = None, **_: Any) -> None:
        ids.append(headers["id"])

    signals.after_task_publish.connect(record, weak=False)
    yield ids
    signals.after_task_publish.disconnect(record)


def qkey(task: Any, value: str) -> str:
    return f"celery_unique:q:{{{task.name}:{value}}}"


def keys(client: fakeredis.FakeRedis) -> list[str]:
    return sorted(k.decode() for k in client.keys("*"))


def test_duplicate_raises_with_context(app: Celery, fake_redis: Any, published: list[str]) -> None:
    @app.task(base=UniqueTask, queueing_lock="report_<email>", shared=False)
    def send_pdf_report(email: str) -> None: ...

    first = send_pdf_report.delay("alice@example.com")
    with pytest.raises(AlreadyQueued) as info:
        send_pdf_report.delay("alice@example.com")
    bob = send_pdf_report.delay("bob@example.com")
    assert published == [first.id, bob.id]
    assert info.value.key == qkey(send_pdf_report, "report_alice@example.com")
    assert info.value.task_id == first.id
    assert 3599 < info.value.ttl <= 3600
    assert fake_redis.get(info.value.key) == first.id.encode()


def test_on_duplicate_existing_returns_queued_job(app: Celery, published: list[str]) -> None:
    @app.task(base=UniqueTask, queueing_lock=True, on_duplicate="existing", shared=False)
    def t(a: int) -> None: ...

    first = t.delay(1)
    assert t.delay(1).id == first.id
    with pytest.raises(AlreadyQueued):
        t.apply_async((1,), on_duplicate="raise")
    assert published == [first.id]


def test_signal_sent_for_each_duplicate(app: Celery) -> None:
    seen: list[dict[str, Any]] = []

    def record(sender: Any = None, **kw: Any) -> None:
        seen.append(kw)

    unique_signals.duplicate_rejected.connect(record, weak=False)
    try:
        @app.task(base=UniqueTask, queueing_lock="k", shared=False)
        def t() -> None: ...

        first = t.delay()
        with pytest.raises(AlreadyQueued):
            t.delay()
        t.apply_async(on_duplicate="existing")
    finally:
        unique_signals.duplicate_rejected.disconnect(record)
    assert [s["action"] for s in seen] == ["raised", "existing"]
    assert seen[0]["task_id"] == first.id and seen[0]["key"] == qkey(t, "k")


def test_configure_signature_and_per_call(app: Celery, published: list[str]) -> None:
    @app.task(base=UniqueTask, shared=False)
    def t(a: int) -> None: ...

    t.configure(queueing_lock="maintenance").delay(a=1)
    with pytest.raises(AlreadyQueued):
        t.configure(queueing_lock="maintenance").delay(a=2)
    with pytest.raises(AlreadyQueued):
        t.s(3).set(queueing_lock="maintenance").delay()
    t.apply_async((4,), queueing_lock="other_{a}")
    # no lock configured on the task: plain Celery
    t.delay(5)
    t.delay(5)
    assert len(published) == 4


def test_per_call_none_switches_the_lock_off(app: Celery, published: list[str]) -> None:
    @app.task(base=UniqueTask, queueing_lock="k", shared=False)
    def t() -> None: ...

    t.delay()
    t.apply_async(queueing_lock=None)
    t.configure(queueing_lock=None).delay()
    assert len(published) == 3


def test_unique_on(app: Celery) -> None:
    @app.task(base=UniqueTask, queueing_lock=True, unique_on=["user_id"], shared=False)
    def charge(user_id: int, amount: int) -> None: ...

    charge.delay(1, 10)
    with pytest.raises(AlreadyQueued):
        charge.delay(1, 20)
    charge.delay(2, 10)


def test_registration_time_errors(app: Celery) -> None:
    app.finalize()
    with pytest.raises(ConfigurationError, match=r"test_task.t.*\{mail\}.*parameters: email"):
        @app.task(base=UniqueTask, queueing_lock="report_<mail>", shared=False)
        def t(email: str) -> None: ...
    with pytest.raises(ConfigurationError, match="on_duplicate must be one of"):
        @app.task(base=UniqueTask, queueing_lock="k", on_duplicate="ignore", shared=False)
        def t2() -> None: ...
    with pytest.raises(ConfigurationError, match="positive number of seconds"):
        @app.task(base=UniqueTask, queueing_lock="k", queueing_lock_timeout=0, shared=False)
        def t3() -> None: ...
    with pytest.raises(ConfigurationError, match="unique_on names"):
        @app.task(base=UniqueTask, queueing_lock=True, unique_on=["nope"], shared=False)
        def t4(a: int) -> None: ...


def test_lazy_tasks_fail_at_finalize(app: Celery) -> None:
    @app.task(base=UniqueTask, queueing_lock="report_{mail}", shared=False)
    def t(email: str) -> None: ...

    with pytest.raises(ConfigurationError, match="mail"):
        app.finalize()


def test_task_annotations_and_settings(app: Celery, fake_redis: Any) -> None:
    app.conf.task_annotations = {"tests.annotated": {"queueing_lock": "ann_{a}"}}
    app.conf.unique_key_prefix = "myapp"
    app.conf.unique_queueing_lock_timeout = 10

    @app.task(base=UniqueTask, name="tests.annotated", shared=False)
    def annotated(a: int) -> None: ...

    annotated.delay(1)
    assert keys(fake_redis) == ["myapp:q:{tests.annotated:ann_1}"]
    assert 9000 < fake_redis.pttl("myapp:q:{tests.annotated:ann_1}") <= 10000


def test_precedence_call_over_task_over_setting(app: Celery, fake_redis: Any) -> None:
    app.conf.unique_queueing_lock_timeout = 10

    @app.task(base=UniqueTask, queueing_lock="a", queueing_lock_timeout=20, shared=False)
    def t() -> None: ...

    @app.task(base=UniqueTask, queueing_lock="b", shared=False)
    def u() -> None: ...

    t.delay()
    t.apply_async(queueing_lock="c", queueing_lock_timeout=30)
    u.delay()
    ttl = {k: fake_redis.pttl(k) for k in keys(fake_redis)}
    assert 19000 < ttl[qkey(t, "a")] <= 20000
    assert 29000 < ttl[qkey(t, "c")] <= 30000
    assert 9000 < ttl[qkey(u, "b")] <= 10000


@pytest.mark.parametrize("name, value", [
    ("unique_on_duplicate", "skip"),
    ("unique_on_locked", "wait"),
    ("unique_lock_timeout", 0),
    ("unique_redis_options", "socket_timeout=1"),
    ("unique_redis_cluster", "yes"),
    ("unique_on_store_error", "ignore"),
    ("unique_redis_client", "redis://not-a-callable"),
])
def test_app_setting_typo_fails_at_creation(app: Celery, name: str, value: Any) -> None:
    app.conf[name] = value
    @app.task(base=UniqueTask, queueing_lock="k", shared=False)
    def t() -> None: ...

    with pytest.raises(ConfigurationError, match=name):
        app.finalize()


def test_countdown_extends_the_ttl(app: Celery, fake_redis: Any) -> None:
    @app.task(base=UniqueTask, queueing_lock="k", queueing_lock_timeout=10, shared=False)
    def t() -> None: ...

    t.apply_async(countdown=100)
    assert 109000 < fake_redis.pttl(qkey(t, "k")) <= 110000


@pytest.mark.parametrize("options, error", [
    ({"on_duplicate": "ignore"}, ConfigurationError),
    ({"queueing_lock_timeout": -1}, ConfigurationError),
    ({"queueing_lock_until": "never"}, ConfigurationError),
    ({"queueing_lock": "{nope}"}, ConfigurationError),
    ({"queueing_lock": lambda a: 1 / 0}, KeyBuildError),
    ({"queueing_lock": lambda a: 3}, KeyBuildError),
    ({"queueing_lock": 42}, ConfigurationError),
    ({"unique_on": "a"}, ConfigurationError),
    ({"on_store_error": "ignore"}, ConfigurationError),
])
def test_bad_per_call_input_leaves_nothing(
    app: Celery, fake_redis: Any, published: list[str], options: dict[str, Any],
    error: type[Exception],
) -> None:
    @app.task(base=UniqueTask, queueing_lock=True, shared=False)
    def t(a: int) -> None: ...

    with pytest.raises(error):
        t.apply_async((1,), **options)
    assert keys(fake_redis) == [] and published == []


def test_unformattable_argument_leaves_nothing(
    app: Celery, fake_redis: Any, published: list[str]
) -> None:
    @app.task(base=UniqueTask, queueing_lock=True, shared=False, serializer="pickle")
    def t(a: Any) -> None: ...

    app.conf.accept_content = ["pickle", "json"]
    with pytest.raises(KeyBuildError, match="argument 'a'"):
        t.delay(object())
    assert keys(fake_redis) == [] and published == []


def test_failed_publish_releases_the_lock(app: Celery, fake_redis: Any) -> None:
    app.conf.broker_url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    app.conf.broker_connection_timeout = 0.2
    app.conf.broker_transport_options = {"max_retries": 0}

    @app.task(base=UniqueTask, queueing_lock="k", shared=False)
    def t() -> None: ...

    with pytest.raises(Exception) as info:
        t.delay()
    assert not isinstance(info.value, AlreadyQueued)
    assert keys(fake_redis) == []


class TestOverlappedReply:
    """The lock's reply is read while Celery works; a duplicate never becomes a message."""

    @pytest.fixture
    def built(self) -> Iterator[list[str]]:
        """Ids of the messages Celery built and was about to publish."""
        ids: list[str] = []

        def record(headers: Any = None, **_: Any) -> None:
            ids.append(headers["id"])

        signals.before_task_publish.connect(record, weak=False)
        yield ids
        signals.before_task_publish.disconnect(record)

    def test_duplicates_are_stopped_before_publishing(
        self, app: Celery, fake_redis: Any, built: list[str]
    ) -> None:
        @app.task(base=UniqueTask, queueing_lock="k", shared=False)
        def t() -> None: ...

        state = app_state(app)
        first = t.delay()
        for _ in range(3):  # read at the producer first, then (a key seen held) at routing
            with pytest.raises(AlreadyQueued):
                t.delay()
            assert qkey(t, "k") in state.held_keys
        assert built == [first.id]
        fake_redis.delete(qkey(t, "k"))  # the job started
        second = t.delay()
        assert built == [first.id, second.id]
        assert qkey(t, "k") not in state.held_keys
        assert fake_redis.get(qkey(t, "k")) == second.id.encode()

    @pytest.mark.parametrize("seen_held", [False, True])
    def test_error_before_the_reply_is_read_releases_the_lock(
        self, app: Celery, fake_redis: Any, seen_held: bool
    ) -> None:
        class BrokenRouter:
            def route(self, *args: Any, **kwargs: Any) -> Any:
                raise LookupError("no route")

        @app.task(base=UniqueTask, queueing_lock="k", shared=False)
        def t() -> None: ...

        if seen_held:
            app_state(app).remember_held(qkey(t, "k"))
        with pytest.raises(LookupError, match="no route"):
            t.apply_async(router=BrokenRouter())
        assert keys(fake_redis) == []
        assert t.delay().id  # the pooled connection holds no stale reply

    def test_given_connection_is_checked_before_building(
        self, app: Celery, built: list[str]
    ) -> None:
        @app.task(base=UniqueTask, queueing_lock="k", shared=False)
        def t() -> None: ...

        with app.connection_for_write() as conn:
            first = t.apply_async(connection=conn)
            with pytest.raises(AlreadyQueued):
                t.apply_async(connection=conn)
        assert built == [first.id]

    def test_unknown_script_is_loaded_again(self, app: Celery, fake_redis: Any) -> None:
        @app.task(base=UniqueTask, queueing_lock="k", shared=False)
        def t() -> None: ...

        fake_redis.script_flush()
        first = t.delay()
        fake_redis.script_flush()
        with pytest.raises(AlreadyQueued) as info:
            t.delay()
        assert info.value.task_id == first.id

    def test_held_keys_are_bounded(self, app: Celery) -> None:
        @app.task(base=UniqueTask, queueing_lock="k", shared=False)
        def t() -> None: ...

        state = app_state(app)
        for i in range(3000):
            state.remember_held(str(i))
        assert len(state.held_keys) <= 1025 and "2999" in state.held_keys


def end_as(task: Any, outcome: str) -> str:
    """End the running job as ``outcome`` says: ok, fail, reject, ignore or retry."""
    if outcome == "fail":
        raise RuntimeError("boom")
    if outcome == "reject":
        raise Reject("no", requeue=False)
    if outcome == "ignore":
        raise Ignore()
    if outcome == "retry":
        raise task.retry(countdown=1, max_retries=3)
    return "done"


class TestEager:
    """Eager mode runs the real tracer in the caller: every end releases the lock."""

    @pytest.fixture(autouse=True)
    def eager(self, app: Celery) -> None:
        app.conf.task_always_eager = True

    @pytest.mark.parametrize("on_duplicate", ["raise", "replace"])
    @pytest.mark.parametrize("until", ["started", "finished"])
    @pytest.mark.parametrize("outcome", ["ok", "fail", "reject", "ignore", "retry"])
    def test_every_end_releases(
        self, app: Celery, fake_redis: Any, until: str, outcome: str, on_duplicate: str
    ) -> None:
        held: list[list[str]] = []

        @app.task(base=UniqueTask, bind=True, queueing_lock="k", queueing_lock_until=until,
                  on_duplicate=on_duplicate, shared=False)
        def t(self: Any, outcome: str) -> str:
            held.append(keys(fake_redis))
            return end_as(self, outcome)

        t.delay(outcome)
        # an eager retry runs again at once, in the caller: each run held what it should
        # (a job that may be replaced is marked as started: "finished" only)
        assert held[0] == ([] if until == "started" else [qkey(t, "k")] if (
            on_duplicate == "raise") else [qkey(t, "k"), qkey(t, "k") + ":replaced"])
        assert len(held) == (4 if outcome == "retry" else 1)
        assert keys(fake_redis) == []

    @pytest.mark.parametrize("outcome", ["ok", "fail", "reject", "ignore"])
    def test_a_throttle_is_released_by_no_end(
        self, app: Celery, fake_redis: Any, outcome: str
    ) -> None:
        """``queueing_lock_until="expired"``: every end leaves the lock to its timeout."""

        @app.task(base=UniqueTask, bind=True, queueing_lock="k", queueing_lock_until="expired",
                  queueing_lock_timeout=60, shared=False)
        def t(self: Any, outcome: str) -> str:
            return end_as(self, outcome)

        t.delay(outcome)
        assert keys(fake_redis) == [qkey(t, "k")]
        assert 59_000 < fake_redis.pttl(qkey(t, "k")) <= 60_000
        with pytest.raises(AlreadyQueued):
            t.delay(outcome)

    def test_propagating_failure_releases(self, app: Celery, fake_redis: Any) -> None:
        app.conf.task_eager_propagates = True

        @app.task(base=UniqueTask, queueing_lock="k", queueing_lock_until="finished",
                  shared=False)
        def t() -> None:
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            t.delay()
        assert keys(fake_redis) == []

    def test_apply_and_direct_call_never_release_a_lock_they_did_not_take(
        self, app: Celery, fake_redis: Any
    ) -> None:
        app.conf.task_always_eager = False

        @app.task(base=UniqueTask, queueing_lock="k", queueing_lock_until="finished",
                  shared=False)
        def t() -> str:
            return "ran"

        queued = t.delay()
        assert t.apply().get() == "ran"
        assert t() == "ran"
        assert fake_redis.get(qkey(t, "k")) == queued.id.encode()


def test_django_namespace_settings(fake_redis: Any) -> None:
    """Settings come from Celery's configuration, so CELERY_UNIQUE_* works under Django."""
    from celery_unique.store import Store, use_store

    app = Celery("django", broker="memory://", set_as_current=False)
    app.config_from_object({"CELERY_UNIQUE_KEY_PREFIX": "dj",
                            "CELERY_UNIQUE_QUEUEING_LOCK_TIMEOUT": 5}, namespace="CELERY")
    use_store(app, Store.from_client(fake_redis))

    @app.task(base=UniqueTask, queueing_lock="k", shared=False)
    def t() -> None: ...

    t.delay()
    assert keys(fake_redis) == [f"dj:q:{{{t.name}:k}}"]
    assert 4000 < fake_redis.pttl(f"dj:q:{{{t.name}:k}}") <= 5000


def test_groups_chords_and_chains_take_the_lock(app: Celery, published: list[str]) -> None:
    from celery import chain, chord, group

    @app.task(base=UniqueTask, queueing_lock=True, shared=False)
    def t(a: int) -> int:
        return a

    @app.task(shared=False)
    def plain(values: Any) -> None: ...

    group(t.s(1), t.s(2)).delay()
    with pytest.raises(AlreadyQueued):
        group(t.s(3), t.s(1)).delay()  # the group's second member is a duplicate
    with pytest.raises(AlreadyQueued):
        chain(t.s(2), plain.s()).delay()  # a chain's first step goes through apply_async
    app.conf.result_backend = "cache+memory://"
    with pytest.raises(AlreadyQueued):
        chord([t.s(4), t.s(2)], plain.s()).delay()
    # 1, 2 (first group), 3 (published before its sibling was refused), 4 (chord header)
    assert len(published) == 4


@pytest.mark.parametrize("headers", [["x", 1], ("x",), "x"])
def test_headers_that_are_not_a_dict_run_as_a_plain_task(app: Celery, headers: Any) -> None:
    """Celery's own tests run jobs eagerly with such headers: no lock, no error."""
    @app.task(base=UniqueTask, shared=False)
    def t(a: int) -> int:
        return a + 1

    @app.task(shared=False)
    def plain(a: int) -> int:
        return a + 1

    assert t.apply((1,), headers=headers).get() == plain.apply((1,), headers=headers).get() == 2


@pytest.mark.parametrize("value", ["10/d", "abc", 0, "1.5/s", True, "-1/s", "10 per s"])
def test_a_bad_rate_limit_fails_at_creation(app: Celery, value: Any) -> None:
    with pytest.raises(ConfigurationError, match="whole number of starts per period"):
        @app.task(base=UniqueTask, global_rate_limit=value, shared=False)
        def t() -> None: ...

        t.name  # noqa: B018 - created lazily: bound here


def test_rate_limit_options_per_call_and_app_wide(app: Celery, fake_redis: Any) -> None:
    from celery_unique.settings import parse_rate

    assert parse_rate("10/s") == (10, 1000) and parse_rate("100/m") == (100, 60_000)
    assert parse_rate("1000/h") == (1000, 3_600_000) and parse_rate(5) == (5, 1000)

    @app.task(base=UniqueTask, shared=False)
    def t() -> None: ...

    with pytest.raises(ConfigurationError, match="whole number"):
        t.apply_async(global_rate_limit="fast")
    with pytest.raises(ConfigurationError, match="on_rate_limited must be one of"):
        t.apply_async(global_rate_limit="1/s", on_rate_limited="drop")
    app.conf.unique_on_rate_limited = "later"
    with pytest.raises(ConfigurationError, match="unique_on_rate_limited"):
        @app.task(base=UniqueTask, shared=False)
        def u() -> None: ...

        u.name  # noqa: B018


def test_over_its_rate_limit_a_job_is_skipped_revoked(app: Celery, fake_redis: Any) -> None:
    """``on_rate_limited="skip"``, run eagerly (the worker's code, in the caller): the
    third start in the period ends ``REVOKED`` with :class:`RateLimited`; another key has
    its own limit; nothing else is left but the period's starts."""
    from celery_unique import RateLimited

    app.conf.task_always_eager = True
    ran: list[str] = []

    @app.task(base=UniqueTask, global_rate_limit="2/m", rate_limit_key="api_{account}",
              on_rate_limited="skip", shared=False)
    def call(account: str) -> str:
        ran.append(account)
        return account

    results = [call.delay("acme") for _ in range(3)] + [call.delay("other")]
    assert [r.state for r in results] == ["SUCCESS", "SUCCESS", "REVOKED", "SUCCESS"]
    assert isinstance(results[2].result, RateLimited)
    assert ran == ["acme", "acme", "other"]
    # The period's starts, and the runs that started (a late copy is not a start).
    assert keys(fake_redis) == [f"celery_unique:r:{{api_{k}}}:{suffix}"
                                for k in ("acme", "other") for suffix in ("holders", "ran",
                                                                          "seq")]
    assert 59_000 < fake_redis.pttl("celery_unique:r:{api_acme}:holders") <= 60_005


def test_tasks_naming_the_same_rate_limit_key_share_its_limit(
    app: Celery, fake_redis: Any
) -> None:
    """A template names a shared resource (the locks' rule): two tasks limited under
    ``api_{account}`` count their starts together; ``True`` is the task's own."""
    app.conf.task_always_eager = True

    @app.task(base=UniqueTask, global_rate_limit="2/m", rate_limit_key="api_{account}",
              on_rate_limited="skip", shared=False)
    def fetch(account: str) -> str:
        return account

    @app.task(base=UniqueTask, global_rate_limit="2/m", rate_limit_key="api_{account}",
              on_rate_limited="skip", shared=False)
    def push(account: str) -> str:
        return account

    @app.task(base=UniqueTask, global_rate_limit="2/m", rate_limit_key=True,
              on_rate_limited="skip", shared=False)
    def own(account: str) -> str:
        return account

    states = [fetch.delay("acme").state, push.delay("acme").state, push.delay("acme").state,
              own.delay("acme").state]
    assert states == ["SUCCESS", "SUCCESS", "REVOKED", "SUCCESS"]
