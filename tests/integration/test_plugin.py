"""The pytest plugin as a user meets it: a small project's tests, run by pytest itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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
