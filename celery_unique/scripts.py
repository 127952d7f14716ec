"""The Lua scripts that touch Redis, each a named constant headed by its KEYS, ARGV and
reply, and the key lists they take.

Each check-then-write is one script run with EVALSHA (redis-py loads it on the first
NOSCRIPT), every key goes through ``KEYS`` (Redis Cluster), TTLs are in milliseconds and
every lock's value is its owner's token (the job's task id). :mod:`celery_unique.store`
runs them.
"""

from __future__ import annotations

__all__ = ["ACQUIRE_QUEUEING_LOCK", "ENTER_LINE", "LOCK_SCRIPTS", "PEEK_QUEUEING_LOCK",
           "PUSH_WITH_LOCKS", "READ_LOCKS", "RELEASE_LOCK", "line_keys", "lock_keys"]

#: KEYS[1]: the queueing lock's key.
#: ARGV[1]: the owner's token (the job's task id); ARGV[2]: the lease in milliseconds.
#: Returns nil when taken, or already held by this owner (its lease is renewed: a retry
#: re-takes its own lock); else ``{holder's token, holder's PTTL in ms}``. (nil is the
#: cheapest reply to parse, and acceptance is the hot path.)
ACQUIRE_QUEUEING_LOCK = """
local holder = redis.call('GET', KEYS[1])
if (not holder) or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return false
end
return {holder, redis.call('PTTL', KEYS[1])}
"""

#: KEYS[1]: a lock's key. ARGV[1]: the owner's token.
#: Returns 1 when deleted, 0 when the key is gone or held by another owner (whose lock is
#: left alone: a job whose lease expired never deletes its successor's lock).
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# A job takes its place in a lock's line: its ticket, above the last one and the time in
# µs (see next_seq below). Returns the ticket.
_ENTER_LINE_FUNCTION = """
local function enter_line(line, seq, arrival, token, wait_ms)
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  local ticket = math.max(tonumber(redis.call('GET', seq) or '0') + 1, now * 1000)
  redis.call('SET', seq, string.format('%d', ticket), 'PX', 3600000)
  redis.call('ZADD', line, 'NX', ticket, token)
  redis.call('ZADD', arrival, now + tonumber(wait_ms), token)
  return ticket
end
"""

#: The atomic enqueue (a Redis broker whose server and database hold the locks): the
#: message is pushed where kombu would push it, with its locks, or not at all.
#: KEYS[1]: the queue's list (kombu's key, its priority included); then the queueing
#: lock's key when ARGV[3] is set; then the lock's line, seq and arrival keys when ARGV[4]
#: is set. ARGV[1]: the message as kombu would push it; ARGV[2]: the owner's token (the
#: job's task id); ARGV[3]: the queueing lock's lease in ms, or ''; ARGV[4]: the ms the
#: job may take to reach a worker before its place in line is given up, or ''.
#: Returns nil when pushed (the queueing lock taken, or already held by this owner, as
#: ACQUIRE_QUEUEING_LOCK), else ``{holder's token, holder's PTTL}`` and nothing is written.
PUSH_WITH_LOCKS = _ENTER_LINE_FUNCTION + """
local token, n = ARGV[2], 1
if ARGV[3] ~= '' then
  local holder = redis.call('GET', KEYS[2])
  if holder and holder ~= token then return {holder, redis.call('PTTL', KEYS[2])} end
  redis.call('SET', KEYS[2], token, 'PX', ARGV[3])
  n = 2
end
if ARGV[4] ~= '' then enter_line(KEYS[n + 1], KEYS[n + 2], KEYS[n + 3], token, ARGV[4]) end
redis.call('LPUSH', KEYS[1], ARGV[1])
return false
"""

#: KEYS[1]: a queueing lock's key. ARGV[1]: the asking job's token. Reads only: returns
#: nil when the key is free (or held by this token), else ``{holder, PTTL}``. A hint for
#: keys found held moments ago; the push script decides.
PEEK_QUEUEING_LOCK = """
local holder = redis.call('GET', KEYS[1])
if (not holder) or holder == ARGV[1] then return false end
return {holder, redis.call('PTTL', KEYS[1])}
"""

