"""Lock specs (template, callable, ``True``) compiled once per task, and Redis key building.

A spec is checked when Celery creates the task; rendering it at call time only formats.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import inspect
import json
import re
import string
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from .exceptions import ConfigurationError, KeyBuildError

__all__ = ["Binder", "CompiledSpec", "LockSpec", "build_key", "canonical", "compile_spec",
           "glob_escape", "line_keys", "lock_keys", "registry_key"]

#: What ``queueing_lock`` and ``lock`` accept.
LockSpec = Union[str, Callable[..., str], bool, None]

_P = inspect.Parameter
# ``<name>`` as written in ``report_<email>``; dotted and indexed lookups are allowed as in ``{}``.
_ANGLE = re.compile(r"<([A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[[^\]<>{}]*\])*)>")
_ROOT = re.compile(r"[.\[]")
# Braces would break the Redis Cluster hash tag; control characters break redis-cli;
# "~" marks the hashed form, so a raw value never looks like a hashed one.
_UNSAFE = re.compile(r"[{}~\x00-\x1f\x7f]")
_MAX_READABLE = 120


class Binder:
    """Maps a call's ``args``/``kwargs`` to the task's parameter names, defaults applied."""

    def __init__(self, signature: inspect.Signature, task_name: str) -> None:
        self.signature = signature
        self.task_name = task_name
        params = list(signature.parameters.values())
        self.names = [p.name for p in params]
        self._names = frozenset(self.names)
        self.positional = [p.name for p in params if p.kind is _P.POSITIONAL_OR_KEYWORD]
        self.defaults = {p.name: p.default for p in params if p.default is not _P.empty}
        self.var_keyword = next((p.name for p in params if p.kind is _P.VAR_KEYWORD), None)
        # The fast path covers plain ``def f(a, b=1, *, c)`` signatures, the common case,
        # at a fraction of ``Signature.bind``'s cost; anything else takes the slow path.
        self._simple = all(p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY) for p in params)

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if self._simple and len(args) <= len(self.positional):
            taken = self.positional[: len(args)]
            if not any(k in taken or k not in self._names for k in kwargs):
                bound = dict(self.defaults)
                bound.update(zip(taken, args))
                bound.update(kwargs)
                if len(bound) == len(self.names):
                    return bound
        try:
            bound_args = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.task_name}: {exc}") from None
        bound_args.apply_defaults()
        return dict(bound_args.arguments)


def task_signature(run: Any, *, drop_first: bool) -> inspect.Signature:
    sig = inspect.signature(run)
    if drop_first:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return sig


class CompiledSpec:
    """A checked lock spec; :meth:`render` turns a call's arguments into the lock's value."""

    def __init__(
        self,
        kind: str,
        *,
        option: str,
        task_name: str,
        binder: Binder,
        fmt: str = "",
        func: Callable[..., Any] | None = None,
        fields: Sequence[str] = (),
        source: Any = None,
    ) -> None:
        self.kind, self.option, self.task_name, self.binder = kind, option, task_name, binder
        self.fmt, self.func, self.fields, self.source = fmt, func, tuple(fields), source
        self.constant = kind == "template" and not fields

    def render(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        if self.constant:
            return self.fmt.replace("{{", "{").replace("}}", "}")
        if self.kind == "callable":
            return self._call(args, kwargs)
        bound = self.binder.bind(args, kwargs)
        if self.kind == "template":
            mapping = bound
            if self.binder.var_keyword:
                mapping = {**bound[self.binder.var_keyword], **bound}
            try:
                return self.fmt.format_map(mapping)
            except Exception as exc:  # any error from a user's __format__ too
                raise KeyBuildError(
                    f"{self.task_name}: {self.option}={self.source!r} cannot be rendered"
                    f" from these arguments: {type(exc).__name__}: {exc}",
                    task=self.task_name, option=self.option, template=self.source,
                ) from None
        parts = []
        for name in self.fields:
            try:
                parts.append(f"{name}={canonical(bound[name])}")
            except KeyBuildError as exc:
                raise KeyBuildError(
                    f"{self.task_name}: {self.option}=True: argument {name!r}: {exc.message}",
                    task=self.task_name, option=self.option, argument=name,
                ) from None
        return ",".join(parts)

    def _call(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        assert self.func is not None
        try:
            value = self.func(*args, **kwargs)
        except Exception as exc:
            raise KeyBuildError(
                f"{self.task_name}: the {self.option} callable {self.source!r} raised"
                f" {type(exc).__name__}: {exc}",
                task=self.task_name, option=self.option,
            ) from exc
        if not isinstance(value, str):
            raise KeyBuildError(
                f"{self.task_name}: the {self.option} callable {self.source!r} returned"
                f" {type(value).__name__} {value!r}; it must return a str",
                task=self.task_name, option=self.option,
            )
        return value


def compile_spec(
    spec: Any,
    *,
    option: str,
    task_name: str,
    binder: Binder,
    unique_on: Sequence[str] | None,
) -> CompiledSpec | None:
    """Check ``spec`` against the task's parameters; raise :class:`ConfigurationError`."""
    if spec is None or spec is False:
        return None
    if spec is True:
        fields = binder.names if unique_on is None else list(unique_on)
        return CompiledSpec("all", option=option, task_name=task_name, binder=binder,
                            fields=fields, source=True)
    if isinstance(spec, str):
        fmt = _ANGLE.sub(r"{\1}", spec)
        fields = _template_fields(fmt, spec, option=option, task_name=task_name, binder=binder)
        return CompiledSpec("template", option=option, task_name=task_name, binder=binder,
                            fmt=fmt, fields=fields, source=spec)
    if callable(spec):
        return CompiledSpec("callable", option=option, task_name=task_name, binder=binder,
                            func=spec, source=spec)
    raise ConfigurationError(
        f"{task_name}: {option} must be a template string, a callable, True or None;"
        f" got {type(spec).__name__} {spec!r}",
        task=task_name, option=option, value=spec,
    )


