"""The Lua scripts that touch Redis, one typed method each: :class:`Scripts`.

Each script is a named constant headed by its KEYS, ARGV and reply, beside the one method
that runs it (redis-py's ``redis/lock.py``); no other module builds a script's KEYS or
ARGV, or reads its reply: a reply is a typed value, a refusal a typed exception. Every
check-then-write is one script run with EVALSHA (redis-py loads it on the first NOSCRIPT),
every key goes through ``KEYS`` (Redis Cluster), TTLs are in milliseconds and every
lock's value is its owner's token (the job's task id). A script sent ahead is read later
(:class:`Pending`), on a connection of its own (:mod:`celery_unique.connections`).
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar, cast

import redis
from redis.cluster import RedisCluster

from .connections import CONNECTION_ERRORS, UNAVAILABLE_ERRORS, ThreadConnections, keep, unkeep
from .exceptions import LockStoreUnavailable
from .keys import line_keys, lock_keys
from .settings import safe_url
from .wire import Lock, ParkedMessage, RegistryEntry

__all__ = ["Duplicate", "GatedProducer", "GatedRouter", "Grant", "LockReply", "Pending",
           "Released", "Reservation", "Scripts", "Started", "Swept", "Taken", "Woken",
           "publishing_key", "read_keys", "replaced_key", "text"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: The synchronous call a reply falls back on: ``run(script, keys, args)``.
Run = Callable[[Any, list[str], list[Any]], Any]


def text(value: Any) -> str:
    """A Redis reply's bytes as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


# -- replies ---------------------------------------------------------------------------

class Duplicate(Exception):
    """Internal: the queueing lock is held by another job; never leaves apply_async.

    ``Duplicate(holder, pttl, running)``: the holder's token and its lease left (ms);
    ``running``: the job's execution lock is held by the running ``holder``
    (``lock_check_at_enqueue``), not its queueing lock.
    """

    @property
    def running(self) -> bool:
        return len(self.args) > 2 and bool(self.args[2])

    @property
    def holder(self) -> str:
        return str(self.args[0])

    @property
    def pttl(self) -> int:
        return int(self.args[1])


class Taken(NamedTuple):
    """A queueing lock's reply."""

    taken: bool  #: taken (or already held by this token: its lease renewed)
    holder: str  #: the token holding it
    pttl_ms: int  #: the holder's lease left
    #: The token of the job it was taken from, replaced (``on_duplicate="replace"``), or
    #: ``""``; and that job's lease left then.
    replaced: str = ""
    replaced_pttl_ms: int = 0
    #: Refused because the job's execution lock is held by ``holder``, running
    #: (``lock_check_at_enqueue``); nothing was taken.
    running: bool = False
    #: Taken, and the job parked in its rate limit's line instead of pushed: it waits
    #: for its turn there (:meth:`Scripts.push_with_locks`).
    parked: bool = False

    def check(self) -> str:
        """Raise :class:`Duplicate` unless the lock was taken; return :attr:`replaced`."""
        if not self.taken:
            raise Duplicate(self.holder, self.pttl_ms, self.running)
        return self.replaced


class Place(NamedTuple):
    """A place in line taken before the job's message is published."""

    ticket: int
    deadline: str  #: the deadline its arrival mark was given (ms, as the server wrote it)


def _place(reply: Any) -> Place:
    return Place(int(reply[0]), text(reply[1]))


class Extended(NamedTuple):
    """What :meth:`Scripts.published` gave its full lease."""

    queueing: bool  #: the queueing lock (False: gone, another job's, or not asked)
    place: bool  #: the place in line (False: given up, marked by a worker, or not asked)
    #: The job it took the queueing lock from is replaced (False: it started meanwhile,
    #: or not asked).
    replaced: bool = False


class Woken(NamedTuple):
    """A parked job handed the lock, to publish again."""

    token: str
    message: str  #: the parked message (:mod:`celery_unique.wire`), ``""`` when pushed


class Grant(enum.IntEnum):
    """What a job asking for its lock (or parking) was told."""

    WAIT = 0  #: held by others: the job waits in line, is re-queued or skipped
    TAKEN = 1  #: the job holds the lock
    COPY_HOLDS = 2  #: another copy of this job holds it: wait for it, never beside it
    RAN = 3  #: this run of the job has ended already: a late copy, to drop


class LockReply(NamedTuple):
    """The reply of :meth:`Store.acquire_lock` and :meth:`Store.park`."""

    grant: Grant
    fence: int  #: the fence token (:attr:`Grant.TAKEN`), else 0
    holder: str  #: a holder's token (else ``""``)
    place: int  #: the job's place in line (0 first), or -1
    woken: list[Woken]
    #: :attr:`Grant.TAKEN`: ms since a release or the sweep handed the job the lock (the
    #: store's clock); -1 when it took it itself.
    handed_ms: int = -1


class Released(NamedTuple):
    """The reply of :meth:`Store.release_lock`."""

    held: bool  #: the job held the lock (else it only left the line, or nothing)
    woken: list[Woken]
    expired: bool = False  #: it held the lock until its lease ran out, unrenewed


class Swept(NamedTuple):
    """The reply of :meth:`Store.sweep_lock`."""

    next_ms: int  #: ms until the lock needs looking at again; -1: never (nothing parked)
    expired: int  #: holders' leases found run out
    dropped: int  #: places in line given up (their job never reached a worker in time)
    woken: list[Woken]


def _raw(reply: Any) -> Any:
    return reply


def _woken(flat: list[Any]) -> list[Woken]:
    return [Woken(text(flat[i]), text(flat[i + 1])) for i in range(0, len(flat) - 1, 2)]


def _lock_reply(reply: list[Any]) -> LockReply:
    grant = Grant(int(reply[0]))
    if grant is Grant.TAKEN:
        return LockReply(grant, int(reply[1]), "", -1, [], int(reply[2]))
    place = -1 if reply[2] is None else int(reply[2])  # no place (never from our scripts)
    return LockReply(grant, 0, text(reply[1]), place, _woken(reply[3:]))


def _taken(token: str, ttl_ms: int) -> Callable[[Any], Taken]:
    def parse(reply: Any) -> Taken:
        if reply is None:
            return Taken(True, token, ttl_ms)
        if len(reply) > 3:  # parked, maybe after replacing a holder
            return Taken(True, token, ttl_ms, text(reply[0]), int(reply[1]), parked=True)
        if len(reply) > 2 and reply[2] == b"r":  # taken from a job it replaced
            return Taken(True, token, ttl_ms, text(reply[0]), int(reply[1]))
        return Taken(False, text(reply[0]), int(reply[1]), running=len(reply) > 2)
    return parse


class Started(NamedTuple):
    """The reply of :meth:`Scripts.started`."""

    replaced_by: str  #: the job that replaced this one (it must not run), or ``""``
    released: bool  #: its queueing lock was released (``until="started"``)


# -- shared by the scripts -------------------------------------------------------------

_ENTER_LINE_FUNCTION = """
local function enter_line(line, seq, arrival, token, wait_ms)
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  local ticket = math.max(tonumber(redis.call('GET', seq) or '0') + 1, now * 1000)
  redis.call('SET', seq, string.format('%d', ticket), 'PX', 3600000)
  redis.call('ZADD', line, 'NX', ticket, token)
  redis.call('ZADD', arrival, now + tonumber(wait_ms), token)
  return ticket, now
end
"""

#: A queueing lock's jobs replaced (``on_duplicate="replace"``) and not started yet: the
#: HASH ``replaced_key(key)``, replaced token -> its replacer's token (it must not run);
#: ``"?"`` and the replacer's token while the replacer is not published yet (off the
#: atomic path: if the replaced job starts meanwhile it runs, and its value becomes
#: ``""``: the replacer's publish then leaves it alone). Under the field
#: :data:`STARTED_FIELD`, the holder that has started (``until="finished"``): it is not
#: replaced. The hash lives as long as the longest lease it has seen.
STARTED_FIELD = ":started"
#: The field of the replaced jobs' hash holding when the key's burst of debounced calls
#: began (ms, the server's clock); removed when the burst's job starts.
BURST_FIELD = ":burst"

_TAKE_QUEUEING_FUNCTION = f"""
local function take_queueing(key, replaced, token, lease, mark)
  local holder = redis.call('GET', key)
  local out = false
  if holder and holder ~= token then
    local pttl = redis.call('PTTL', key)
    if not replaced or redis.call('HGET', replaced, '{STARTED_FIELD}') == holder then
      return {{holder, pttl}}
    end
    redis.call('HSET', replaced, holder, mark)
    local keep = math.max(redis.call('PTTL', replaced), pttl, tonumber(lease))
    redis.call('PEXPIRE', replaced, keep)
    out = {{holder, pttl, 'r'}}
  end
  redis.call('SET', key, token, 'PX', lease)
  return out
end
"""

#: ``lock_check_at_enqueue``: whether the lock whose holders are ``holders`` is held by
#: ``limit`` running jobs now: ``{a holder, its lease left, 'l'}``, else false.
_LOCK_HELD_FUNCTION = """
local function lock_held(holders, limit)
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  local live = redis.call('ZRANGEBYSCORE', holders, '(' .. now, '+inf', 'WITHSCORES',
                          'LIMIT', 0, limit)
  if #live < 2 * limit then return false end
  return {live[1], tonumber(live[2]) - now, 'l'}
end
"""

#: A job waiting in line leaves its message (a parked message, ``wire``) and its arrival
#: mark, and the lock is registered for the sweepers in ``registry`` (if given) in the same
#: script: a parked job is never left where no sweep looks, whatever fails after this. Due
#: when the first lease ends (a place may free then: a rate limit's does), never later
#: than it was already due. Shared by PARK and the atomic enqueue.
_PARK_FUNCTION = """
local function keep_parked(arrival, parked, holders, registry, token, message, member, now,
                           lease)
  redis.call('ZREM', arrival, token)
  redis.call('HSET', parked, token, message)
  if registry then
    local first = redis.call('ZRANGE', holders, 0, 0, 'WITHSCORES')[2]
    redis.call('ZADD', registry, 'LT', first and tonumber(first) or now + lease, member)
  end
end
"""

