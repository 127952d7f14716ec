from __future__ import annotations

import datetime
import decimal
import inspect
import uuid
from typing import Any

import pytest
from kombu.utils.json import dumps, loads

from celery_unique import ConfigurationError, KeyBuildError
from celery_unique.keys import Binder, build_key, canonical, compile_spec


def f(a: Any, b: Any = 2, *, c: Any = None) -> None: ...


def spec(value: Any, func: Any = f, unique_on: Any = None) -> Any:
    binder = Binder(inspect.signature(func), "t.f")
    return compile_spec(value, option="queueing_lock", task_name="t.f", binder=binder,
                        unique_on=unique_on)


def test_all_arguments_bound_the_same_way() -> None:
    s = spec(True)
    keys = {s.render(args, kwargs) for args, kwargs in [
        ((1, 2), {}), ((), {"a": 1, "b": 2}), ((), {"b": 2, "a": 1}), ((1,), {}),
        ((1,), {"b": 2}),
    ]}
    assert keys == {"a=1,b=2,c=null"}


def test_int_and_str_differ() -> None:
    s = spec(True)
    assert s.render((1,), {}) != s.render(("1",), {})
    assert s.render((True,), {}) != s.render((1,), {})
    assert s.render((1.0,), {}) != s.render((1,), {})


@pytest.mark.parametrize("value", [
    uuid.uuid4(),
    datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc),
    datetime.datetime(2026, 1, 2, 3, 4, 5),
    datetime.date(2026, 1, 2),
    decimal.Decimal("1.10"),
    (1, (2, 3)),
    {1: "a", "b": {2: (3,)}},
    b"\x00bytes",
])
def test_same_key_in_caller_and_worker(value: Any) -> None:
    """What the worker gets back from kombu's JSON gives the caller's key."""
    s = spec(True)
    (args, kwargs) = loads(dumps(((value,), {"c": value})))
    assert s.render(args, kwargs) == s.render((value,), {"c": value})


def test_unique_on_selects_arguments() -> None:
    assert spec(True, unique_on=["b"]).render((1, 3), {}) == "b=3"
    assert spec(True, unique_on=[]).render((1, 3), {}) == ""


def test_template_braces_and_angles() -> None:
    assert spec("x_{a}_{b}").render((1,), {}) == "x_1_2"
    assert spec("x_<a>_<b>").render((1,), {}) == "x_1_2"
    assert spec("{a.real}-{b[0]}").render((3, [9]), {}) == "3-9"
    assert spec("const").render((1,), {}) == "const"


def test_template_with_var_keyword() -> None:
    def g(a: Any, **kwargs: Any) -> None: ...
    assert spec("{a}-{user}", func=g).render((1,), {"user": "u"}) == "1-u"
    with pytest.raises(KeyBuildError, match="user"):
        spec("{a}-{user}", func=g).render((1,), {})


@pytest.mark.parametrize("template, message", [
    ("report_{mail}",
     r"names \{mail\}, which is not a parameter of the task \(parameters: a, b, c\)"),
    ("report_<mail>", r"\{mail\}"),
    ("report_{}", "positional placeholder"),
    ("report_{0}", "positional placeholder"),
    ("report_{a", "not a valid template"),
])
def test_bad_template_is_a_configuration_error(template: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        spec(template)
    assert isinstance(info.value, ValueError)
    assert "t.f" in str(info.value)


@pytest.mark.parametrize("value", [1, 2.5, ["a"], b"x"])
def test_bad_spec_type(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="must be a template string"):
        spec(value)


def test_unformattable_value() -> None:
    class Bad:
        def __format__(self, spec: str) -> str:
            raise RuntimeError("nope")

    with pytest.raises(KeyBuildError, match="cannot be rendered.*nope"):
        spec("{a}").render((Bad(),), {})
    with pytest.raises(KeyBuildError, match="argument 'a'.*Bad"):
        spec(True).render((Bad(),), {})
    with pytest.raises(KeyBuildError, match="cannot be rendered"):
        spec("{a.missing}").render((1,), {})


def test_callable_spec() -> None:
    assert spec(lambda a, b=2, c=None: f"k{a}").render((1,), {}) == "k1"
    with pytest.raises(KeyBuildError, match="raised ZeroDivisionError"):
        spec(lambda a, **kw: str(1 / 0)).render((1,), {})
    with pytest.raises(KeyBuildError, match="returned int 1; it must return a str"):
        spec(lambda a, **kw: 1).render((1,), {})


def test_wrong_arguments_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="t.f"):
        spec(True).render((1, 2, 3), {})
    with pytest.raises(TypeError, match="t.f"):
        spec(True).render((), {"zzz": 1})


def test_canonical_is_stable() -> None:
    assert canonical({"b": 1, "a": 2}) == canonical({"a": 2, "b": 1})
    assert canonical((1, 2)) == canonical([1, 2])
    with pytest.raises(KeyBuildError):
        canonical(object())


def test_build_key_readable_hashed_and_tagged() -> None:
    assert build_key("cu", "q", "t.f", "report_a@b") == "cu:q:{t.f:report_a@b}"
    long_key = build_key("cu", "q", "t.f", "x" * 500)
    assert len(long_key) < 120 and "~" in long_key
    assert build_key("cu", "q", "t.f", "x" * 500) != build_key("cu", "q", "t.f", "x" * 501)
    braces = build_key("cu", "q", "t.f", "a}b")
    assert braces.count("{") == 1 and braces.count("}") == 1
    # an altered value never collides with the raw one it resembles
    assert build_key("cu", "q", "t.f", "a}b") != build_key("cu", "q", "t.f", "a_b")
