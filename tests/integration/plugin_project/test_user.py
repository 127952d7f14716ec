import fakeredis
import pytest
from userproj import print_book, report


def test_a_duplicate_is_refused(unique):
    report.delay("alice@example.com")
    with unique.raises_duplicate() as caught:
        report.delay("alice@example.com")
    assert caught[0].key in unique.lock_keys()
    assert [lock.value for lock in unique.locks(kind="queueing")] == ["report_alice@example.com"]


def test_each_test_starts_with_no_lock(unique):
    assert unique.locks() == []
    report.delay("alice@example.com")


def test_release_all(unique):
    report.delay("bob@example.com")
    assert unique.release_all() == 1
    report.delay("bob@example.com")


def test_not_a_duplicate_fails_the_assertion(unique):
    with pytest.raises(AssertionError, match="not refused"), unique.raises_duplicate():
        report.delay("carol@example.com")


def test_eager_with_the_locks_enforced(unique):
    unique.eager()
    assert print_book.delay(3).get() == "REVOKED"
    assert unique.locks() == []


def test_the_store(unique, request):
    memory = request.config.getoption("--unique-redis") == "memory"
    assert isinstance(unique.client, fakeredis.FakeRedis) is memory


@pytest.mark.unique_redis
def test_a_marked_test_gets_a_server(unique):
    assert not isinstance(unique.client, fakeredis.FakeRedis)
    report.delay("dave@example.com")
    with unique.raises_duplicate():
        report.delay("dave@example.com")