#: A job entering a line at enqueue (a rate limit's) that would wait for its turn: it is
#: parked there at once, its message never pushed to a worker, as PARK would park it
#: (``keep_parked``). It would wait when the live holders and the places ahead of it
#: fill the limit (a place ahead given up later is found by the sweep). Only while a
#: start is live: a worker granted it, so a worker sweeps (a worker whose tasks get a
#: rate limit per call sweeps from the first such job it receives); with none, the job
#: is pushed and waits at a worker, as off the atomic path. Returns whether it was parked.
_PARK_AT_ENQUEUE_FUNCTION = _PARK_FUNCTION + """
local function park_at_enqueue(line, arrival, holders, parked, registry, token, limit,
                               lease, member, message, now)
  local live = redis.call('ZCOUNT', holders, '(' .. now, '+inf')
  if live == 0 or live + redis.call('ZRANK', line, token) < limit then return false end
  keep_parked(arrival, parked, holders, registry, token, message, member, now, lease)
  return true
end
"""

# -- the execution lock ------------------------------------------------------------------
#
# One lock is six keys sharing one hash tag (``keys.lock_keys``):
#   holders  ZSET token -> lease deadline (ms, server time): the jobs running under it
#   line     ZSET token -> ticket: jobs waiting, in creation order
#   parked   HASH token -> message: jobs waiting without a worker slot, to publish again
#   seq      the last ticket or fence given (both strictly increase per lock); it expires
#            59 to 60 minutes after its last use, and starts again above the server time
#            in µs
#   arrival  ZSET token -> deadline: line entries whose job is not parked: on its way to a
#            worker (deadline: its queueing_lock_timeout) or received by one, which
#            renews it a lease ahead while it holds the message (``ARRIVE``)
#   ran      ZSET "token:retries" -> until (ms): runs that ended on a worker, kept for a
#            while (the worker says how long) so that a late copy of one of them (a job
#            published again during an outage, a parked copy woken meanwhile) is dropped
#            instead of running again; it expires with its last entry
# Times are the server's (TIME), so workers' clocks never matter.
#
# The liveness bound: an entry whose worker died is not renewed and is given up within a
# lease. An entry still on its way while a job created after it has reached a worker
# (its message lost, its worker dead before receiving it) has one lease from then on.
#
# A parked message (``wire.ParkedMessage``/``ParkedSignature``) is either a Celery
# signature to publish again or, on the atomic path, kombu's own message
# ("\x01queue\nmessage"), which a wake pushes onto its queue inside the script when that
# queue is KEYS[7]: the calling job's own queue, where jobs of one lock usually come from.

# Shared by the execution lock's scripts. KEYS[1..6]: the lock's keys (above); KEYS[7]
# (single server only): the calling job's queue, or KEYS[1] again for none (a key the
# store's user may reach: an ACL checks every key a script names, '' included).
_LOCK_HEAD = """
local KH, KW, KP, KS, KE, KR = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local KQ = KEYS[7]
if KQ == KH then KQ = '' end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

_NEXT_SEQ_FUNCTION = """
-- The next ticket or fence: above the last one, and above the time in µs, so that it still
-- increases after the counter expired with the lock unused. The counter is given an hour
-- to live when written; within a minute of that, it is written in place (INCRBY: no new
-- value, no new TTL), which costs the server under half as much (1.2 µs against 2.9).
local function next_seq()
  local last = redis.call('GET', KS)
  local value = math.max(tonumber(last or '0') + 1, now * 1000)
  if last and redis.call('PTTL', KS) > 3540000 then
    redis.call('INCRBY', KS, string.format('%d', value - tonumber(last)))
  else
    redis.call('SET', KS, string.format('%d', value), 'PX', 3600000)
  end
  return value
end
"""

# The runs a lock remembers (``ran``): expired ones pruned, the key kept as long as its
# longest entry. ``ask``: a rate limit's start remembers its ask too (``run#ask``).
_REMEMBER_FUNCTION = """
local function remember(run, keep, ask)
  local ttl = redis.call('PTTL', KR)
  if ttl > 0 and redis.call('ZREMRANGEBYSCORE', KR, '-inf', now) > 0 then
    ttl = redis.call('PTTL', KR)  -- gone with its last entry
  end
  if ask then
    redis.call('ZADD', KR, now + keep, run, now + keep, run .. '#' .. ask)
  else
    redis.call('ZADD', KR, now + keep, run)
  end
  if ttl < keep then redis.call('PEXPIRE', KR, keep) end
end
"""

# The functions every lock script may call. A script's common case runs before them where
# it can: a script run makes each function anew (a closure), about a µs of server time.
_LOCK_FUNCTIONS = """
-- Holders whose lease ran out (a killed worker) are gone; one handed the lock that never
-- started (its new message was lost) goes back to the front of the line.
local function expire()
  local gone = redis.call('ZRANGEBYSCORE', KH, '-inf', now)
  for _, t in ipairs(gone) do
    redis.call('ZREM', KH, t)
    if redis.call('HEXISTS', KP, t) == 1 then redis.call('ZADD', KW, 0, t) end
  end
  return gone
end

