"""The pytest plugin as a user meets it: a small project's tests, run by pytest itself."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_unique.testing import RedisServer

PROJECT = Path(__file__).parent / "plugin_project"


def project(pytester: pytest.Pytester) -> None:
    for path in PROJECT.glob("*.py"):
        shutil.copy(path, pytester.path / path.name)


@pytest.mark.parametrize("store", ["memory", "server"])
def test_a_users_tests_pass_in_both_modes(pytester: pytest.Pytester, store: str) -> None:
    """Duplicates refused and asserted, locks listed and released, eager mode with the
    locks enforced; fakeredis by default, a private redis-server when asked."""
    project(pytester)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--unique-redis={store}")
    result.assert_outcomes(passed=7)


def test_installed_but_not_enabled_it_changes_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="""
        def test_no_plugin(request):
            assert not request.config.pluginmanager.has_plugin("celery_unique.testing")

        def test_no_fixture(unique):
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*fixture 'unique' not found*"])
    fixtures = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--fixtures")
    assert "unique_redis_server" not in fixtures.stdout.str()
    assert "--unique-redis" not in pytester.runpytest_subprocess("--help").stdout.str()


@pytest.fixture
def watched_server() -> Iterator[RedisServer]:
    """A Redis of this test's own: nothing else in the session talks to it."""
    with RedisServer() as server:
        yield server


def test_an_app_not_named_to_the_plugin_never_reaches_its_redis(
    pytester: pytest.Pytester, watched_server: RedisServer,
) -> None:
    """A user's app made with ``set_as_current=False``, its lock store a real Redis named in
    its settings, and no ``unique_app`` override: its tasks use the fixture's store, and
    that Redis receives no command at all."""
    watched = redis.Redis.from_url(watched_server.url)
    pytester.makepyfile(
        userapp=f"""
            from celery import Celery
            from celery_unique import UniqueTask

            app = Celery("userapp", broker="memory://", set_as_current=False)
            app.conf.unique_redis_url = "{watched_server.url}/7"

            @app.task(base=UniqueTask, queueing_lock="report_<email>", lock="printer")
            def report(email):
                return email
        """,
        conftest='pytest_plugins = ["celery_unique.testing"]',
        test_user="""
            from userapp import report

            def test_duplicate(unique):
                report.delay("alice@example.com")
                with unique.raises_duplicate():
                    report.delay("alice@example.com")
                assert sorted(lock.value for lock in unique.locks()) == [
                    "printer", "report_alice@example.com"]

            def test_eager(unique):
                unique.eager()
                assert report.delay("bob@example.com").get() == "bob@example.com"
                assert unique.locks() == []
        """,
    )
    watched.config_resetstat()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    stats = watched.info("commandstats")
    result.assert_outcomes(passed=2)
    # The reset above (cmdstat_config|resetstat on Redis 7): nothing else came.
    assert all(name.startswith("cmdstat_config") for name in stats), stats