def _template_fields(
    fmt: str, source: str, *, option: str, task_name: str, binder: Binder
) -> list[str]:
    params = ", ".join(binder.names) or "(none)"
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as exc:
        raise ConfigurationError(
            f"{task_name}: {option}={source!r} is not a valid template: {exc}",
            task=task_name, option=option, template=source,
        ) from None
    fields = []
    for _literal, field, format_spec, _conversion in parsed:
        if field is None:
            continue
        root = _ROOT.split(field, maxsplit=1)[0]
        if not root or root.isdigit():
            raise ConfigurationError(
                f"{task_name}: {option}={source!r} has a positional placeholder {{{field}}};"
                f" name a parameter instead (parameters: {params})",
                task=task_name, option=option, template=source, placeholder=field,
            )
        if (format_spec and "{" in format_spec) or (
            root not in binder.names and not binder.var_keyword
        ):
            raise ConfigurationError(
                f"{task_name}: {option}={source!r} names {{{field}}}, which is not a"
                f" parameter of the task (parameters: {params})",
                task=task_name, option=option, template=source, placeholder=field,
                parameters=list(binder.names),
            )
        fields.append(root)
    return fields


def check_unique_on(unique_on: Any, *, task_name: str, binder: Binder) -> list[str] | None:
    if unique_on is None:
        return None
    if isinstance(unique_on, str) or not isinstance(unique_on, (list, tuple)):
        raise ConfigurationError(
            f"{task_name}: unique_on must be a list of parameter names, got {unique_on!r}",
            task=task_name, option="unique_on", value=unique_on,
        )
    unknown = [name for name in unique_on if name not in binder.names]
    if unknown:
        raise ConfigurationError(
            f"{task_name}: unique_on names {unknown!r}, not parameters of the task"
            f" (parameters: {', '.join(binder.names) or '(none)'})",
            task=task_name, option="unique_on", value=unique_on,
        )
    return list(unique_on)


def canonical(value: Any) -> str:
    """One string per value, the same before and after a JSON (or pickle) round trip.

    Tuples and lists are alike, dict keys are strings (JSON turns ``{1: x}`` into
    ``{"1": x}`` on the way to the worker), and ``1`` differs from ``"1"``.
    """
    return json.dumps(_normalize(value), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)


_TAGGED: tuple[tuple[type, str, Callable[[Any], str]], ...] = (
    (uuid.UUID, "uuid", str),
    (datetime.datetime, "datetime", datetime.datetime.isoformat),
    (datetime.date, "date", datetime.date.isoformat),
    (datetime.time, "time", datetime.time.isoformat),
    (decimal.Decimal, "decimal", str),
    (bytes, "bytes", bytes.hex),
)


def _normalize(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_normalize(item) for item in value]
    if isinstance(value, dict):
        return {_dict_key(k): _normalize(v) for k, v in value.items()}
    for cls, tag, encode in _TAGGED:
        if isinstance(value, cls):
            return {f"__{tag}__": encode(value)}
    raise KeyBuildError(
        f"a {type(value).__name__} has no canonical form for a lock key; pass a template"
        " or a callable, or limit the key with unique_on",
        type=type(value).__name__,
    )


def _dict_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)
    raise KeyBuildError(
        f"a dict key of type {type(key).__name__} has no canonical form for a lock key",
        type=type(key).__name__,
    )


def build_key(prefix: str, kind: str, scope: str, value: str) -> str:
    """``prefix:kind:{scope:value}``: readable, hashed when long or unsafe, one hash tag."""
    tag = f"{scope}:{value}" if scope else value
    if len(tag) > _MAX_READABLE or _UNSAFE.search(tag):
        digest = hashlib.sha256(tag.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        tag = f"{_UNSAFE.sub('_', tag[:64])}~{digest}"
    return f"{prefix}:{kind}:{{{tag}}}"


#: The keys of one execution lock, after its base (``prefix:l:{name}``), in the order the
#: lock scripts name them (see :mod:`celery_unique.store`); all share the base's hash tag.
LOCK_KEY_SUFFIXES = ("holders", "line", "parked", "seq", "arrival", "ran")


def lock_keys(base: str) -> list[str]:
    """The keys of the execution lock ``base``, in :data:`LOCK_KEY_SUFFIXES`' order."""
    return [f"{base}:{suffix}" for suffix in LOCK_KEY_SUFFIXES]


def line_keys(base: str) -> list[str]:
    """The keys a job entering the line of ``base`` writes: its line, seq and arrival."""
    return [f"{base}:line", f"{base}:seq", f"{base}:arrival"]


def glob_escape(text: str) -> str:
    """``text`` matched literally in a ``SCAN``/``ZSCAN`` ``MATCH`` pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def registry_key(prefix: str) -> str:
    """The sweepers' registry of locks with parked jobs (``prefix:l:waiting``)."""
    return f"{prefix}:l:waiting"
