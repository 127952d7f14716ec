"""The scripts' own packing of ``EVALSHA``: byte for byte what redis-py sends."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from celery_unique.scripts import pack_evalsha

SHA = "0123456789abcdef0123456789abcdef01234567"


def redis_py_packs(conn: redis.Connection, keys: list[str], args: list[Any]) -> bytes:
    return b"".join(conn.pack_command("EVALSHA", SHA, len(keys), *keys, *args))


@pytest.mark.parametrize("keys,args", [
    ([], []),
    (["celery_unique:l:{report:ä@example.com}:holders"], ["tok", 1, 60_000, "order"]),
    ([f"k{i}" for i in range(8)], ["t" * 10_000, b"\x01raw\nbytes", 0, -5, "✓"]),
])
def test_an_evalsha_is_packed_as_redis_py_packs_it(keys: list[str], args: list[Any]) -> None:
    conn = redis.Connection()  # not connected: packing only
    assert pack_evalsha(conn.encoder, SHA, keys, args) == redis_py_packs(conn, keys, args)


def test_what_it_cannot_pack_is_left_to_redis_py() -> None:
    """Another encoding, or an argument of another type: None, and redis-py packs it."""
    assert pack_evalsha(redis.Connection(encoding="latin-1").encoder, SHA, ["k"], ["é"]) is None
    assert pack_evalsha(redis.Connection(encoding_errors="replace").encoder, SHA, ["k"],
                        ["x"]) is None
    for odd in (1.5, True, None):
        assert pack_evalsha(redis.Connection().encoder, SHA, ["k"], [odd]) is None
