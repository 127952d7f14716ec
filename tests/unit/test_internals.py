"""The internals of kombu and Celery the package relies on (``broker.INTERNALS``), each
pinned: a new kombu or Celery that changes one fails here, naming it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import celery
import pytest
from celery import Celery
from kombu.transport import redis as kombu_redis

from celery_unique import broker

Channel = kombu_redis.Channel


def _put_shape() -> None:
    assert broker.shape_problem(Channel) is None, broker.shape_problem(Channel)


def _callable(owner: Any, name: str) -> Callable[[], None]:
    def check() -> None:
        assert callable(getattr(owner, name, None)), f"{owner.__name__}.{name} is gone"
    return check


def _expires() -> None:
    # kombu keeps the x-expires of its queues in Channel._expires (5.4+); an older kombu
    # has no queue expiry at all, and the hook's getattr finds nothing.
    source = inspect.getsource(Channel)
    if "x-expires" in source:
        assert "self._expires" in source, "queue expiry is no longer kept in _expires"


def _publish_batch() -> None:
    put = broker._kombu.put or Channel._put  # kombu's own, the hook installed or not
    if hasattr(Channel, "create_publish_batch"):
        assert "_publish_batch" in inspect.getsource(put), (
            "kombu's publish batch no longer reaches _put as _publish_batch")


def _cancel_for() -> None:
    from celery.backends.redis import ResultConsumer

    assert callable(getattr(ResultConsumer, "cancel_for", None))


def _router_first() -> None:
    """Celery routes a message before it first uses the producer: a lock's reply sent
    ahead is read at either place."""
    app = Celery("pin", broker="memory://", set_as_current=False)
    seen: list[str] = []

    @app.task(shared=False)
    def t() -> None: ...

    class Router:
        def route(self, *args: Any, **kwargs: Any) -> Any:
            seen.append("router")
            return app.amqp.router.route(*args, **kwargs)

    with app.producer_or_acquire() as producer:
        class Producer:
            def __getattr__(self, name: str) -> Any:
                seen.append("producer")
                return getattr(producer, name)

        t.apply_async(router=Router(), producer=Producer())
    assert seen[:2] == ["router", "producer"], seen


def _request_dict() -> None:
    from celery.worker.request import Request

    assert isinstance(inspect.getattr_static(Request, "request_dict"), property)


def _context() -> None:
    from celery.worker.request import Request

    # A cached property: the job's Context, pushed for Celery's own retry on worker loss.
    assert hasattr(Request, "_context"), "Request._context is gone"


def _retry_worker_lost() -> None:
    from celery.worker.request import Request

    if celery.VERSION >= (5, 7):
        params = list(inspect.signature(Request._retry_worker_lost).parameters)
        assert params == ["self", "exc", "exc_info"], params


def _default_app() -> None:
    import celery._state

    assert hasattr(celery._state, "default_app")


def _active_apps() -> None:
    import celery._state

    app = Celery("pin", set_as_current=False)
    assert app in celery._state._get_active_apps()


def _on_decode_error() -> None:
    from celery.worker.consumer import Consumer

    # The task handler reaches the consumer's on_decode_error through ``self`` at each
    # message, so the one the worker_ready handler sets on the instance is called.
    source = inspect.getsource(Consumer.create_task_handler)
    assert "self.on_decode_error(message, exc)" in source, (
        "the task handler no longer calls self.on_decode_error")


CHECKS: dict[str, Callable[[], None]] = {
    "kombu.transport.redis.Channel._put": _put_shape,
    "kombu.transport.redis.Channel._put_fanout": _callable(Channel, "_put_fanout"),
    "kombu.transport.redis.Channel._q_for_pri": _callable(Channel, "_q_for_pri"),
    "kombu.transport.redis.Channel._get_message_priority": _callable(
        Channel, "_get_message_priority"),
    "kombu.transport.redis.Channel._expires": _expires,
    "kombu.transport.redis.Channel._put(_publish_batch=)": _publish_batch,
    "celery.backends.redis.ResultConsumer.cancel_for": _cancel_for,
    "celery.app.amqp: the router is called before the producer is used": _router_first,
    "celery.worker.request.Request.request_dict": _request_dict,
    "celery.worker.request.Request._context": _context,
    "celery.worker.request.Request._retry_worker_lost": _retry_worker_lost,
    "celery._state.default_app": _default_app,
    "celery._state._get_active_apps": _active_apps,
    "celery.worker.consumer.Consumer.on_decode_error": _on_decode_error,
}


def test_every_internal_relied_on_has_a_check() -> None:
    assert set(CHECKS) == set(broker.INTERNALS)


@pytest.mark.parametrize("name", sorted(broker.INTERNALS))
def test_internal_is_as_relied_on(name: str) -> None:
    try:
        CHECKS[name]()
    except AssertionError as exc:
        pytest.fail(f"{name} ({broker.INTERNALS[name]}) changed: {exc}")