#: The operator's listing (``celery_unique.admin``): a page of locks of both kinds read in
#: one command. KEYS: per queueing lock its key; per execution lock its holders, line and
#: seq keys. ARGV[1]: one letter per lock, in KEYS' order: ``q`` a queueing lock, ``h`` a
#: lock found by its holders key, ``l`` one found by its line (skipped when it has
#: holders: the scan lists it by those). Returns one string, the server time in ms, then a
#: line per lock, ``holder NUL PTTL`` (queueing) or ``waiting NUL seq NUL token NUL
#: deadline...`` (lock), empty for a lock gone or skipped: one reply to parse, not a
#: nested array.
READ_LOCKS = """
local clock = redis.call('TIME')
local nul = string.char(0)
local out = {tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)}
local k = 1
for i = 1, #ARGV[1] do
  local kind = string.sub(ARGV[1], i, i)
  if kind == 'q' then
    local holder = redis.call('GET', KEYS[k])
    out[#out + 1] = holder and (holder .. nul .. redis.call('PTTL', KEYS[k])) or ''
    k = k + 1
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

# -- the execution lock ------------------------------------------------------------------
#
# One lock is six keys sharing one hash tag (``lock_keys``):
#   holders  ZSET token -> lease deadline (ms, server time): the jobs running under it
#   line     ZSET token -> ticket: jobs waiting, in creation order
#   parked   HASH token -> message: jobs waiting without a worker slot, to publish again
#   seq      the last ticket or fence given (both strictly increase per lock); it expires
#            after an hour unused, and starts again above the server time in µs
#   arrival  ZSET token -> deadline: line entries whose job is not parked: on its way to a
#            worker (deadline: its queueing_lock_timeout) or received by one, which
#            renews it a lease ahead while it holds the message (``"arrive"``)
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
# A parked message is either a Celery signature to publish again ("content type\n
# encoding\ndata") or, on the atomic path, kombu's own message ("\x01queue\nmessage"),
# which a wake pushes onto its queue inside the script when that queue is KEYS[7]: the
# calling job's own queue, where jobs of one lock usually come from.

#: Shared by the execution lock's scripts. KEYS[1..6]: the lock's keys (above); KEYS[7]
#: (single server only, maybe ''): the calling job's queue.
LOCK_PRELUDE = """
local KH, KW, KP, KS, KE, KR = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local KQ = KEYS[7]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- Holders whose lease ran out (a killed worker) are gone; one handed the lock that never
-- started (its new message was lost) goes back to the front of the line.
local function expire()
  for _, t in ipairs(redis.call('ZRANGEBYSCORE', KH, '-inf', now)) do
    redis.call('ZREM', KH, t)
    if redis.call('HEXISTS', KP, t) == 1 then redis.call('ZADD', KW, 0, t) end
  end
end

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
        clean = false
      end
    end
    if clean then return entries end
  end
end

-- A parked kombu message for KQ is pushed now ('' left for the caller), under a fresh
-- delivery tag: a message pushed twice must not share kombu's unacked entry.
local function push(t, message)
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
  redis.call('LPUSH', KQ, body)
  return ''
end