-- Places given up by front() in this script (counted for the sweep's reply).
local dropped = 0

-- The first n entries of the line, without the ones that never reached a worker in time.
local function front(n)
  while true do
    local entries = redis.call('ZRANGE', KW, 0, n - 1)
    local clean = true
    for _, t in ipairs(entries) do
      local deadline = redis.call('ZSCORE', KE, t)
      if deadline and tonumber(deadline) < now then
        redis.call('ZREM', KW, t)
        redis.call('ZREM', KE, t)
        redis.call('HDEL', KP, t)
        dropped = dropped + 1
        clean = false
      end
    end
    if clean then return entries end
  end
end

-- A parked kombu message for KQ is kept in bodies to push ('' left for the caller), under a
-- fresh delivery tag: a message pushed twice must not share kombu's unacked entry.
local function push(t, message, bodies)
  if string.byte(message, 1) ~= 1 or not KQ or KQ == '' then return message end
  local nl = string.find(message, '\\n', 2, true)
  if string.sub(message, 2, nl - 1) ~= KQ then return message end
  local mark = '"' .. t .. '.cu"'
  local i, j = string.find(message, mark, nl, true)
  local body = string.sub(message, nl + 1)
  if i then
    body = string.sub(message, nl + 1, i - 1) .. '"' .. t .. '.' .. now .. '"' ..
      string.sub(message, j + 1)
  end
  bodies[#bodies + 1] = body
  return ''
end

-- Hands free places to parked jobs at the front of the line, appending {token, message}
-- pairs to out (message '' when pushed here); stops at a job still on its way to a
-- worker (it takes its place there).
local function wake(limit, lease, out)
  local free = limit - redis.call('ZCARD', KH)
  local bodies = {}
  while free > 0 do
    local t = front(1)[1]
    if not t then break end
    local message = redis.call('HGET', KP, t)
    if not message then
      -- The first is on its way to a worker while jobs behind it wait parked (they
      -- reached one): it has one lease from now, as arrived() gives the front.
      local deadline = redis.call('ZSCORE', KE, t)
      if deadline and tonumber(deadline) > now + lease and redis.call('HLEN', KP) > 0 then
        redis.call('ZADD', KE, now + lease, t)
      end
      break
    end
    redis.call('ZREM', KW, t)
    redis.call('ZADD', KH, now + lease, t)
    -- A rate limit's holders expire with their newest start (ACQUIRE_LOCK): this one.
    if redis.call('PTTL', KH) > 0 then redis.call('PEXPIRE', KH, lease) end
    out[#out + 1] = t
    out[#out + 1] = push(t, message, bodies)
    free = free - 1
  end
  -- At the head of its queue (kombu pops from the right): they have waited their turn in
  -- line already, and must not wait again behind messages sent after them; the front of
  -- the line pushed last, popped first.
  for i = #bodies, 1, -1 do redis.call('RPUSH', KQ, bodies[i]) end
  return out
end

local function holder()
  return redis.call('ZRANGE', KH, 0, 0)[1] or ''
end

-- Jobs received by a worker: their entries (not parked) are kept one lease ahead, and the
-- entries created before the first of them that are still on their way get one lease.
local function arrived(tokens, lease)
  local first = nil
  for _, t in ipairs(tokens) do
    if redis.call('ZSCORE', KE, t) then
      redis.call('ZADD', KE, now + lease, t)
      local rank = redis.call('ZRANK', KW, t)
      if rank and (not first or rank < first) then first = rank end
    end
  end
  if first and first > 0 then
    -- Only the front of the line is looked at (it is what blocks): a job arriving behind
    -- thousands (a rate limit's backlog) costs no more than one behind a few. Deeper
    -- entries are cut when they reach the front (wake).
    for _, e in ipairs(redis.call('ZRANGE', KW, 0, math.min(first, 64) - 1)) do
      local deadline = redis.call('ZSCORE', KE, e)
      if deadline and tonumber(deadline) > now + lease then
        redis.call('ZADD', KE, now + lease, e)
      end
    end
  end
end
"""

#: The head and the functions of every execution lock script (:data:`Scripts.ACQUIRE_LOCK`
#: and :data:`Scripts.RELEASE_LOCK` run their common case between the two).
LOCK_PRELUDE = _LOCK_HEAD + _NEXT_SEQ_FUNCTION + _LOCK_FUNCTIONS


class Scripts:
    """One typed method per Lua script, each beside its script; methods are one round
    trip each. :class:`~celery_unique.store.Store` is this with the app's client."""

    def __init__(self, client: Any, url: str) -> None:
        self.client, self.url = client, url
        #: A Redis Cluster client: no script touches keys of two hash slots.
        self.cluster = isinstance(client, RedisCluster)
        register = client.register_script
        self._acquire_queueing = register(self.ACQUIRE_QUEUEING_LOCK)
        self._peek_queueing = register(self.PEEK_QUEUEING_LOCK)
        self._published = register(self.PUBLISHED)
        #: Scripts whose reply may be left unread (``_send_deferred``): those read once.
        self._deferrable: set[str] = set()
        self._release_queueing = register(self.RELEASE_QUEUEING_LOCK)
        self._restore_queueing = register(self.RESTORE_QUEUEING_LOCK)
        self._started = register(self.STARTED)
        self._burst = register(self.BURST)
        self._lock_held = register(self.LOCK_HELD)
        self._push = register(self.PUSH_WITH_LOCKS)  # run on kombu's client, not ours
        self._enter_line = register(self.ENTER_LINE)
        self._acquire_lock = register(self.ACQUIRE_LOCK)
        self._park = register(self.PARK)
        self._release_lock = register(self.RELEASE_LOCK)
        self._arrive = register(self.ARRIVE)
        self._extend = register(self.EXTEND_LOCK)
        self._sweep = register(self.SWEEP_LOCK)
        self._read_locks = register(self.READ_LOCKS)
        # Sending ahead needs a connection of our own from the pool, which a
        # single-connection client does not lend.
        pool = None if getattr(client, "connection", None) else getattr(
            client, "connection_pool", None)
        # redis-py < 5.1 requires a command name that later versions deprecate.
        self._pool_args: tuple[str, ...] = ()
        if pool is not None:
            param = inspect.signature(pool.get_connection).parameters.get("command_name")
            if param is not None and param.default is inspect.Parameter.empty:
                self._pool_args = ("EVALSHA",)
        #: Sending ahead takes its connections here.
        self.conns = None if pool is None else ThreadConnections(pool, self._pool_args)

    # -- the queueing lock ------------------------------------------------------------

    #: KEYS[1]: the queueing lock's key; KEYS[2], KEYS[3] (when ARGV[3] or ARGV[4] is set):
    #: its publishing mark (:func:`publishing_key`) and its replaced jobs
    #: (:func:`replaced_key`). ARGV[1]: the owner's token (the job's task id); ARGV[2]: the
    #: lease in milliseconds; ARGV[3]: '1' to set the publishing mark with the same lease
    #: (the lock is not published yet); ARGV[4]: to replace a holder that has not started
    #: (``on_duplicate="replace"``), '1', or '?' when this job is published after (its
    #: replacement is confirmed by :data:`PUBLISHED`); ARGV[5]: the job's execution lock's
    #: limit, to refuse the job while that many jobs hold it (``lock_check_at_enqueue``:
    #: KEYS[4], its holders).
    #: Returns nil when taken, or already held by this owner (its lease is renewed: a retry
    #: re-takes its own lock); ``{replaced holder, its PTTL, 'r'}`` when taken from a holder
    #: it replaced; ``{a running holder, its lease left, 'l'}`` when the execution lock is
    #: held; else ``{holder's token, holder's PTTL in ms}``. (nil is the cheapest reply to
    #: parse, and acceptance is the hot path.)
    ACQUIRE_QUEUEING_LOCK = _TAKE_QUEUEING_FUNCTION + _LOCK_HELD_FUNCTION + """
    if ARGV[5] and ARGV[5] ~= '' then
      local held = lock_held(KEYS[4], tonumber(ARGV[5]))
      if held then return held end
    end
    local replace = ARGV[4] and ARGV[4] ~= '' and KEYS[3]
    local out = take_queueing(KEYS[1], replace, ARGV[1], ARGV[2],
                              ARGV[4] == '?' and '?' .. ARGV[1] or ARGV[1])
    if out and not out[3] then return out end
    if ARGV[3] == '1' then redis.call('SET', KEYS[2], '1', 'PX', ARGV[2]) end
    return out
    """

    def acquire_queueing_lock(self, key: str, token: str, ttl_ms: int, *,
                              replace: str = "", lock_check: Lock | None = None) -> Taken:
        """Take ``key`` for ``token`` (:data:`ACQUIRE_QUEUEING_LOCK`); ``replace``: from a
        holder that has not started, which is then replaced (``"1"``), or will be once
        this job is published (``"?"``, :meth:`published`); ``lock_check``: not while
        this execution lock is held."""
        return self.send_acquire_queueing_lock(key, token, ttl_ms, now=True, replace=replace,
                                               lock_check=lock_check).result()

    def send_acquire_queueing_lock(self, key: str, token: str, ttl_ms: int, *,
                                   now: bool = False, publishing: bool = False,
                                   replace: str = "", lock_check: Lock | None = None
                                   ) -> Pending[Taken]:
        """:meth:`acquire_queueing_lock` sent now, its reply read later (``now``: read).
        ``publishing``: marked as not published yet, until :meth:`published`."""
        if publishing or replace or lock_check is not None:
            args = ([key, publishing_key(key), replaced_key(key)],
                    [token, ttl_ms, "1" if publishing else "", replace])
            if lock_check is not None:  # a single server: its keys are in any slot
                args[0].append(lock_keys(lock_check.base)[0])
                args[1].append(lock_check.limit)
        else:  # the hot path
            args = [key], [token, ttl_ms]
        if now:
            pending = Pending(self._call, self._acquire_queueing, *args, _taken(token, ttl_ms))
            pending.result()
            return pending
        return send(self.conns, self._call, self._acquire_queueing, *args,
                    _taken(token, ttl_ms))

    #: A job taken from a holder it replaced, and then not published (off the atomic
    #: path): the holder gets its lock back and is no longer replaced. KEYS: the queueing
    #: lock's key, its publishing mark, its replaced jobs. ARGV: the token that took it,
    #: the holder's token, the holder's lease left (ms). Returns 1 when given back, 0 when
    #: the key is no longer the token's.
    RESTORE_QUEUEING_LOCK = """
    if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
    redis.call('DEL', KEYS[2])
    local mark = redis.call('HGET', KEYS[3], ARGV[2])
    if mark == ARGV[1] or mark == '?' .. ARGV[1] then redis.call('HDEL', KEYS[3], ARGV[2]) end
    redis.call('SET', KEYS[1], ARGV[2], 'PX', math.max(tonumber(ARGV[3]), 1))
    return 1
    """

    def restore_queueing_lock(self, key: str, token: str, holder: str, pttl_ms: int) -> bool:
        """:data:`RESTORE_QUEUEING_LOCK`: give ``key`` back to the ``holder`` that ``token``
        replaced."""
        return bool(self._run(self._restore_queueing,
                              [key, publishing_key(key), replaced_key(key)],
                              [token, holder, pttl_ms]))

    #: A job that may be replaced starts (its lock, if any, taken). KEYS: its queueing
    #: lock's key, publishing mark and replaced jobs. ARGV: the token; ``until``
    #: ("started": the queueing lock is released; "finished": its holder is marked as
    #: started, and no longer replaced).
    #: Returns ``{replacer's token}`` when the job was replaced (it must not run; its
    #: entry is removed), else 1 when the lock was released, else 0. A replacer not
    #: published yet (``"?"``) does not replace it: it runs, and says so.
    STARTED = """
    local token = ARGV[1]
    local by = redis.call('HGET', KEYS[3], token)
    if by and by ~= '' and string.sub(by, 1, 1) ~= '?' then
      redis.call('HDEL', KEYS[3], token)
      return {by}
    end
    if by then redis.call('HSET', KEYS[3], token, '') end
    if redis.call('GET', KEYS[1]) ~= token then return 0 end
    if ARGV[2] == 'started' then
      redis.call('DEL', KEYS[2])
      redis.call('HDEL', KEYS[3], '""" + BURST_FIELD + """')
      return redis.call('DEL', KEYS[1])
    end
    redis.call('HSET', KEYS[3], '""" + STARTED_FIELD + """', token)
    local keep = math.max(redis.call('PTTL', KEYS[3]), redis.call('PTTL', KEYS[1]))
    redis.call('PEXPIRE', KEYS[3], keep)
    return 0
    """

    def started(self, key: str, token: str, until: str) -> Started:
        """:data:`STARTED`: whether the job ``token`` holding ``key`` was replaced; if not,
        its queueing lock released (``until="started"``) or marked as started."""
        reply = self._run(self._started, [key, publishing_key(key), replaced_key(key)],
                          [token, until])
        if isinstance(reply, list):
            return Started(text(reply[0]), False)
        return Started("", bool(reply))

    #: A debounced call asks how long its key's burst of calls has lasted. KEYS: the
    #: queueing lock's key, its replaced jobs. ARGV: the call's lease (ms), which the hash
    #: is kept at least. Returns the ms since the burst's first call; 0 when the key is
    #: free: this call begins a burst (its start is written, server clock).
    BURST = """
    local clock = redis.call('TIME')
    local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
    local first = redis.call('EXISTS', KEYS[1]) == 1 and
                  redis.call('HGET', KEYS[2], '""" + BURST_FIELD + """')
    if first then return now - tonumber(first) end
    redis.call('HSET', KEYS[2], '""" + BURST_FIELD + """', now)
    redis.call('PEXPIRE', KEYS[2], math.max(redis.call('PTTL', KEYS[2]), tonumber(ARGV[1])))
    return 0
    """

    def burst(self, key: str, lease_ms: int) -> int:
        """:data:`BURST`: ms since the first call of the burst on ``key`` (0: it begins)."""
        return int(self._run(self._burst, [key, replaced_key(key)], [lease_ms]))

    #: A message off the atomic path was published: the short leases of its locks become
    #: full ones. KEYS: the queueing lock's key and its publishing mark (removed) when
    #: ARGV[2] is set, then the lock's arrival key when ARGV[3] is given and set. ARGV: the
    #: owner's token; the queueing lock's full lease (ms) or ''; the deadline its place in
    #: line was given (ENTER_LINE's, as the server wrote it); the place's full wait (ms).
    #: Only that exact deadline is replaced: a worker that received the job meanwhile
    #: keeps its own mark. ARGV[5] (optional): the job it took the queueing lock from, to
    #: replace now unless it started meanwhile; KEYS' last: the queueing lock's replaced
    #: jobs. Returns 1 when the queueing lock's lease was set (0: it is gone or another
    #: owner's), plus 2 when the place's was, plus 4 when the job was replaced.
    PUBLISHED = """
    local token, k, out = ARGV[1], 1, 0
    if ARGV[2] ~= '' then
      if redis.call('GET', KEYS[1]) == token then
        redis.call('DEL', KEYS[2])
        out = redis.call('PEXPIRE', KEYS[1], ARGV[2])
      end
      k = 3
    end
    if ARGV[3] and ARGV[3] ~= '' and redis.call('ZSCORE', KEYS[k], token) == ARGV[3] then
      local clock = redis.call('TIME')
      local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
      redis.call('ZADD', KEYS[k], now + tonumber(ARGV[4]), token)
      out = out + 2
    end
    if ARGV[5] and redis.call('HGET', KEYS[#KEYS], ARGV[5]) == '?' .. token then
      redis.call('HSET', KEYS[#KEYS], ARGV[5], token)
      out = out + 4
    end
    return out
    """

    def published(self, token: str, key: str | None = None, ttl_ms: int = 0,
                  place: tuple[str, Place] | None = None, wait_ms: int = 0,
                  replacing: tuple[str, str] | None = None) -> Extended:
        """:data:`PUBLISHED`: give ``token``'s queueing lock ``key`` a lease of ``ttl_ms``
        from now, and its place (``(lock base, the place ENTER_LINE gave)``) a wait of
        ``wait_ms``, where each still holds its short one; ``replacing``: ``(queueing
        key, token)`` of the job it took the lock from, replaced now unless it started."""
        return self.send_published(token, key, ttl_ms, place, wait_ms, replacing).result()

    def send_published(self, token: str, key: str | None = None, ttl_ms: int = 0,
                       place: tuple[str, Place] | None = None, wait_ms: int = 0,
                       replacing: tuple[str, str] | None = None, *,
                       defer: bool = False) -> Pending[Extended]:
        """:meth:`published` sent now. ``defer``: its reply is read at this thread's next
        command, not waited for (a lock lost meanwhile is then only logged: the caller has
        moved on)."""
        keys: list[str] = [] if key is None else [key, publishing_key(key)]
        args: list[Any] = [token, "" if key is None else ttl_ms]
        if place is not None:  # on every enqueue of a job in line: nothing more than this
            keys.append(line_keys(place[0])[2])
            args += [place[1].deadline, wait_ms]
        if replacing is not None:
            keys.append(replaced_key(replacing[0]))
            args += [*["", ""][:4 - len(args)], replacing[1]]

        def parse(reply: Any) -> Extended:
            extended = Extended(bool(reply & 1), bool(reply & 2), bool(reply & 4))
            if defer and key is not None and not extended.queueing:
                logger.warning("celery-unique: the queueing lock %s of %s could not be"
                               " given its full lease (it ended, or another job holds it)",
                               key, token)
            return extended

        return self._send_deferred(self._published, keys, args, parse, defer)

    def _send_deferred(self, script: Any, keys: list[str], args: list[Any],
                       parse: Callable[[Any], T], defer: bool) -> Pending[T]:
        """``script`` sent now; ``defer``: its reply read at this thread's next command."""
        # Read at once the first time, and after the server forgot its scripts: a script it
        # does not know would wait, unread, for the thread's next command to be run
        # (redis-py loads it on NOSCRIPT).
        conns = self.conns
        defer = defer and script.sha in self._deferrable and not (
            conns is not None and conns.scripts_lost)
        pending = send(conns, self._call, script, keys, args, parse)
        if not (defer and conns is not None and pending._conn is not None
                and conns.defer(pending)):
            pending.result()
            self._deferrable.add(script.sha)
            if conns is not None:
                conns.scripts_lost = False
        return pending

    #: KEYS[1]: a queueing lock's key. ARGV[1]: the asking job's token. Reads only: returns
    #: nil when the key is free (or held by this token), else ``{holder, PTTL}``. A hint for
    #: keys found held moments ago; the push script decides.
    PEEK_QUEUEING_LOCK = """
    local holder = redis.call('GET', KEYS[1])
    if (not holder) or holder == ARGV[1] then return false end
    return {holder, redis.call('PTTL', KEYS[1])}
    """

    def send_peek_queueing_lock(self, key: str, token: str) -> Pending[Taken]:
        """:data:`PEEK_QUEUEING_LOCK` sent now; its reply parses as an acquire's."""
        return send(self.conns, self._call, self._peek_queueing, [key], [token],
                    _taken(token, 0))

    #: KEYS[1]: a lock's key; KEYS[2]: its publishing mark; KEYS[3] (optional): its
    #: replaced jobs, where the owner's mark as started is removed. ARGV[1]: the owner's
    #: token. Returns 1 when deleted, 0 when the key is gone or held by another owner (whose
    #: lock is left alone: a job whose lease expired never deletes its successor's lock).
    RELEASE_QUEUEING_LOCK = """
    if redis.call('GET', KEYS[1]) == ARGV[1] then
      redis.call('DEL', KEYS[2])
      if KEYS[3] and redis.call('HGET', KEYS[3], '""" + STARTED_FIELD + """') == ARGV[1] then
        redis.call('HDEL', KEYS[3], '""" + STARTED_FIELD + """')
      end
      return redis.call('DEL', KEYS[1])
    end
    return 0
    """

    def release(self, key: str, token: str, *, replaceable: bool = False) -> bool:
        """Delete the queueing lock ``key`` if ``token`` holds it (``replaceable``: and its
        mark as started, :meth:`started`)."""
        keys = [key, publishing_key(key)]
        if replaceable:
            keys.append(replaced_key(key))
        return bool(self._run(self._release_queueing, keys, [token]))

    def release_quietly(self, key: str, token: str, why: str, *, replaceable: bool = False
                        ) -> bool | None:
        """:meth:`release`, logging instead of raising: for paths that must not fail a job.
        Returns whether ``token`` held it; None when the store could not be reached."""
        try:
            return self.release(key, token, replaceable=replaceable)
        except Exception:
            logger.exception("celery-unique: could not release %s (%s) for %s", key, why,
                             token)
            return None

    #: The atomic enqueue (a Redis broker whose server and database hold the locks): the
    #: message is pushed where kombu would push it, with its locks, or not at all.
    #: KEYS, in this order, each group only when its ARGV is set: the queue's list (kombu's
    #: key, its priority included); the execution lock's holders (ARGV[6]); the queueing
    #: lock's key (ARGV[3]) and its replaced jobs (ARGV[5]); the line's line, seq and
    #: arrival keys (ARGV[4]); the line's holders and parked keys and the sweepers'
    #: registry (ARGV[7]). ARGV[1]: the message as kombu would push it; ARGV[2]: the
    #: owner's token (the job's task id); ARGV[3]: the queueing lock's lease in ms, or '';
    #: ARGV[4]: the ms the job may take to reach a worker before its place in line is
    #: given up, or ''; ARGV[5]: '1' to replace a holder that has not started
    #: (``on_duplicate="replace"``), or ''; ARGV[6]: the execution lock's limit, to push
    #: nothing while that many jobs hold it (``lock_check_at_enqueue``), or ''; ARGV[7]
    #: to ARGV[10]: the line's limit, lease (ms), registry entry and the parked message's
    #: head (``wire.ParkedMessage``, the message following it), to park the job at once
    #: when it would wait for its turn (a rate limit's line), or ''. Trailing empty ones
    #: may be left out.
    #: Returns nil when pushed (the queueing lock taken, or already held by this owner, as
    #: ACQUIRE_QUEUEING_LOCK), ``{replaced holder, its PTTL, 'r'}`` when pushed after taking
    #: the lock from a holder it replaced, ``{replaced holder or '', its PTTL or 0, 'r' or
    #: '', 'p'}`` when parked instead of pushed, else ``{holder's token, holder's PTTL}``
    #: (or ACQUIRE_QUEUEING_LOCK's ``'l'`` reply) and nothing is written.
    PUSH_WITH_LOCKS = (_ENTER_LINE_FUNCTION + _TAKE_QUEUEING_FUNCTION + _LOCK_HELD_FUNCTION
                       + _PARK_AT_ENQUEUE_FUNCTION + """
    local token, n, out = ARGV[2], 2, false
    if ARGV[6] and ARGV[6] ~= '' then
      local held = lock_held(KEYS[n], tonumber(ARGV[6]))
      if held then return held end
      n = n + 1
    end
    if ARGV[3] ~= '' then
      local replace = ARGV[5] == '1'
      out = take_queueing(KEYS[n], replace and KEYS[n + 1], token, ARGV[3], token)
      if out and not out[3] then return out end
      n = n + (replace and 2 or 1)
    end
    if ARGV[4] and ARGV[4] ~= '' then
      local _, now = enter_line(KEYS[n], KEYS[n + 1], KEYS[n + 2], token, ARGV[4])
      if ARGV[7] and park_at_enqueue(KEYS[n], KEYS[n + 2], KEYS[n + 3], KEYS[n + 4],
                                     KEYS[n + 5], token, tonumber(ARGV[7]),
                                     tonumber(ARGV[8]), ARGV[9], ARGV[10] .. ARGV[1],
                                     now) then
        return {out and out[1] or '', out and out[2] or 0, out and 'r' or '', 'p'}
      end
    end
    redis.call('LPUSH', KEYS[1], ARGV[1])
    return out
    """)

    def push_with_locks(self, client: Any, owner: Any, *, queue: str, message: str,
                        token: str, queueing_key: str | None, ttl_ms: int,
                        line: Lock | None, replace: bool = False,
                        lock_check: Lock | None = None, park_in: str | None = None) -> Taken:
        """Push ``message`` onto kombu's ``queue`` with its locks (:data:`PUSH_WITH_LOCKS`),
        on kombu's ``client`` (the broker's server, which is ours); ``owner`` keeps the
        connection between calls (see :func:`run_on`). ``line``: the lock whose line the
        job enters; ``replace``: take the queueing lock from a holder that has not
        started, which is then replaced; ``lock_check``: push nothing while this lock is
        held; ``park_in``: the sweepers' registry, to park the job in its line at once
        (its message carrying :meth:`ParkedMessage.captured_tag`) when it would wait for
        its turn there (:attr:`Taken.parked`)."""
        keys, args = [queue], [message, token, "", "", "", "", "", "", ""]
        if lock_check is not None:
            keys.append(lock_keys(lock_check.base)[0])
            args[5] = str(lock_check.limit)
        if queueing_key:
            keys.append(queueing_key)
            args[2] = str(ttl_ms)
            if replace:
                keys.append(replaced_key(queueing_key))
                args[4] = "1"
        if line is not None:
            keys.extend(line_keys(line.base))
            args[3] = str(line.wait_ms)
            if park_in is not None:
                holders, _, parked, *_ = lock_keys(line.base)
                keys += [holders, parked, park_in]
                args[6:] = [str(line.limit), str(line.lease_ms),
                            RegistryEntry(line.limit, line.lease_ms, line.base).member(),
                            ParkedMessage(queue, "").encode()]
        while len(args) > 3 and not args[-1]:  # the script reads a missing one as ''
            args.pop()
        reply = run_on(client, self._pool_args, self._push, keys, args, owner)
        if reply is None:  # the hot path: no parser to build
            return Taken(True, token, ttl_ms)
        return _taken(token, ttl_ms)(reply)

    #: At enqueue, a job takes its place in its lock's line ("order"): creation order.
    #: KEYS: the lock's line, seq and arrival keys. ARGV: token, ms it may take to reach a
    #: worker (then its place is given up). Returns its ticket.
    #: A job's place in line, taken before its message is published (off the atomic
    #: path). KEYS: the lock's line, seq and arrival keys. ARGV: token, ms it may take to
    #: reach a worker. Returns {its ticket, the deadline set for it, as the server wrote it}.
    ENTER_LINE = _ENTER_LINE_FUNCTION + """
    local ticket = enter_line(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
    return {ticket, redis.call('ZSCORE', KEYS[3], ARGV[1])}
    """

    def enter_line(self, base: str, token: str, wait_ms: int) -> Place:
        """Take ``token``'s place in the line of ``base`` (:data:`ENTER_LINE`)."""
        return self.send_enter_line(base, token, wait_ms).result()

    def send_enter_line(self, base: str, token: str, wait_ms: int) -> Pending[Place]:
        """:meth:`enter_line` sent now, its reply read later."""
        return send(self.conns, self._call, self._enter_line, line_keys(base),
                    [token, wait_ms], _place)

    def take_locks(self, token: str, queueing_key: str | None, ttl_ms: int,
                   line: Lock | None, replace: str = "", lock_check: Lock | None = None
                   ) -> Taken:
        """The locks of a message kombu pushes itself: the queueing lock (if any), then,
        when it was taken, the place in ``line`` (two round trips)."""
        taken = Taken(True, token, ttl_ms)
        if queueing_key and not (self.cluster and lock_check is not None):
            taken = self.acquire_queueing_lock(queueing_key, token, ttl_ms, replace=replace,
                                               lock_check=lock_check)
        elif lock_check is not None:
            taken = self.send_lock_held(lock_check, token).result()
            if taken.taken and queueing_key:
                taken = self.acquire_queueing_lock(queueing_key, token, ttl_ms,
                                                   replace=replace)
        if taken.taken and line is not None:
            self.enter_line(line.base, token, line.wait_ms)
        return taken

    def reserve(self, token: str, queueing_key: str | None, ttl_ms: int, line: Lock | None,
                *, publish_ms: int = 0, now: bool = False, replace: bool = False,
                lock_check: Lock | None = None) -> Reservation:
        """The locks of a message published after them, sent now (:class:`Reservation`)."""
        return Reservation(self, token, queueing_key, ttl_ms, line, publish_ms, now, replace,
                           lock_check)

    #: ``lock_check_at_enqueue`` on its own (no queueing lock, or a Cluster, where the
    #: execution lock's keys are in another slot). KEYS[1]: the lock's holders. ARGV[1]:
    #: its limit. Reads only: nil when a place is free, else ACQUIRE_QUEUEING_LOCK's
    #: ``'l'`` reply.
    LOCK_HELD = _LOCK_HELD_FUNCTION + """
    return lock_held(KEYS[1], tonumber(ARGV[1]))
    """

    def send_lock_held(self, lock: Lock, token: str) -> Pending[Taken]:
        """:data:`LOCK_HELD` sent now; its reply parses as a queueing lock's."""
        return send(self.conns, self._call, self._lock_held, [lock_keys(lock.base)[0]],
                    [lock.limit], _taken(token, 0))

    #: A job at a worker asks for its lock. KEYS: the prelude's; KEYS[8] (single server,
    #: optional): the job's queueing lock, released when the lock is taken.
    #: ARGV: token, limit, lease ms, on_locked ("order", "retry" or "skip"), wait ms (unused:
    #: a job that asked keeps its place a lease ahead while it asks), '1' when this process
    #: asks again after losing the reply to its own ask, the run's "token:retries" (''
    #: in eager mode), and, for a rate limit's start (its holders never released: their
    #: key expires with the newest), how long (ms) the run is remembered as started and a
    #: token of this ask (its repeat, after a lost reply, is granted again, not dropped as
    #: a copy).
    #: Returns {1, fence, ms since a release or sweep handed it the lock, or -1 when it took
    #: it itself} when taken (or already handed to this job); {2, token, -1} when
    #: another copy of this job holds it (see below); {3, token, -1} when this run of the job
    #: has ended already (a late copy: it is dropped); else {0, a holder's token, place in
    #: line or -1, woken...}; woken: {token, message} pairs of parked jobs handed the lock,
    #: for the caller to publish again (:class:`Grant`, :class:`LockReply`).
    ACQUIRE_LOCK = _LOCK_HEAD + _NEXT_SEQ_FUNCTION + _REMEMBER_FUNCTION + """
    local token, limit, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
    local order = ARGV[4] == 'order'
    -- The common case, before the functions are made: nobody holds the lock or is parked
    -- for it, this run has not ended already, and the job is first in line ("order") or
    -- has no line.
    if not ARGV[8] and limit > 0 and redis.call('EXISTS', KH, KP) == 0
        and not (ARGV[7] and ARGV[7] ~= '' and redis.call('ZSCORE', KR, ARGV[7])) then
      if not order or redis.call('ZRANGE', KW, 0, 0)[1] == token then
        if order then
          redis.call('ZREM', KW, token)
          redis.call('ZREM', KE, token)
        end
        redis.call('ZADD', KH, now + lease, token)
        if KEYS[8] and redis.call('GET', KEYS[8]) == token then redis.call('DEL', KEYS[8]) end
        -- Its fence is the next one given, never its ticket: a fence is above the time
        -- of its grant, so that after a failover that lost a grant, a later grant on the
        -- promoted replica still has the higher fence.
        return {1, next_seq(), -1}
      end
    end
    """ + _LOCK_FUNCTIONS + """
    local function grant(handed)
      if order then  -- only "order" jobs have a place, an arrival mark or a message here
        redis.call('ZREM', KW, token)
        redis.call('ZREM', KE, token)
        redis.call('HDEL', KP, token)
      end
      redis.call('ZADD', KH, now + lease, token)
      if ARGV[8] then
        -- A rate limit's start: its holders expire with the newest; the run is
        -- remembered, so that a copy of its message (a parked job handed a start again
        -- when its first copy came late) is dropped instead of starting again; and so
        -- is this ask (run#ask), so that its own repeat is not taken for a copy.
        redis.call('PEXPIRE', KH, lease)
        if ARGV[7] ~= '' then remember(ARGV[7], tonumber(ARGV[8]), ARGV[9]) end
      end
      if KEYS[8] and redis.call('GET', KEYS[8]) == token then redis.call('DEL', KEYS[8]) end
      return {1, next_seq(), handed}
    end
    if ARGV[7] and ARGV[7] ~= '' then
      local until_ms = redis.call('ZSCORE', KR, ARGV[7])
      if until_ms and tonumber(until_ms) > now then
        -- This very ask, run again because its reply was lost (a connection error, then
        -- a fallback or a client's retry): the start it was granted is its own.
        if ARGV[9] and redis.call('ZSCORE', KR, ARGV[7] .. '#' .. ARGV[9]) then
          return grant(-1)
        end
        return {3, token, -1}
      end
    end
    -- Holders, those whose lease ran out gone (none to look for when there is none).
    local held = redis.call('ZCARD', KH)
    if held > 0 then held = held - #expire() end
    local deadline = held > 0 and redis.call('ZSCORE', KH, token)
    if deadline then
      -- Its own when it was handed the lock (its parked message is still here: handed a
      -- lease ago, less what is left) or when this process took it before losing the
      -- reply. Else a copy of the job holds it (the broker gave a message back, a job was
      -- published again during an outage): never beside it.
      if redis.call('HEXISTS', KP, token) == 1 then
        return grant(now - (tonumber(deadline) - lease))
      end
      if ARGV[6] == '1' then return grant(-1) end
      return {2, token, -1}
    end
    local free = limit - held
    if not order then
      if free > 0 then return grant(-1) end
      return {0, holder(), -1}
    end
    -- The common case: its place (taken at enqueue) is the first, and a place is free.
    if free > 0 and redis.call('ZRANGE', KW, 0, 0)[1] == token then return grant(-1) end
    if not redis.call('ZSCORE', KW, token) then
      redis.call('ZADD', KW, next_seq(), token)
    end
    -- At a worker now (it parks next, or asks again in eager mode): its place is kept a
    -- lease ahead before the front is looked at, which gives up only the places of jobs
    -- still on their way (its own deadline may have passed while it was away: a worker
    -- that died, a message the broker gave back late).
    redis.call('ZADD', KE, now + lease, token)
    if free > 0 then
      for _, t in ipairs(front(free)) do
        if t == token then return grant(-1) end
      end
    end
    arrived({token}, lease)
    return wake(limit, lease, {0, holder(), redis.call('ZRANK', KW, token)})
    """

    def acquire_lock(self, base: str, *, token: str, limit: int, lease_ms: int, mode: str,
                     wait_ms: int, asks_again: bool = False, run: str = "",
                     queueing_key: str | None = None, queue: str | None = None,
                     rate: bool = False) -> LockReply:
        """A job at a worker asks for the lock ``base`` (:data:`ACQUIRE_LOCK`).

        ``asks_again``: this process lost the reply to its own ask; ``run``: the run's id
        (``wire.run_id``), '' in eager mode; ``queueing_key``: the job's queueing lock,
        released when the lock is taken; ``queue``: the job's queue, where parked kombu
        messages woken are pushed; ``rate``: a rate limit's start (never released; ``run``
        is remembered as started: a late copy gets :attr:`Grant.RAN`).
        """
        keys = self._lock_keys(base, queue, queueing_key)
        args: list[Any] = [token, limit, lease_ms, mode, wait_ms, "1" if asks_again else "0",
                           run]
        if rate:
            # As long as a lock's runs (lock.py); and this ask, told from its repeat.
            args += [max(60_000, 2 * lease_ms), os.urandom(6).hex()]
        reply = _lock_reply(self._run(self._acquire_lock, keys, args))
        if queueing_key and self.cluster and reply.grant is Grant.TAKEN:
            # On a cluster the two keys live in different slots, which one script may not
            # touch: one more round trip, still owner-checked. The lock is taken by now,
            # so a failure here is logged, and the queueing lock's lease runs out.
            self.release_quietly(queueing_key, token, "lock taken")
        return reply

    #: A waiting job leaves its message and its worker slot. KEYS: the prelude's; KEYS[8]
    #: (single server): the sweepers' registry. ARGV: token, limit, lease ms, message, the
    #: lock's registry entry (``wire.RegistryEntry.member``). Returns {0, a holder's token,
    #: place in line, woken...}; a place freed since the job asked is handed to the front of
    #: the line, this job included, at once.
    PARK = LOCK_PRELUDE + _PARK_FUNCTION + """
    local token, limit, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
    expire()
    if not redis.call('ZSCORE', KW, token) then
      redis.call('ZADD', KW, next_seq(), token)
    end
    keep_parked(KE, KP, KH, KEYS[8], token, ARGV[4], ARGV[5], now, lease)
    return wake(limit, lease, {0, holder(), redis.call('ZRANK', KW, token) or -1})
    """

    def park(self, base: str, *, token: str, limit: int, lease_ms: int, message: str,
             queue: str | None = None, registry: str | None = None) -> LockReply:
        """Keep the waiting job's ``message`` in line (:data:`PARK`), registering the lock
        for the sweepers in ``registry`` (not on a Cluster: see :meth:`register`)."""
        keys = self._lock_keys(base, queue, registry)
        entry = RegistryEntry(limit, lease_ms, base).member()
        return _lock_reply(self._run(self._park, keys, [token, limit, lease_ms, message,
                                                        entry]))

    #: A job ends, or leaves the line (revoked, expired, its publish failed). KEYS: the
    #: prelude's. ARGV: token, limit, lease ms; for a run that ended on a worker, its
    #: "token:retries" and how long (ms) to remember it ran. Returns {1 if it held the lock,
    #: 2 if it held it until its lease ran out (found now), else 0, woken...}.
    RELEASE_LOCK = _LOCK_HEAD + _REMEMBER_FUNCTION + """
    local token, limit, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
    local held = 0
    local deadline = redis.call('ZSCORE', KH, token)
    if deadline then
      redis.call('ZREM', KH, token)
      held = tonumber(deadline) > now and 1 or 2  -- 2: its lease ran out first
    end
    if ARGV[4] and ARGV[4] ~= '' then remember(ARGV[4], tonumber(ARGV[5])) end
    -- The common case, before the functions are made: nobody else holds the lock, waits
    -- in line, is parked or on the way to take a place it was handed.
    if redis.call('EXISTS', KH, KW, KP, KE) == 0 then return {held} end
    """ + _LOCK_FUNCTIONS + """
    -- A holder may have a place too: a copy of it published under its id (the broker
    -- gave a message back, an outage); it goes with it.
    redis.call('ZREM', KW, token)
    redis.call('ZREM', KE, token)
    redis.call('HDEL', KP, token)
    if redis.call('ZCARD', KH) > 0 then expire() end
    return wake(limit, lease, {held})
    """

    def release_lock(self, base: str, *, token: str, limit: int, lease_ms: int,
                     queue: str | None = None, ran: str = "", remember_ms: int = 0
                     ) -> Released:
        """The job ``token`` ends or leaves the line (:data:`RELEASE_LOCK`). ``ran``: the
        run that ended on a worker, remembered ``remember_ms`` so a late copy is dropped."""
        args: list[Any] = [token, limit, lease_ms]
        if ran:
            args += [ran, remember_ms]
        reply = self._run(self._release_lock, self._lock_keys(base, queue), args)
        return Released(reply[0] == 1, _woken(reply[1:]), reply[0] == 2)

    #: From the worker holding received messages not yet started. KEYS: the prelude's.
    #: ARGV: lease ms, tokens. Returns 0.
    ARRIVE = LOCK_PRELUDE + """
    local tokens = {}
    for i = 2, #ARGV do tokens[#tokens + 1] = ARGV[i] end
    arrived(tokens, tonumber(ARGV[1]))
    return 0
    """

    def arrive(self, base: str, *, lease_ms: int, tokens: list[str]) -> None:
        """Keep the places of jobs a worker holds a lease ahead (:data:`ARRIVE`)."""
        self._run(self._arrive, lock_keys(base), [lease_ms, *tokens])

    def arrive_many(self, marks: list[tuple[str, int, list[str]]]) -> None:
        """:meth:`arrive` for ``(base, lease_ms, tokens)`` of several locks in one round
        trip (a pipeline; on a Cluster, whose locks span nodes, one call each). A script
        the server lost is loaded and run again alone."""
        if self.cluster or len(marks) < 2:
            for base, lease_ms, tokens in marks:
                self.arrive(base, lease_ms=lease_ms, tokens=tokens)
            return
        pipe = self.client.pipeline(transaction=False)
        for base, lease_ms, tokens in marks:
            keys = lock_keys(base)
            pipe.execute_command("EVALSHA", self._arrive.sha, len(keys), *keys, lease_ms,
                                 *tokens)
        try:
            replies = pipe.execute(raise_on_error=False)
        except UNAVAILABLE_ERRORS as exc:
            raise self._unavailable(exc) from exc
        for (base, lease_ms, tokens), reply in zip(marks, replies):
            if isinstance(reply, redis.ResponseError):  # NOSCRIPT: restarted or flushed
                self.arrive(base, lease_ms=lease_ms, tokens=tokens)

    #: KEYS: the prelude's. ARGV: token, lease ms. Returns 1 when the lease was renewed, 0
    #: when it was lost.
    EXTEND_LOCK = LOCK_PRELUDE + """
    if redis.call('ZSCORE', KH, ARGV[1]) then
      redis.call('ZADD', KH, 'XX', now + tonumber(ARGV[2]), ARGV[1])
      return 1
    end
    return 0
    """

    def extend(self, base: str, *, token: str, lease_ms: int) -> bool:
        """Renew ``token``'s lease (:data:`EXTEND_LOCK`); False when it was lost."""
        return bool(self._run(self._extend, lock_keys(base), [token, lease_ms]))

    #: Periodic, from the workers that use locks: hands places freed by expired leases to
    #: parked jobs. KEYS: the prelude's; KEYS[8] (single server, optional): the sweepers'
    #: registry, where the lock is rescheduled (or unregistered) in the same script. ARGV:
    #: limit, lease ms, the lock's registry entry (with KEYS[8]). Returns {ms until the next
    #: check or -1 when none is needed, leases found run out, places given up, woken...}.
    SWEEP_LOCK = LOCK_PRELUDE + """
    local limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
    local out = {-1, #expire(), 0}
    wake(limit, lease, out)
    out[3] = dropped
    if redis.call('HLEN', KP) > 0 then
      local next_at = nil
      local first = redis.call('ZRANGE', KH, 0, 0, 'WITHSCORES')
      if first[2] then next_at = tonumber(first[2]) end
      local arrival = redis.call('ZRANGE', KE, 0, 0, 'WITHSCORES')
      if arrival[2] and (not next_at or tonumber(arrival[2]) < next_at) then
        next_at = tonumber(arrival[2])
      end
      out[1] = math.max(0, (next_at or now + lease) - now)
    end
    if KEYS[8] then
      if out[1] < 0 then
        redis.call('ZREM', KEYS[8], ARGV[3])
      else  -- not sooner than 50 ms: a lock due at once is not swept in a loop
        redis.call('ZADD', KEYS[8], now + math.max(out[1], 50), ARGV[3])
      end
    end
    return out
    """

    def sweep_lock(self, base: str, *, limit: int, lease_ms: int,
                   registry: str | None = None) -> Swept:
        """Hand places freed by expired leases to parked jobs (:data:`SWEEP_LOCK`);
        ``registry``: reschedule the lock there in the same script (not on a Cluster,
        where it is in another slot: :meth:`Store.reschedule`)."""
        args: list[Any] = [limit, lease_ms]
        if registry is not None:
            args.append(RegistryEntry(limit, lease_ms, base).member())
        reply = self._run(self._sweep, self._lock_keys(base, None, registry), args)
        return Swept(int(reply[0]), int(reply[1]), int(reply[2]), _woken(reply[3:]))

    #: The operator's listing (``celery_unique.admin``): a page of locks of both kinds read in
    #: one command. KEYS: per queueing lock its key and its publishing mark; per execution
    #: lock its holders, line and seq keys. ARGV[1]: one letter per lock, in KEYS' order:
    #: ``q`` a queueing lock, ``h`` a lock found by its holders key, ``l`` one found by its
    #: line (skipped when it has holders: the scan lists it by those). Returns one string,
    #: the server time in ms, then a line per lock, ``holder NUL PTTL NUL publishing
    #: (0/1)`` (queueing) or ``waiting NUL seq NUL token NUL deadline...`` (lock), empty for
    #: a lock gone or skipped: one reply to parse, not a nested array.
    READ_LOCKS = """
    local clock = redis.call('TIME')
    local nul = string.char(0)
    local out = {tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)}
    local k = 1
    for i = 1, #ARGV[1] do
      local kind = string.sub(ARGV[1], i, i)
      if kind == 'q' then
        local holder = redis.call('GET', KEYS[k])
        out[#out + 1] = holder and (holder .. nul .. redis.call('PTTL', KEYS[k]) .. nul ..
          redis.call('EXISTS', KEYS[k + 1])) or ''
        k = k + 2
      else
        local held = redis.call('ZRANGE', KEYS[k], 0, -1, 'WITHSCORES')
        local waiting = redis.call('ZCARD', KEYS[k + 1])
        if (kind == 'l' and #held > 0) or (#held == 0 and waiting == 0) then
          out[#out + 1] = ''
        else
          out[#out + 1] = waiting .. nul .. (redis.call('GET', KEYS[k + 2]) or '') ..
            (#held > 0 and (nul .. table.concat(held, nul)) or '')
        end
        k = k + 3
      end
    end
    return table.concat(out, string.char(10))
    """

    def read_locks(self, entries: list[tuple[str, str]]) -> tuple[int, list[list[str] | None]]:
        """The locks ``entries`` name (``(letter, key)``, :data:`READ_LOCKS`' letters) in
        one command: the server time (ms) and a row per lock (None: gone, or listed by its
        holders)."""
        keys = [k for letter, key in entries for k in read_keys(letter, key)]
        reply = text(self._run(self._read_locks, keys, ["".join(e[0] for e in entries)]))
        first, *lines = reply.split("\n")
        return int(first), [line.split("\0") if line else None for line in lines]

    def _lock_keys(self, base: str, queue: str | None, extra: str | None = None
                   ) -> list[str]:
        # KEYS[7] and KEYS[8] live in other hash slots: never on a Cluster.
        keys = lock_keys(base)
        if not self.cluster:
            keys.append(queue or keys[0])  # KEYS[1] again: no queue (LOCK_PRELUDE)
            if extra:
                keys.append(extra)
        return keys

    def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run ``script`` and return its raw reply: on the thread's kept connection (a
        client call costs about as much again as the script's own round trip: a pool
        checkout with its health check, the retry wrapper), else through the client."""
        if self.conns is None:
            return self._call(script, keys, args)
        return send(self.conns, self._call, script, keys, args, _raw).result()

    def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run ``script`` through the client: its checkout, its retries, redis-py loading
        the script on NOSCRIPT. The fallback of every command sent on a kept connection."""
        try:
            return script(keys=keys, args=args, client=self.client)
        except UNAVAILABLE_ERRORS as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> LockStoreUnavailable:
        return LockStoreUnavailable(
            f"cannot reach the lock store at {safe_url(self.url)}: {exc}",
            url=safe_url(self.url))


class Pending(Generic[T]):
    """A script whose command is sent now and whose reply is read later.

    The round trip then overlaps whatever the caller does in between (Celery building
    its message). :meth:`result` reads the reply once; a connection error, or a script
    the server does not know yet, falls back to the synchronous call. Every script is
    safe to repeat that way (as through redis-py's own retries): each is idempotent, or
    tells its repeat from its first run and errs on the safe side (``ACQUIRE_LOCK`` takes
    a repeat for a copy of the job, which waits one lease and never runs beside it; for
    a rate limit's start, the ask carries a token of its own, and its repeat is granted
    the start the first run took).
    """

    __slots__ = ("_args", "_conn", "_conns", "_keys", "_parse", "_reply", "_run", "_script")

    def __init__(self, run: Run, script: Any, keys: list[str], args: list[Any],
                 parse: Callable[[Any], T]) -> None:
        self._run, self._script, self._keys, self._args = run, script, keys, args
        self._parse = parse
        #: The connection the command was sent on, and where it goes back (:func:`send`).
        self._conn: Any = None
        self._conns: Any = None
        self._reply: Any = _UNREAD

    def result(self) -> T:
        """The parsed reply."""
        if self._reply is not _UNREAD:
            return cast(T, self._reply)
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                reply = conn.read_response()
            except redis.ResponseError as exc:  # NOSCRIPT: restarted or flushed
                self._conns.scripts_lost = True
                self._conns.give_back(conn)
                reload(self._script, exc)
            except BaseException as exc:
                # A broken connection must not be used again with a reply unread.
                conn.disconnect()
                self._conns.give_back(conn)
                if not isinstance(exc, Exception):
                    raise
            else:
                self._conns.give_back(conn)
                self._reply = parsed = self._parse(reply)
                return parsed
        self._reply = parsed = self._parse(self._run(self._script, self._keys, self._args))
        return parsed

    def abandon(self) -> Any:
        """Give up the reply unread: the connection it would come on, or None."""
        conn, self._conn = self._conn, None
        return conn

    def settle(self) -> T | None:
        """Read the reply if still unread; None when it cannot be read. Never raises."""
        if self._reply is _UNREAD and self._conn is None:
            return None  # reading it failed, and the caller has been told
        try:
            return self.result()
        except Exception:
            logger.exception("celery-unique: could not read the reply for %s", self._keys)
            return None


_UNREAD = object()


def send(conns: ThreadConnections | None, run: Run, script: Any, keys: list[str],
         args: list[Any], parse: Callable[[Any], T]) -> Pending[T]:
    """Send ``script`` now on a connection of its own; :meth:`Pending.result` reads it."""
    pending = Pending(run, script, keys, args, parse)
    if conns is None:
        pending.result()
        return pending
    try:
        conn = conns.take()
    except CONNECTION_ERRORS:
        pending.result()
        return pending
    try:
        _send_evalsha(conn, script.sha, keys, args)
    except Exception:
        # A stale connection (the server restarted): the client's own retry decides.
        conn.disconnect()
        conns.give_back(conn)
        pending.result()
        return pending
    pending._conn, pending._conns = conn, conns
    return pending


def reload(script: Any, exc: Exception, client: Any = None) -> None:
    """After ``NOSCRIPT`` (a restarted, flushed or failed-over server), load ``script``
    before the client's call runs it again, which would otherwise be refused once more
    first. Any other error is left to that call."""
    if isinstance(exc, redis.exceptions.NoScriptError):
        with contextlib.suppress(Exception):
            (client or script.registered_client).script_load(script.script)


def _send_evalsha(conn: Any, sha: str, keys: list[str], args: list[Any]) -> None:
    """Send ``EVALSHA`` on ``conn``, packed here when :func:`pack_evalsha` can."""
    packed = pack_evalsha(conn.encoder, sha, keys, args)
    if packed is None:
        conn.send_command("EVALSHA", sha, len(keys), *keys, *args)
    else:
        conn.send_packed_command([packed])  # a list of chunks, as redis-py packs


def pack_evalsha(encoder: Any, sha: str, keys: list[str], args: list[Any]) -> bytes | None:
    """``EVALSHA`` in RESP, as redis-py's packer writes it for a connection encoding in
    strict UTF-8, in a third of its time (it is on every enqueue's and job's path); None
    for any other encoding or argument type: redis-py packs those."""
    if encoder.encoding != "utf-8" or encoder.encoding_errors != "strict":
        return None
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%s\r\n" % (
        3 + len(keys) + len(args), len(sha), sha.encode())]
    count = str(len(keys)).encode()
    parts.append(b"$%d\r\n%s\r\n" % (len(count), count))
    for value in (*keys, *args):
        kind = type(value)
        data = value.encode() if kind is str else b"%d" % value if kind is int else (
            value if kind is bytes else None)
        if data is None:
            return None
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def run_on(client: Any, pool_args: tuple[str, ...], script: Any, keys: list[str],
           args: list[Any], owner: Any = None) -> Any:
    """Run ``script`` on another client's server (kombu's, for the broker hook).

    The command goes straight onto one of the client's pooled connections: a client
    call costs more than the lock's own work. ``owner``, an object used by one thread
    at a time (kombu's channel, lent by Celery's producer pool), keeps the connection
    between calls: checking one out costs a health check. Never a thread: kombu's
    channel lends 10 connections, to every thread that publishes on it. Anything but
    a clean reply goes through the client's own call, with its retries (a script
    repeated is safe).
    """
    pool = client.connection_pool
    conn = unkeep(owner, pool)
    try:
        if conn is None:
            conn = pool.get_connection(*pool_args)
    except CONNECTION_ERRORS:
        return script(keys=keys, args=args, client=client)
    try:
        _send_evalsha(conn, script.sha, keys, args)
        reply = conn.read_response()
    except redis.ResponseError as exc:  # NOSCRIPT: the server restarted or was flushed
        keep(owner, pool, conn)
        reload(script, exc, client)
        return script(keys=keys, args=args, client=client)
    except BaseException as exc:
        conn.disconnect()  # a reply may be left unread: never used again as it is
        pool.release(conn)
        if isinstance(exc, CONNECTION_ERRORS):  # a stale connection: the client retries
            return script(keys=keys, args=args, client=client)
        raise
    keep(owner, pool, conn)
    return reply


# -- a reply read where Celery first needs the message -----------------------------------

class Reservation:
    """One message's locks off the atomic path, taken before it is published: the
    queueing lock sent at once, on the short ``publish_ms`` lease until :meth:`published`
    (a caller dying in between leaves a lock that frees itself soon); the place in
    ``line`` sent once the queueing lock is taken (:meth:`check`), or at once when the job
    has no queueing lock (and then read by :meth:`check`), on the same short lease (a
    place whose message never comes is given up as soon); both given up by
    :meth:`undo` when the message is not published. The replies are read where Celery
    first needs the message (:class:`GatedRouter`, :class:`GatedProducer`), so the round
    trip overlaps its building; ``now``: read at once (eager mode: no router, no
    producer)."""

    __slots__ = ("_asked", "_entered", "_held", "_line", "_publish_ms", "_scripts", "_sent",
                 "key", "place_short", "replaced", "short", "token", "ttl_ms")

    def __init__(self, scripts: Scripts, token: str, key: str | None, ttl_ms: int,
                 line: Lock | None, publish_ms: int, now: bool, replace: bool = False,
                 lock_check: Lock | None = None) -> None:
        self._scripts, self.token, self.key, self.ttl_ms, self._line = (
            scripts, token, key, ttl_ms, line)
        #: On the short lease until :meth:`published` (unless the full one is shorter).
        self.short = key is not None and 0 < publish_ms < ttl_ms and not now
        #: The place in line likewise, until then (its full wait: its way to a worker).
        self.place_short = line is not None and 0 < publish_ms < line.wait_ms and not now
        self._publish_ms = publish_ms
        self._entered: Pending[Place] | None = None
        #: The job this one replaced, once published (``replace``: the job it took the
        #: queueing lock from is replaced when this one is published, unless it started).
        self.replaced = ""
        self._asked = False  # whether the replacement was asked for
        #: ``lock_check_at_enqueue`` in a command of its own, read first (where the
        #: queueing lock's script cannot check it: no queueing lock, or a Cluster).
        alone = lock_check is not None and (key is None or scripts.cluster)
        self._held = scripts.send_lock_held(lock_check, token) if (
            alone and lock_check is not None) else None
        self._sent = None if key is None else scripts.send_acquire_queueing_lock(
            key, token, publish_ms if self.short else ttl_ms, now=now, publishing=self.short,
            replace="?" if replace else "", lock_check=None if alone else lock_check)
        if key is None:
            self._enter()

    def check(self) -> None:
        """Read the queueing lock's reply, raise :class:`Duplicate` when it is held, then
        send the place in line (once)."""
        held = self._held.result() if self._held is not None else None
        if held is not None and not held.taken:
            self.undo()  # the queueing lock taken beside it (a Cluster)
            held.check()
        if self._sent is not None:
            self._sent.result().check()
        if self._entered is None:
            self._enter()
        elif self.key is None:
            # A place in line is this job's only lock: it is taken before the message
            # goes (a store outage raises here, as for a queueing lock).
            self._entered.result()

    def _enter(self) -> None:
        line = self._line
        if line is not None:
            self._entered = self._scripts.send_enter_line(
                line.base, self.token, self._publish_ms if self.place_short else line.wait_ms)

    @property
    def _replacing(self) -> str:
        """The job it took the queueing lock from, to replace once published."""
        reply = self._sent.settle() if self._sent is not None and not self._asked else None
        return reply.replaced if reply is not None else ""

    @property
    def pending(self) -> bool:
        """Whether a short lease, or a replacement, waits for :meth:`published`."""
        return self.short or self.place_short or bool(self._replacing)

    def published(self) -> None:
        """The broker has the message (with publisher confirms, has confirmed it): the
        short leases become full ones, once, in one command (two on a Cluster, whose keys
        are in two slots). Sent, not waited for: its reply is read at the thread's next
        command (a lock lost meanwhile is logged); with a job to replace, read now (the
        caller stores the replaced job's result)."""
        replacing = self._replacing
        if replacing and self.key is not None:
            self._replace(self.key, replacing)
            return
        if not self.place_short:  # the common case: the queueing lock alone, or nothing
            if self.short and self.key is not None:
                self.short = False
                self._extend(self.key, None)
            return
        key = self.key if self.short else None
        entered = self._entered.settle() if self._entered is not None else None
        self.short = self.place_short = False
        line = self._line
        place = None if line is None or entered is None else (line.base, entered)
        if key is not None or place is not None:
            self._extend(key, place)

    def _extend(self, key: str | None, place: tuple[str, Place] | None) -> None:
        try:
            scripts, line = self._scripts, self._line
            if scripts.cluster and key is not None and place is not None:
                scripts.published(self.token, key, self.ttl_ms)  # its own slot: read now
                key = None
            scripts.send_published(self.token, key, self.ttl_ms, place,
                                   line.wait_ms if line is not None else 0, defer=True)
        except Exception:
            # Published, so not an error for the caller; but the key may take a duplicate
            # once the short lease ends, and the place be given up.
            logger.exception(
                "celery-unique: %s was published, but its locks could not be given their full"
                " lease: they end within unique_publish_lease", self.token)

    def _replace(self, key: str, replacing: str) -> None:
        """:meth:`published` for a job that took the queueing lock from ``replacing``."""
        line, short, self._asked = self._line, self.short, True
        entered = self._entered.settle() if self._entered is not None else None
        place = None if line is None or entered is None or not self.place_short else (
            line.base, entered)
        self.short = self.place_short = False
        wait_ms = line.wait_ms if line is not None else 0
        scripts = self._scripts
        try:
            if scripts.cluster and place is not None:  # its own slot
                scripts.published(self.token, place=place, wait_ms=wait_ms)
                place = None
            extended = scripts.published(self.token, key if short else None, self.ttl_ms,
                                         place, wait_ms, (key, replacing))
        except Exception:
            logger.exception("celery-unique: %s was published, but %s could not be replaced:"
                             " both may run", self.token, replacing)
            return
        if extended.replaced:
            self.replaced = replacing

    def undo(self) -> list[Woken]:
        """Give up the locks of a message that was not published: the parked jobs handed
        the lock meanwhile, for the caller to publish (never raises)."""
        self.short = False
        sent, entered, line = self._sent, self._entered, self._line
        taken = sent.settle() if sent is not None else None
        if taken is not None and taken.replaced:
            # The job it replaced gets its lock back, and runs.
            try:
                self._scripts.restore_queueing_lock(self.key or "", self.token,
                                                    taken.replaced, taken.replaced_pttl_ms)
            except Exception:
                logger.exception("celery-unique: could not give %s back to %s", self.key,
                                 taken.replaced)
        elif taken is not None and taken.taken:
            self._scripts.release_quietly(self.key or "", self.token, "publish failed")
        if entered is None or line is None:
            return []
        entered.settle()
        try:
            return self._scripts.release_lock(line.base, token=self.token, limit=line.limit,
                                              lease_ms=line.lease_ms).woken
        except Exception:
            logger.exception("celery-unique: could not release %s for %s", line.base,
                             self.token)
            return []

    def settle(self) -> None:
        """Read every reply still unread; never raises."""
        for pending in (self._sent, self._entered):
            if pending is not None:
                pending.settle()


class GatedRouter:
    """The router Celery gets for one message: routing, the first thing Celery does with
    a message, first runs ``check`` (:meth:`Reservation.check`: waits for the locks' reply
    and stops the message on a duplicate)."""

    __slots__ = ("_check", "_router")

    def __init__(self, router: Any, check: Callable[[], object]) -> None:
        self._router, self._check = router, check

    def route(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self._router.route(*args, **kwargs)


class GatedProducer:
    """The producer Celery gets: its first use (``P.connection``, right after Celery has
    built the message) waits for the locks' reply and stops the publish on a duplicate
    (:meth:`Reservation.check`); right after kombu's publish returns (before Celery's
    ``after_task_publish``), the locks are told it was published."""

    __slots__ = ("_checked", "_locks", "_producer")

    def __init__(self, producer: Any, locks: Reservation) -> None:
        self._producer, self._locks, self._checked = producer, locks, False

    def __getattr__(self, name: str) -> Any:
        locks = self._locks
        if not self._checked:
            self._checked = True
            locks.check()
        value = getattr(self._producer, name)
        if name == "publish" and locks.pending:
            return self._publish_then(value)
        return value

    def _publish_then(self, publish: Callable[..., Any]) -> Callable[..., Any]:
        def published(*args: Any, **kwargs: Any) -> Any:
            result = publish(*args, **kwargs)
            self._locks.published()
            return result
        return published


def publishing_key(key: str) -> str:
    """The mark of a queueing lock taken and not yet published (the separate path): the
    lock's key and a suffix, so the same hash slot, and never listed as a lock itself."""
    return f"{key}:publishing"


def replaced_key(key: str) -> str:
    """The jobs of the queueing lock ``key`` replaced and not started yet (a HASH, see
    :data:`STARTED_FIELD`): the same hash slot, never listed as a lock."""
    return f"{key}:replaced"


def read_keys(letter: str, key: str) -> list[str]:
    if letter == "q":
        return [key, publishing_key(key)]
    holders, line, _, seq, *_ = lock_keys(key)
    return [holders, line, seq]
