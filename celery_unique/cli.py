"""``celery -A proj unique ...``: see the locks, release them, defer a job with its locks.

A sub-command of Celery's own (click, registered through the ``celery.commands`` entry
point), a thin layer over :mod:`celery_unique.admin`. Every error is one line on stderr,
never a traceback, and its exit status says which: 2 for a command used wrongly (click's
usage errors), 1 for anything that failed, 3 for a duplicate refused by ``defer``.
"""

from __future__ import annotations

import difflib
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import click
import redis
from celery import Celery
from kombu.exceptions import OperationalError

from . import admin
from .exceptions import AlreadyQueued, CeleryUniqueError
from .settings import redis_url, safe_url

__all__ = ["DUPLICATE", "unique"]

#: The human table's columns fit its first rows, however many follow.
_TABLE_WIDTHS_FROM = 1000

#: ``defer``'s exit status for a duplicate refused (without ``-i``).
DUPLICATE = 3

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"celery unique: {message}", err=True)
    sys.exit(code)


def _app(ctx: click.Context) -> Celery:
    from celery._state import default_app

    obj = ctx.find_root().obj
    app = getattr(obj, "app", None)
    if app is None or app is default_app:
        _fail("no app: give it as Celery's commands take it (celery -A proj unique ...)")
    return app


def _guarded(func: F) -> F:
    """One line on stderr and exit 1 for any error, never a traceback."""
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except click.exceptions.Abort:
            _fail("aborted: nothing done")
        except CeleryUniqueError as exc:
            _fail(str(exc))
        except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
            # The lock store, or the broker when it is the same server: name it.
            url = safe_url(redis_url(_app(click.get_current_context())))
            _fail(f"cannot reach the lock store at {url}: {exc}")
        except Exception as exc:
            _fail(f"{type(exc).__name__}: {exc}")
    run.__name__, run.__doc__ = func.__name__, func.__doc__
    return run  # type: ignore[return-value]


@click.group(name="unique")
def unique() -> None:
    """celery-unique: list and release locks, defer a job with its locks."""


def _filters(func: F) -> F:
    func = click.option("--kind", type=click.Choice(admin.KINDS),
                        help="Only queueing locks, or only locks.")(func)
    func = click.option("--task", help="Only the locks whose key names this task.")(func)
    func = click.option("--match", metavar="GLOB",
                        help="Only the locks whose value or key matches.")(func)
    return func


