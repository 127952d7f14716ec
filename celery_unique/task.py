"""``UniqueTask``: the Celery task base class that takes and releases the locks."""

from __future__ import annotations

import inspect
import logging
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from celery import Celery, Task, signals
from celery.canvas import Signature
from celery.result import AsyncResult, EagerResult
from celery.states import REJECTED, RETRY, REVOKED

from . import signals as unique_signals
from . import store as _store
from .broker import HEADER, Duplicate
from .enqueue import Enqueue
from .exceptions import AlreadyQueued
from .keys import (
    Binder,
    CompiledSpec,
    LockSpec,
    build_key,
    check_unique_on,
    compile_spec,
    task_signature,
)
from .lock import Lock, acquire_or_wait, eager_skipped, release_lock, run_id
from .settings import (
    CALL_OPTIONS,
    ON_DUPLICATE,
    ON_LOCKED,
    ON_STORE_ERROR,
    UNTIL,
    check_choice,
    check_limit,
    check_settings,
    check_timeout,
    setting,
    wait_seconds,
)
from .store import Store, get_store, release_quietly

__all__ = ["HEADER", "UniqueTask"]

_VALUE_OPTIONS = ("on_duplicate", "queueing_lock_timeout", "queueing_lock_until", "on_locked",
                  "lock_timeout", "on_store_error")

logger = logging.getLogger(__name__)


