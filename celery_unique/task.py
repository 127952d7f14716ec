"""``UniqueTask``: the Celery task base class that takes and releases the locks.

It joins the two sides: the caller's (:meth:`UniqueTask.apply_async` builds a
``enqueue.Job`` and hands it to ``celery_unique.enqueue``) and the
worker's (:meth:`UniqueTask.__call__` and ``task_postrun`` hand the job's header to
``celery_unique.lock``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from celery import Celery, Task, signals
from celery.canvas import Signature
from celery.result import AsyncResult, EagerResult
from celery.states import REVOKED, SUCCESS

from . import lock as run_side
from . import runtime
from .enqueue import Enqueue, Job
from .exceptions import AlreadyQueued, ConfigurationError
from .keys import (
    Binder,
    CompiledSpec,
    LockSpec,
    check_unique_on,
    compile_spec,
    task_signature,
)
from .settings import (
    CALL_OPTIONS,
    ON_DUPLICATE,
    ON_LOCKED,
    ON_RATE_LIMITED,
    ON_STORE_ERROR,
    UNTIL,
    Resolved,
    check_bool,
    check_choice,
    check_limit,
    check_settings,
    check_timeout,
    parse_rate,
    setting,
)
from .state import app_state
from .store import Store, store_of
from .wire import HEADER, JobHeader

__all__ = ["HEADER", "UniqueTask"]

_VALUE_OPTIONS = ("on_duplicate", "queueing_lock_timeout", "queueing_lock_until", "on_locked",
                  "lock_timeout", "on_store_error", "lock_limit", "debounce", "debounce_max",
                  "lock_check_at_enqueue", "global_rate_limit", "on_rate_limited")

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
    #: ``"raise"`` (:class:`AlreadyQueued`), ``"existing"`` (the queued job's result) or
    #: ``"replace"`` (the queued job is replaced: it ends ``REVOKED`` with
    #: :class:`Replaced`, and the new one is queued; a task's option, not a call's).
    on_duplicate: str | None = None
    #: The queueing lock's lease in seconds; a countdown or eta is added to it.
    queueing_lock_timeout: float | None = None
    #: ``"started"`` (released when a worker starts the job), ``"finished"``, or
    #: ``"expired"`` (never released: held for its whole timeout, whatever the job does: a
    #: throttle, one job per key per ``queueing_lock_timeout``).
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
    #: With ``on_locked="skip"``: a job whose lock is held right now is not queued at all
    #: (que-locks' preemptive check): refused as a duplicate (``on_duplicate``), the
    #: running holder named.
    lock_check_at_enqueue: bool | None = None
    #: At most N starts per period across all workers, as Celery's ``rate_limit`` spells
    #: it (``"10/s"``, ``"100/m"``, ``"1000/h"``), counted when a job is about to run.
    global_rate_limit: str | None = None
    #: What shares a ``global_rate_limit``: a template or callable (tasks of different
    #: names naming the same key share it), ``True`` (this task with its arguments), or
    #: ``None`` (the task's name: one limit for the task).
    rate_limit_key: LockSpec = None
    #: A job over its rate limit: ``"wait"`` (parked in line without a worker slot, run in
    #: creation order when a start is free) or ``"skip"`` (ends ``REVOKED`` with
    #: :class:`RateLimited`).
    on_rate_limited: str | None = None
    #: Debounce (seconds): each call replaces the queued job (as ``on_duplicate="replace"``)
    #: and puts its start off to this long after the last call: one run per burst, with
    #: its last call's arguments. Needs a ``queueing_lock``.
    debounce: float | None = None
    #: The longest a burst may put the run off, from its first call (None: no limit).
    debounce_max: float | None = None
    #: When the lock store cannot be reached: ``"raise"`` (the caller gets
    #: :class:`LockStoreUnavailable`; a worker re-queues the job until the store answers)
    #: or ``"allow"`` (published, or run, without the lock, and said).
    on_store_error: str | None = None

    Request = "celery_unique.request:UniqueRequest"

    _unique_binder: ClassVar[Binder | None] = None
    _unique_queueing: ClassVar[CompiledSpec | None] = None
    _unique_lock: ClassVar[CompiledSpec | None] = None
    _unique_rate: ClassVar[CompiledSpec | None] = None
    #: The value options, resolved when Celery binds the task.
    _unique_defaults: ClassVar[Resolved] = Resolved()
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
        cls._unique_rate = cls._unique_compile(
            {"rate_limit_key": cls.rate_limit_key, "unique_on": cls.unique_on},
            option="rate_limit_key")
        per_task = {name: getattr(cls, name) for name in _VALUE_OPTIONS}
        cls._unique_check_values(per_task, where=cls.name)
        # Resolved once, as Celery resolves its own task settings (``from_config``) at
        # bind time: reading Celery's configuration costs more than the lock itself.
        cls._unique_defaults = Resolved.for_task(app, per_task)
        cls._unique_defaults.check_replace(cls._unique_defaults, cls.name)
        if cls._unique_defaults.debounce is not None and cls._unique_queueing is None:
            raise ConfigurationError(f"{cls.name}: debounce needs a queueing_lock",
                                     option="debounce", where=cls.name)
        app_state(app).stale = True  # the settings may have changed: read them again
        provider = setting(app, "unique_metrics")
        if provider is not False:
            from .metrics import enable  # only then: off, nothing of it is imported

            enable(app, provider)

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
        choices = {"on_duplicate": ON_DUPLICATE, "queueing_lock_until": UNTIL,
                   "on_rate_limited": ON_RATE_LIMITED,
                   "on_locked": ON_LOCKED, "on_store_error": ON_STORE_ERROR}
        for option in _VALUE_OPTIONS:
            value = options.get(option)
            if value is None:
                continue
            if option in choices:
                check_choice(value, choices[option], option=option, where=where)
            elif option == "lock_check_at_enqueue":
                check_bool(value, option=option, where=where)
            elif option == "global_rate_limit":
                parse_rate(value)
            elif option == "lock_limit":
                check_limit(value, where=where)
            else:
                check_timeout(value, option=option, where=where)

    def _unique_store(self) -> Store:
        return store_of(self._get_app())

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
        where = f"{self.name} (per call)"
        self._unique_check_values(per_call, where=where)
        self._unique_defaults.with_call(per_call).check_replace(self._unique_defaults, where)
        return self._unique_spec(per_call, "queueing_lock")

    def _unique_spec(self, per_call: Mapping[str, Any], option: str) -> CompiledSpec | None:
        if option not in per_call and "unique_on" not in per_call:
            return {"queueing_lock": self._unique_queueing, "lock": self._unique_lock,
                    "rate_limit_key": self._unique_rate}[option]
        return self._unique_compile({
            option: per_call.get(option, getattr(self, option)),
            "unique_on": per_call.get("unique_on", self.unique_on),
        }, option=option)

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

        parent = super().apply_async

        def publish(task_id: str | None, producer: Any = producer) -> AsyncResult:
            return parent(
                args, kwargs, task_id=task_id, producer=producer, link=link,
                link_error=link_error, shadow=shadow, **options)

        job = self._unique_job(tuple(args or ()), dict(kwargs or {}), task_id, per_call)
        if job is None:
            return publish(task_id)
        return Enqueue(job, self._get_app()).run(publish, producer, options)

    def _unique_job(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                    task_id: str | None, per_call: Mapping[str, Any]) -> Job | None:
        """What this call asks of the locks (None: nothing, a plain publish)."""
        if per_call or self._unique_binder is None:
            queueing = self._unique_check_call(per_call)
            lock_spec = self._unique_spec(per_call, "lock")
            rate = self._unique_spec(per_call, "rate_limit_key")
        else:  # the common case, on every enqueue: the task's own specs
            queueing, lock_spec, rate = (self._unique_queueing, self._unique_lock,
                                         self._unique_rate)
        values = self._unique_defaults.with_call(per_call)
        # A call under the running job's own id may be its retry (Enqueue tells).
        stack = self.request_stack  # None until the task is bound
        top = stack.top if stack is not None and task_id is not None else None
        running = task_id if top is not None and top.id == task_id and not (
            top.called_directly) else None
        if queueing is None and lock_spec is None and running is None and (
                values.global_rate_limit is None):
            return None
        return Job(self, task_id, args, kwargs, queueing, lock_spec, values,
                   self._unique_defaults.on_store_error, running, self._unique_already_queued,
                   rate)

    # -- worker side ------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.id is None or run_side.started(request):
            # Called as a plain function (or recursively): no lock of ours is involved.
            return super().__call__(*args, **kwargs)
        header = JobHeader.of_request(request)
        if header is None and self._unique_lock is not None:
            # Sent without apply_async (send_task) or run with apply(): the job takes its
            # place in line now.
            header = JobHeader(lock=self._unique_defaults.lock(self.name, self._unique_lock,
                                                               args, kwargs))
        # Raises Ignore when the job must not run now (parked, re-queued, skipped).
        run_side.start(self, header, self._unique_defaults.on_store_error)
        # The tracer has already pushed this task and its request; Task.__call__ would
        # push a fresh request without the job's id.
        try:
            retval = self.run(*args, **kwargs)
        except Exception as exc:
            # Released here, before the tracer stores the result: a caller who has the
            # result finds the locks free. (task_postrun, after, finds nothing left.)
            run_side.finish(self, run_side.state_of(exc), exc)
            raise
        run_side.finish(self, SUCCESS, retval)
        return retval

    def apply(self, *args: Any, **kwargs: Any) -> EagerResult:
        """Run the job in the caller, its locks enforced: a job skipped for its lock
        (``on_locked="skip"``) ends ``REVOKED`` with :class:`LockHeld`, as on a worker."""
        result = super().apply(*args, **kwargs)
        skipped = app_state(self._get_app()).eager_skipped.pop(result.id, None)
        if skipped is not None:
            return EagerResult(result.id, skipped, REVOKED, name=self.name)
        return result


def _on_task_postrun(sender: Any = None, state: str = "", retval: Any = None,
                     **_: Any) -> None:
    # after_return is skipped for RETRY, IGNORED and REJECTED (Reject, Ignore, replace);
    # task_postrun is sent for every end of a traced job, eager mode included.
    if isinstance(sender, UniqueTask):
        run_side.finish(sender, state, retval)


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """A worker sweeps only where locks are used (see :func:`runtime.on_worker_ready`)."""
    from .request import watch_decode_errors  # worker-side: not imported by callers

    watch_decode_errors(sender)
    tasks = [t for t in sender.app.tasks.values() if isinstance(t, UniqueTask)]
    if tasks:
        try:
            store_of(sender.app)  # a client, not connected yet: the settings checked
        except ConfigurationError as exc:
            logger.error("celery-unique: %s. Until then every unique task's job fails.", exc)
            return
    locked = [t for t in tasks if t._unique_lock is not None]
    limited = [t for t in tasks if t._unique_defaults.global_rate_limit is not None]
    runtime.on_worker_ready(
        sender, locked=bool(locked or limited), unique=bool(tasks),
        ordered=any(t._unique_defaults.on_locked == "order" for t in locked) or any(
            t._unique_defaults.on_rate_limited == "wait" for t in limited))


def _on_discarded(sender: Any = None, **kwargs: Any) -> None:
    from .request import on_discarded  # worker-side: not imported by callers

    on_discarded(sender, **kwargs)


signals.task_postrun.connect(_on_task_postrun, weak=False)
signals.worker_ready.connect(_on_worker_ready, weak=False)
# A message the worker drops before any request exists frees its locks.
signals.task_unknown.connect(_on_discarded, weak=False)
signals.task_rejected.connect(_on_discarded, weak=False)