def _ttl(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _results(app: Celery, holders: tuple[str, ...]) -> list[Any]:
    """The holders' results, when there is a result backend to ask."""
    from celery.backends.base import DisabledBackend

    if isinstance(app.backend, DisabledBackend):
        return []
    return [app.AsyncResult(h) for h in holders]


def _states(app: Celery, holders: tuple[str, ...]) -> str:
    return ",".join(r.state for r in _results(app, holders)) or "-"


def _worker(result: Any) -> dict[str, Any] | None:
    """Where a holder runs, when the backend knows (``task_track_started``)."""
    info = result.info if result.state == "STARTED" else None
    if isinstance(info, dict) and info.get("hostname"):
        return {"hostname": info["hostname"], "pid": info.get("pid")}
    return None


def _status(info: admin.LockInfo) -> str:
    """Each holder's status, as the table shows it."""
    cells = []
    for status, left in itertools.zip_longest(info.holder_status(), info.leases):
        cells.append(f"expired {-left:.1f}s ago" if status == "lease expired" else status)
    return ",".join(cells) or "-"


@unique.command("locks")
@_filters
@click.option("--json", "as_json", is_flag=True, help="Print JSON only: an array of locks.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many locks.")
@click.option("--states/--no-states", default=None,
              help="Ask the result backend for the holders' states and workers (when there"
                   " is one): on by default for the table, off for --json.")
@click.pass_context
@_guarded
def locks(ctx: click.Context, match: str | None, task: str | None, kind: str | None,
          as_json: bool, limit: int | None, states: bool | None) -> None:
    """Every lock: kind, task, value, holders, their status and state, TTL, fence, jobs
    waiting."""
    app = _app(ctx)
    found = _limited(admin.iter_locks(app, match=match, task=task, kind=kind), limit)
    if as_json:
        # Streamed: one lock at a time, whatever their number. The first is read before
        # anything is written, so a store that cannot be reached leaves stdout empty.
        head = list(itertools.islice(found, 1))
        out = sys.stdout
        out.write("[")
        for n, info in enumerate(itertools.chain(head, found)):
            out.write(("," if n else "") + "\n" + json.dumps(_as_json(app, info, states)))
        out.write("\n]\n")
        _hint_task(app, task, bool(head))
        return
    rows = ((info.kind, info.task or "-", info.value, ",".join(info.holders) or "-",
             _status(info), _states(app, info.holders) if states is not False else "-",
             _ttl(info.ttl), "-" if info.fence is None else str(info.fence),
             str(info.waiting))
            for info in found)
    header = ("KIND", "TASK", "VALUE", "HOLDERS", "STATUS", "STATE", "TTL", "FENCE",
              "WAITING")
    # Streamed too: the columns are as wide as the first rows need, later longer cells
    # push theirs, so a million locks never sit in memory.
    first = list(itertools.islice(rows, _TABLE_WIDTHS_FROM))
    widths = [max(len(r[i]) for r in [header, *first]) for i in range(len(header))]
    counts = {"queueing": 0, "lock": 0, "rate": 0}
    for n, row in enumerate(itertools.chain([header], first, rows)):
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if n:
            counts[row[0]] += 1
    rates = f", {counts['rate']} rate limits" if counts["rate"] else ""
    click.echo(f"{sum(counts.values())} locks ({counts['queueing']} queueing,"
               f" {counts['lock']} locks{rates})")
    _hint_task(app, task, bool(sum(counts.values())))


def _as_json(app: Celery, info: admin.LockInfo, states: bool | None) -> dict[str, Any]:
    out = info.as_dict()
    if states:
        results = _results(app, info.holders)
        out["states"] = [r.state for r in results] or None
        out["workers"] = [_worker(r) for r in results] or None
    return out


def _known_task(app: Celery, name: str) -> str | None:
    """None when ``name`` is registered; else a hint naming the tasks it may mean."""
    app.loader.import_default_modules()
    names = [n for n in app.tasks if not n.startswith("celery.")]
    if name in names:
        return None
    like = sorted(n for n in names if n.rsplit(".", 1)[-1] == name) or difflib.get_close_matches(
        name, names, n=3)
    return f"no task {name!r}" + (f"; did you mean {' or '.join(map(repr, like))}?"
                                  if like else " is registered")


def _hint_task(app: Celery, task: str | None, found: bool) -> None:
    """``--task`` that found nothing and names no registered task: say so (stderr)."""
    if task and not found:
        hint = _known_task(app, task)
        if hint:
            click.echo(f"celery unique: {hint} (--task takes the full name)", err=True)


def _limited(found: Iterator[admin.LockInfo], limit: int | None) -> Iterator[admin.LockInfo]:
    for n, info in enumerate(found):
        if limit is not None and n >= limit:
            return
        yield info


@unique.command("show")
@click.argument("key_or_value")
@click.pass_context
@_guarded
def show(ctx: click.Context, key_or_value: str) -> None:
    """One lock in full: its holders, and its waiting jobs in line order."""
    app = _app(ctx)
    info = admin.get_lock(app, key_or_value)
    if info is None:
        _fail(f"no lock {key_or_value!r}")
    click.echo(f"key      {info.key}\nkind     {info.kind}\ntask     {info.task or '-'}\n"
               f"value    {info.value}\nholders  {len(info.holders) or '-'}")
    results = _results(app, info.holders)
    for n, (holder, status) in enumerate(zip(info.holders, info.holder_status())):
        lease = ""
        if info.leases:
            left = info.leases[n]
            lease = f", lease {left:.1f}s left" if left > 0 else f" {-left:.1f}s ago"
        line = f"  {holder}  {status}{lease}"
        if results:
            worker = _worker(results[n])
            line += f"  {results[n].state}" + (
                f" on {worker['hostname']} (pid {worker['pid']})" if worker else "")
        click.echo(line)
    click.echo(f"ttl      {_ttl(info.ttl)}\n"
               f"fence    {'-' if info.fence is None else info.fence}\n"
               f"waiting  {info.waiting}")
    for job in info.line:
        click.echo(f"  {job.place:>4}  {job.task_id}  {job.task or '-'}"
                   f"  {'parked' if job.parked else 'on its way'}")


def _interactive() -> bool:
    return sys.stdin.isatty()


def _list(what: list[admin.LockInfo]) -> None:
    for info in what:
        click.echo(f"{info.kind:<9} {info.key}  held by {', '.join(info.holders) or '-'}"
                   f" ({_status(info)})  ({info.waiting} waiting)")


def _confirm(what: list[admin.LockInfo], yes: bool) -> None:
    _list(what)
    if not yes:
        if not _interactive():
            _fail("not released: pass --yes to release without asking")
        if not click.confirm(f"Release {len(what)} lock(s)?"):
            _fail("nothing released")


def _dead_and_dry(func: F) -> F:
    func = click.option("--dry-run", is_flag=True,
                        help="Say what would be released; release nothing.")(func)
    func = click.option("--dead", is_flag=True,
                        help="Only holders whose lease ran out (a lock's; a queueing lock's"
                             " holder cannot be told dead).")(func)
    return func


@unique.command("release")
@click.argument("key")
@click.option("--yes", is_flag=True, help="Do not ask.")
@_dead_and_dry
@click.pass_context
@_guarded
def release(ctx: click.Context, key: str, yes: bool, dead: bool, dry_run: bool) -> None:
    """Release one lock; a lock with jobs waiting is handed to the first in line."""
    app = _app(ctx)
    info = admin.get_lock(app, key)
    if info is None:
        _fail(f"no lock {key!r}")
    if dead and "lease expired" not in info.holder_status():
        click.echo(f"nothing to release: no holder of {info.key} has a lease that ran out")
        return
    if dry_run:
        _list([info])
        click.echo("would release 1 lock (dry run: nothing released)")
        return
    _confirm([info], yes)
    admin.release(app, info.key, dead=dead)
    click.echo(f"released {info.key}")


@unique.command("clear")
@_filters
@click.option("--yes", is_flag=True, help="Do not ask.")
@_dead_and_dry
@click.pass_context
@_guarded
def clear(ctx: click.Context, match: str | None, task: str | None, kind: str | None,
          yes: bool, dead: bool, dry_run: bool) -> None:
    """Release every lock the filters select (each as `release` would)."""
    app = _app(ctx)
    found = [info for info in admin.iter_locks(app, match=match, task=task, kind=kind)
             if not dead or "lease expired" in info.holder_status()]
    if not found:
        click.echo("no locks")
        return
    if dry_run:
        _list(found)
        click.echo(f"would release {len(found)} lock(s) (dry run: nothing released)")
        return
    _confirm(found, yes)
    for info in found:
        admin.release(app, info.key, dead=dead)
    click.echo(f"released {len(found)} lock(s)")


def _json(option: str, text: str | None, kind: type) -> Any:
    if text is None:
        return kind()
    try:
        value = json.loads(text)
    except ValueError as exc:
        _fail(f"{option} is not JSON: {exc}")
    if not isinstance(value, kind):
        _fail(f"{option} must be a JSON {'array' if kind is list else 'object'}")
    return value


def _check_broker(app: Celery) -> None:
    """Fail in about a second when the broker does not answer (Celery's own connect
    retries take tens of seconds, then end in a traceback)."""
    with app.connection_for_write() as connection:
        try:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                         timeout=1.5)
        except Exception as exc:
            url = app.conf.broker_url
            url = safe_url(url) if isinstance(url, str) else connection.as_uri()
            _fail(f"cannot reach the broker at {url}: {exc}")