class UniqueTask(Task):  # type: ignore[misc]
    """A task that is not queued twice (``queueing_lock``).

    Options, per task (decorator, class attribute, ``task_annotations``) or per call
    (``apply_async``, ``configure``, ``Signature.set``); see :class:`UniqueOptions`.
    """

    #: A template (``"report_{email}"`` or ``"report_<email>"``), a callable called with the
    #: task's arguments, ``True`` (all bound arguments) or ``None`` (off).
    queueing_lock: LockSpec = None
    #: Limits ``queueing_lock=True`` to these parameter names (``[]``: one lock per task).
    unique_on: Sequence[str] | None = None
    #: ``"raise"`` (:class:`AlreadyQueued`) or ``"existing"`` (the queued job's result).
    on_duplicate: str | None = None
    #: The queueing lock's lease in seconds; a countdown or eta is added to it.
    queueing_lock_timeout: float | None = None
    #: ``"started"`` (released when a worker starts the job) or ``"finished"``.
    queueing_lock_until: str | None = None
    #: The execution lock: a template or callable naming a shared resource, ``True``
    #: (this task with its arguments, honouring ``unique_on``) or ``None`` (off).
    lock: LockSpec = None
    #: When the lock is held: ``"order"`` (wait in line, in creation order), ``"retry"``
    #: (re-queued with a countdown) or ``"skip"``.
    on_locked: str | None = None
    #: How many jobs may hold the lock at once.
    lock_limit: int | None = None
    #: The lock's lease in seconds, renewed every third of it while the job runs.
    lock_timeout: float | None = None
    #: When the lock store cannot be reached: ``"raise"`` (the caller gets
    #: :class:`LockStoreUnavailable`; a worker re-queues the job until the store answers)
    #: or ``"allow"`` (published, or run, without the lock, and said).
    on_store_error: str | None = None

    Request = "celery_unique.request:UniqueRequest"

    _unique_binder: ClassVar[Binder | None] = None
    _unique_queueing: ClassVar[CompiledSpec | None] = None
    _unique_lock: ClassVar[CompiledSpec | None] = None
    _unique_defaults: ClassVar[dict[str, Any]] = {}
    _unique_store_obj: ClassVar[tuple[int, Store] | None] = None
    #: What a refused duplicate raises (the migration shims raise their libraries' own).
    _unique_already_queued: ClassVar[type[AlreadyQueued]] = AlreadyQueued

    # -- set-up: options are checked when Celery creates the task ------------------------

    @classmethod
    def on_bound(cls, app: Celery) -> None:
        super().on_bound(app)
        if cls.run is Task.run:  # the abstract base itself, or a base class without run
            return
        check_settings(app)
        raw = inspect.getattr_static(cls, "run")
        drop_first = not isinstance(raw, staticmethod)
        run = raw.__func__ if isinstance(raw, staticmethod) else raw
        binder = Binder(task_signature(run, drop_first=drop_first), cls.name)
        cls._unique_binder = binder
        cls._unique_queueing = cls._unique_compile(
            {"queueing_lock": cls.queueing_lock, "unique_on": cls.unique_on}
        )
        cls._unique_lock = cls._unique_compile(
            {"lock": cls.lock, "unique_on": cls.unique_on}, option="lock")
        per_task = {name: getattr(cls, name) for name in (*_VALUE_OPTIONS, "lock_limit")}
        cls._unique_check_values(per_task, where=cls.name)
        # Resolved once, as Celery resolves its own task settings (``from_config``) at
        # bind time: reading Celery's configuration costs more than the lock itself.
        cls._unique_defaults = {
            name: setting(app, f"unique_{name}") if per_task[name] is None else per_task[name]
            for name in _VALUE_OPTIONS
        }
        cls._unique_defaults["key_prefix"] = setting(app, "unique_key_prefix")
        cls._unique_defaults["lock_limit"] = cls.lock_limit or 1
        cls._unique_store_obj = None

    @classmethod
    def _unique_compile(cls, options: Mapping[str, Any], option: str = "queueing_lock"
                        ) -> CompiledSpec | None:
        binder = cls._unique_binder
        assert binder is not None
        unique_on = check_unique_on(options.get("unique_on"), task_name=cls.name, binder=binder)
        return compile_spec(options.get(option), option=option,
                            task_name=cls.name, binder=binder, unique_on=unique_on)

    @staticmethod
    def _unique_check_values(options: Mapping[str, Any], *, where: str) -> None:
        if options.get("queueing_lock_timeout") is not None:
            check_timeout(options["queueing_lock_timeout"], option="queueing_lock_timeout",
                          where=where)
        if options.get("on_duplicate") is not None:
            check_choice(options["on_duplicate"], ON_DUPLICATE, option="on_duplicate",
                         where=where)
        if options.get("queueing_lock_until") is not None:
            check_choice(options["queueing_lock_until"], UNTIL, option="queueing_lock_until",
                         where=where)
        if options.get("on_locked") is not None:
            check_choice(options["on_locked"], ON_LOCKED, option="on_locked", where=where)
        if options.get("on_store_error") is not None:
            check_choice(options["on_store_error"], ON_STORE_ERROR, option="on_store_error",
                         where=where)
        if options.get("lock_timeout") is not None:
            check_timeout(options["lock_timeout"], option="lock_timeout", where=where)
        if options.get("lock_limit") is not None:
            check_limit(options["lock_limit"], where=where)

    def _unique_option(self, name: str, per_call: Mapping[str, Any]) -> Any:
        value = per_call.get(name)
        return self._unique_defaults[name] if value is None else value

    def _unique_store(self) -> Store:
        cached = type(self)._unique_store_obj
        if cached is not None and cached[0] == _store.generation:
            return cached[1]
        generation = _store.generation
        store = get_store(self._get_app())
        type(self)._unique_store_obj = (generation, store)
        return store

    # -- caller side ----------------------------------------------------------------------

    def configure(self, **options: Any) -> Signature:
        """A signature of this task with options set: ``task.configure(queueing_lock=...)``.

        procrastinate's spelling; ``.delay()``/``.apply_async()`` on it take the lock.
        """
        self._unique_check_call(options)
        return self.signature(options=options)

    def _unique_check_call(self, per_call: Mapping[str, Any]) -> CompiledSpec | None:
        """Check per-call options; return the queueing spec to use."""
        if self._unique_binder is None:  # bound lazily: make sure on_bound ran
            type(self).on_bound(self._get_app())
        if not per_call:
            return self._unique_queueing
        self._unique_check_values(per_call, where=f"{self.name} (per call)")
        if "queueing_lock" not in per_call and "unique_on" not in per_call:
            return self._unique_queueing
        return self._unique_compile({
            "queueing_lock": per_call.get("queueing_lock", self.queueing_lock),
            "unique_on": per_call.get("unique_on", self.unique_on),
        })

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Take the queueing lock, then publish; see :class:`UniqueTask` for the options."""
        per_call = {name: options.pop(name) for name in CALL_OPTIONS & options.keys()}
        headers = options.get("headers") or {}

        def publish(task_id: str | None, producer: Any = producer) -> AsyncResult:
            return super(UniqueTask, self).apply_async(
                args, kwargs, task_id=task_id, producer=producer, link=link,
                link_error=link_error, shadow=shadow, **options)

        if self._unique_is_own_retry(task_id, options, headers):
            return publish(task_id)
        spec = self._unique_check_call(per_call)
        lock_spec = self._unique_lock_spec(per_call)
        if spec is None and lock_spec is None:
            return publish(task_id)
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        plan = Enqueue(self, spec, lock_spec, args, kwargs, task_id, per_call, options)
        options["headers"] = {**headers, HEADER: plan.header}
        try:
            return plan.run(publish, producer, options)
        except Duplicate as duplicate:
            return self._unique_duplicate(plan.key or "", duplicate.holder, duplicate.pttl,
                                          plan.on_duplicate, args, kwargs, options, headers)

    def _unique_is_own_retry(self, task_id: str | None, options: Mapping[str, Any],
                             headers: Mapping[str, Any]) -> bool:
        """Whether this is a retry of the running job, its queueing lock re-taken if so.

        A retry re-publishes the running job under its own id: it re-enters the queue, so
        it takes its lock again. It is published whatever the answer: a retry is never
        dropped because another job took the lock meanwhile.
        """
        if not (task_id is not None and options.get("retries")
                and isinstance(headers.get(HEADER), dict) and task_id == self.request.id
                and not self.request.called_directly):
            return False
        info = headers[HEADER]
        if info.get("q"):
            ttl_ms = int(info["t"] + 1000 * wait_seconds(options.get("countdown"),
                                                         options.get("eta")))
            self._unique_store().acquire_queueing_lock(info["q"], task_id, ttl_ms)
        return True

    def _unique_lock_spec(self, per_call: Mapping[str, Any]) -> CompiledSpec | None:
        if "lock" not in per_call and "unique_on" not in per_call:
            return self._unique_lock
        return self._unique_compile({
            "lock": per_call.get("lock", self.lock),
            "unique_on": per_call.get("unique_on", self.unique_on),
        }, option="lock")

    def _unique_make_lock(self, spec: CompiledSpec, args: Sequence[Any],
                          kwargs: Mapping[str, Any], per_call: Mapping[str, Any]) -> Lock:
        # A string or callable names a shared resource: no task name in the key, so
        # different tasks exclude each other. True is scoped to this task.
        scope = self.name if spec.kind == "all" else ""
        return Lock(
            build_key(self._unique_defaults["key_prefix"], "l", scope, spec.render(args, kwargs)),
            self._unique_option("on_locked", per_call),
            int(self._unique_option("lock_limit", per_call)),
            int(self._unique_option("lock_timeout", per_call) * 1000),
            int(self._unique_option("queueing_lock_timeout", per_call) * 1000),
        )

    def _unique_duplicate(
        self,
        key: str,
        holder: str,
        pttl: int,
        on_duplicate: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: Mapping[str, Any],
        headers: Mapping[str, Any],
    ) -> AsyncResult:
        ttl = max(pttl, 0) / 1000
        # A chain or callback step sent by a worker (Celery passes parent_id), or a beat
        # entry: nobody can catch the error there, so the step is skipped and logged,
        # and the parent job keeps its own outcome.
        from_canvas = bool(options.get("parent_id")) and self.app.current_worker_task is not None
        from_beat = bool(headers.get("celery_beat_task")) or _called_from_beat()
        action = "existing" if on_duplicate == "existing" else "raised"
        if action == "raised" and (from_canvas or from_beat):
            action = "skipped"
        unique_signals.duplicate_rejected.send(
            sender=self, key=key, task_id=holder, ttl=ttl, args=args, kwargs=kwargs,
            action=action,
        )
        if action == "raised":
            raise self._unique_already_queued(
                f"{self.name}: a job is already queued under {key} (task id {holder},"
                f" lock expires in {ttl:.1f}s)",
                key=key, task_id=holder, ttl=ttl, task_name=self.name,
            )
        log = logger.info if action == "existing" else logger.warning
        log("celery-unique: %s not queued: %s is already queued under %s (%s)",
            self.name, holder, key, "from beat" if from_beat else
            "from a worker" if from_canvas else "on_duplicate=existing")
        return self.AsyncResult(holder)

    # -- worker side ------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.id is None or getattr(
            request, "_unique_started", False
        ):
            # Called as a plain function (or recursively): no lock of ours is involved.
            return super().__call__(*args, **kwargs)
        request._unique_started = True
        info = _header(request) or {}
        lock = Lock.from_header(info)
        if lock is None and self._unique_lock is not None and not info:
            # Sent without apply_async (send_task) or run with apply(): the job takes its
            # place in line now.
            lock = self._unique_make_lock(self._unique_lock, args, kwargs, {})
        queueing_key = info.get("q") if info.get("until") == "started" else None
        if lock is not None:
            # Raises Ignore when the job must not run now (parked, re-queued, skipped).
            held = acquire_or_wait(self, lock, queueing_key, info.get("k"),
                                   info.get("e") or self._unique_defaults["on_store_error"])
            if queueing_key and held:
                request._unique_released = True  # the lock's script released it
        elif queueing_key:
            request._unique_released = True
            release_quietly(self._unique_store(), queueing_key, request.id, "job started")
        # The tracer has already pushed this task and its request; Task.__call__ would
        # push a fresh request without the job's id.
        return self.run(*args, **kwargs)

    def apply(self, *args: Any, **kwargs: Any) -> EagerResult:
        """Run the job in the caller, its locks enforced: a job skipped for its lock
        (``on_locked="skip"``) ends ``REVOKED`` with :class:`LockHeld`, as on a worker."""
        result = super().apply(*args, **kwargs)
        skipped = eager_skipped.pop(result.id, None)
        if skipped is not None:
            return EagerResult(result.id, skipped, REVOKED, name=self.name)
        return result

    def _unique_finish(self, state: str, retval: Any) -> None:
        """Release what the job holds at its end; called for every state (task_postrun)."""
        request = self.request
        if getattr(request, "_unique_parked", False):
            return  # waiting for its lock: it keeps its place and its queueing lock
        lock = getattr(request, "_unique_lock", None)
        info = _header(request)
        if lock is not None:
            request._unique_lock = None
            # Every end releases the lock, a retry too: it goes to the back of the line.
            # A run that ended on a worker is remembered, unless its message goes back.
            again = state == REJECTED and getattr(retval, "requeue", False)
            ran = "" if request.is_eager or again else run_id(request)
            release_lock(self, request.id, lock, state, (info or {}).get("k"), ran)
        if info is None or not info.get("q") or getattr(request, "_unique_released", False):
            return
        if state == RETRY:
            # The retry holds the queueing lock now: its message, or in eager mode its
            # run in the caller, which carries the same header and releases it.
            return
        if state == REJECTED and getattr(retval, "requeue", False):
            return  # the message goes back to the queue and will run again
        request._unique_released = True
        release_quietly(self._unique_store(), info["q"], request.id, f"job ended: {state}")


def _header(request: Any) -> dict[str, Any] | None:
    headers = getattr(request, "headers", None)
    # Celery's own tests run jobs eagerly with headers that are not a dict.
    info = (headers.get(HEADER) if isinstance(headers, dict) else None) or getattr(
        request, HEADER, None)
    return info if isinstance(info, dict) and (info.get("q") or info.get("l")) else None


def _on_task_postrun(sender: Any = None, state: str = "", retval: Any = None,
                     **_: Any) -> None:
    # after_return is skipped for RETRY, IGNORED and REJECTED (Reject, Ignore, replace);
    # task_postrun is sent for every end of a traced job, eager mode included.
    if isinstance(sender, UniqueTask):
        sender._unique_finish(state, retval)


def _called_from_beat() -> bool:
    """Whether beat's scheduler is sending this job (Celery < 5.5 sets no header for it).

    Only looked at for a duplicate, so the enqueue path does not pay for it.
    """
    from celery.beat import Scheduler

    code = Scheduler.apply_async.__code__
    frame: types.FrameType | None = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


signals.task_postrun.connect(_on_task_postrun, weak=False)