-- Hands free places to parked jobs at the front of the line, appending {token, message}
-- pairs to out (message '' when pushed here); stops at a job still on its way to a
-- worker (it takes its place there).
local function wake(limit, lease, out)
  local free = limit - redis.call('ZCARD', KH)
  while free > 0 do
    local t = front(1)[1]
    if not t then break end
    local message = redis.call('HGET', KP, t)
    if not message then break end
    redis.call('ZREM', KW, t)
    redis.call('ZADD', KH, now + lease, t)
    out[#out + 1] = t
    out[#out + 1] = push(t, message)
    free = free - 1
  end
  return out
end

-- The next ticket or fence: above the last one, and above the time in µs, so that it still
-- increases after the counter expired with the lock unused.
local function next_seq()
  local value = math.max(tonumber(redis.call('GET', KS) or '0') + 1, now * 1000)
  redis.call('SET', KS, string.format('%d', value), 'PX', 3600000)
  return value
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
    for _, e in ipairs(redis.call('ZRANGE', KW, 0, first - 1)) do
      local deadline = redis.call('ZSCORE', KE, e)
      if deadline and tonumber(deadline) > now + lease then
        redis.call('ZADD', KE, now + lease, e)
      end
    end
  end
end
"""

#: The execution lock's scripts, each run after :data:`LOCK_PRELUDE`.
LOCK_SCRIPTS = {
    # KEYS[8] (optional): the job's queueing lock, released when the lock is taken.
    # ARGV: token, limit, lease ms, on_locked ("order", "retry" or "skip"), wait ms
    # (unused: a job that asked keeps its place a lease ahead while it asks), '1' when
    # this process asks again after losing the reply to its own ask, and the run's
    # "token:retries" ('' in eager mode).
    # Returns {1, fence, woken...} when taken (or already handed to this job); {2, token,
    # -1} when another copy of this job holds it (see below); {3, token, -1} when this run
    # of the job has ended already (a late copy: it is dropped); else {0, a holder's token,
    # place in line or -1, woken...}; woken: {token, message} pairs of parked jobs handed
    # the lock, for the caller to publish again.
    "acquire": """
local token, limit, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
expire()
local function grant()
  redis.call('ZREM', KW, token)
  redis.call('ZREM', KE, token)
  redis.call('HDEL', KP, token)
  redis.call('ZADD', KH, now + lease, token)
  if KEYS[8] and redis.call('GET', KEYS[8]) == token then redis.call('DEL', KEYS[8]) end
  return {1, next_seq()}
end
if ARGV[7] and ARGV[7] ~= '' then
  local until_ms = redis.call('ZSCORE', KR, ARGV[7])
  if until_ms and tonumber(until_ms) > now then return {3, token, -1} end
end
if redis.call('ZSCORE', KH, token) then
  -- Its own when it was handed the lock (its parked message is still here) or when this
  -- process took it before losing the reply. Else a copy of the job holds it (the broker
  -- gave a message back, a job was published again during an outage): never beside it.
  if ARGV[6] == '1' or redis.call('HEXISTS', KP, token) == 1 then return grant() end
  return {2, token, -1}
end
local free = limit - redis.call('ZCARD', KH)
if ARGV[4] ~= 'order' then
  if free > 0 then return grant() end
  return {0, holder(), -1}
end
if not redis.call('ZSCORE', KW, token) then
  redis.call('ZADD', KW, next_seq(), token)
end
if free > 0 then
  for _, t in ipairs(front(free)) do
    if t == token then return grant() end
  end
end
-- At a worker now (it parks next, or asks again in eager mode): a lease ahead.
redis.call('ZADD', KE, now + lease, token)
arrived({token}, lease)
return wake(limit, lease, {0, holder(), redis.call('ZRANK', KW, token)})
""",
    # A waiting job leaves its message and its worker slot. ARGV: token, limit, lease ms,
    # message, the lock's base. KEYS[8] (single server): the sweepers' registry. Returns
    # {0, a holder's token, place in line, woken...}; a place freed since the job asked is
    # handed to the front of the line, this job included, at once.
    "park": """
local token, limit, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
expire()
if not redis.call('ZSCORE', KW, token) then
  redis.call('ZADD', KW, next_seq(), token)
end
redis.call('ZREM', KE, token)
redis.call('HSET', KP, token, ARGV[4])
if KEYS[8] then
  -- Registered for the sweepers in the same script: a parked job is never left where
  -- no sweep looks, whatever fails after this.
  redis.call('ZADD', KEYS[8], now + lease, ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[5])
end
return wake(limit, lease, {0, holder(), redis.call('ZRANK', KW, token) or -1})
""",
    # A job ends, or leaves the line (revoked, expired, its publish failed).
    # ARGV: token, limit, lease ms; for a run that ended on a worker, its "token:retries"
    # and how long (ms) to remember it ran. Returns {1 if it held the lock else 0,
    # woken...}.
    "release": """
local token, limit, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
expire()
local held = redis.call('ZREM', KH, token)
redis.call('ZREM', KW, token)
redis.call('ZREM', KE, token)
redis.call('HDEL', KP, token)
if ARGV[4] and ARGV[4] ~= '' then
  local keep = tonumber(ARGV[5])
  redis.call('ZREMRANGEBYSCORE', KR, '-inf', now)
  redis.call('ZADD', KR, now + keep, ARGV[4])
  if redis.call('PTTL', KR) < keep then redis.call('PEXPIRE', KR, keep) end
end
return wake(limit, lease, {held})
""",
    # From the worker holding received messages not yet started: ARGV: lease ms, tokens.
    "arrive": """
local tokens = {}
for i = 2, #ARGV do tokens[#tokens + 1] = ARGV[i] end
arrived(tokens, tonumber(ARGV[1]))
return 0
""",
    # ARGV: token, lease ms. Returns 1 when the lease was renewed, 0 when it was lost.
    "extend": """
if redis.call('ZSCORE', KH, ARGV[1]) then
  redis.call('ZADD', KH, 'XX', now + tonumber(ARGV[2]), ARGV[1])
  return 1
end
return 0
""",
    # Periodic, from the workers that use locks: hands places freed by expired leases to
    # parked jobs.
    # ARGV: limit, lease ms. Returns {ms until the next check or -1 when none is needed,
    # woken...}.
    "sweep": """
local limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
expire()
local out = wake(limit, lease, {-1})
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
return out
""",
}

#: At enqueue, a job takes its place in its lock's line ("order"): creation order.
#: KEYS: the lock's line, seq and arrival keys. ARGV: token, ms it may take to reach a
#: worker (then its place is given up). Returns its ticket.
ENTER_LINE = _ENTER_LINE_FUNCTION + """
return enter_line(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
"""


def lock_keys(base: str) -> list[str]:
    """The keys of one execution lock, in the order :data:`LOCK_PRELUDE` names them."""
    return [f"{base}:{suffix}"
            for suffix in ("holders", "line", "parked", "seq", "arrival", "ran")]


def line_keys(base: str) -> list[str]:
    """The keys :data:`ENTER_LINE` takes: the lock's line, seq and arrival."""
    keys = lock_keys(base)
    return [keys[1], keys[3], keys[4]]