@unique.command("defer")
@click.argument("task_name", metavar="TASK")
@click.option("--args", "args_json", metavar="JSON", help="Positional arguments, a JSON array.")
@click.option("--kwargs", "kwargs_json", metavar="JSON",
              help="Keyword arguments, a JSON object.")
@click.option("--queueing-lock", help="The queueing lock (a template or a value).")
@click.option("--lock", "lock", help="The lock (a template or a value).")
@click.option("--ignore-already-enqueued", "-i", is_flag=True,
              help="A duplicate is not an error: exit 0, nothing published.")
@click.option("--countdown", type=float, help="Seconds before it may run.")
@click.option("--queue", help="The queue to send it to.")
@click.pass_context
@_guarded
def defer(ctx: click.Context, task_name: str, args_json: str | None, kwargs_json: str | None,
          queueing_lock: str | None, lock: str | None, ignore_already_enqueued: bool,
          countdown: float | None, queue: str | None) -> None:
    """Queue a job with its locks, as procrastinate's `defer` does; print its id."""
    app = _app(ctx)
    unknown = _known_task(app, task_name)
    if unknown:
        _fail(unknown)
    task = app.tasks[task_name]
    options: dict[str, Any] = {}
    for name, value in (("queueing_lock", queueing_lock), ("lock", lock),
                        ("countdown", countdown), ("queue", queue)):
        if value is not None:
            options[name] = value
    if (queueing_lock or lock) and not hasattr(type(task), "_unique_lock"):
        _fail(f"{task_name} is not a UniqueTask: it takes no lock")
    args, kwargs = _json("--args", args_json, list), _json("--kwargs", kwargs_json, dict)
    _check_broker(app)
    try:
        # No publish retries: a broker that answered a moment ago and fails now is an
        # error to report at once, not to wait out (Celery retries for seconds).
        result = task.apply_async(args, kwargs, retry=False, **options)
    except AlreadyQueued as exc:
        if ignore_already_enqueued:
            # stderr: a cron job running `defer -i` mails its stdout.
            click.echo(f"ignored: already queued under {exc.key} by {exc.task_id}", err=True)
            return
        _fail(f"already queued under {exc.key} by {exc.task_id}"
              f" (expires in {exc.ttl:.0f}s)", DUPLICATE)
    click.echo(result.id)
