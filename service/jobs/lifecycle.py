"""Every change of a job's state, each one atomic step in Redis: the one owner of the lifecycle.

    queued ──start──▶ running ──finish / fail──▶ succeeded | failed (| cancelled | expired)
      ▲ │                │ └──hop──▶ queued (on another model's stream)
      │ └─cancel/expire──┼──────────────────────▶ cancelled | expired
      └──────create      └──checkpoint (a round), update (fields), cancel (a request)

Each transition is one Lua script that writes the job's fields, keeps the queue in step
(the queued index, the expiry index, the job's stream entry) and appends the job's own
`status` event, and for an ending its `end` event, in the same step: no crash or lost
connection can leave a job ended without its `end`, or ended with its entry still queued.
The job records its stream entry (`queue`), so whoever ends it removes that entry.

An ending repeated on a job that already ended settles it again: its entry removed and,
when the event stream lacks it, the `end` re-sent from the stored status (a job ended by
a write whose follow-up was lost, or by an older version, is closed for good).

A worker is fenced by its id: `update`, `checkpoint`, `hop` and `finish` apply only while
it still owns the running job. Cancel and expire queue a `completed` webhook for the
workers to send (`Keys.webhook_outbox`), since no worker holds such a job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import redis.asyncio as redis
from pydantic import BaseModel
from redis import exceptions as redis_exceptions

from gcr.types import MODES, PRIORITIES, JobError, JobEvent, Round
from service.errors import QueueFull
from service.jobs.artifacts import ArtifactStore
from service.jobs.connection import translate_errors
from service.jobs.keys import CONSUMER_GROUP, Keys
from service.jobs.records import QueueEntry, StoredJob
from service.jobs.store import EVENTS_MAXLEN

if TYPE_CHECKING:
    from service.jobs.queue import Claim

# Queue position orders by priority first, then by submit time.
PRIORITY_RANK = {priority: rank for rank, priority in enumerate(PRIORITIES)}
ORDER_SPAN = 10**13  # above any creation time in ms: a score is rank * ORDER_SPAN + created ms
OUTBOX_MAXLEN = 10_000

Ending = Literal["ended", "already", "resent", "not_owner", "open", "missing"]

# Fields are JSON; statuses compare as JSON strings ('"queued"'). Ending scripts take
# KEYS: job, events, queued index, queued-since index, webhook outbox.
_LIB = """
local function decoded(job, name)
  local raw = redis.call('HGET', job, name)
  if not raw then return cjson.null end
  return cjson.decode(raw)
end
local function append(events, maxlen, job_id, now, kind, data)
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'event',
    cjson.encode({type = kind, job_id = job_id, at = tonumber(now), data = data}))
end
-- Running and still held by `worker`: the fence on every write a worker makes.
local function owned(job, worker)
  return redis.call('HGET', job, 'status') == '"running"' and redis.call('HGET', job, 'worker') == worker
end
-- Queue the job on `stream` and record where it waits (`records.QueueEntry`).
local function enqueue(job, stream, job_id, model, mode, priority, at)
  local entry = redis.call('XADD', stream, '*', 'job', job_id)
  redis.call('HSET', job, 'queue', cjson.encode({stream = stream, entry_id = entry, model = model,
             mode = mode, priority = priority, queued_at = tonumber(at)}))
end
local function leave_queue(job, queued, since, job_id, group)
  redis.call('ZREM', queued, job_id)
  redis.call('ZREM', since, job_id)
  local entry = decoded(job, 'queue')
  if entry ~= cjson.null then
    redis.call('XACK', entry.stream, group, entry.entry_id)
    redis.call('XDEL', entry.stream, entry.entry_id)
    redis.call('HSET', job, 'queue', 'null')
  end
end
local function ending(job)
  local data = {status = decoded(job, 'status'), stop_reason = decoded(job, 'stop_reason')}
  local err = decoded(job, 'error')
  if err ~= cjson.null then data.error = err end
  return data
end
-- The fields of the ending are written: leave the queue, append `status` and `end`, keep for the TTL.
local function close(job_id, now, ttl, maxlen, group, to_outbox)
  leave_queue(KEYS[1], KEYS[3], KEYS[4], job_id, group)
  local data = ending(KEYS[1])
  append(KEYS[2], maxlen, job_id, now, 'status', data)
  append(KEYS[2], maxlen, job_id, now, 'end', data)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[1], ttl)
  if to_outbox then
    local spec = decoded(KEYS[1], 'spec')
    if spec ~= cjson.null and spec.callback_url and spec.callback_url ~= cjson.null then
      redis.call('XADD', KEYS[5], 'MAXLEN', '~', OUTBOX_MAXLEN, '*', 'job', job_id)
    end
  end
end
-- A job that already ended: out of the queue for good, and its `end` re-sent if the stream lacks it
-- (a stream it makes, for a job ended by an older version or a lost write, expires as `close`'s do).
local function settle(job_id, now, ttl, maxlen, group)
  leave_queue(KEYS[1], KEYS[3], KEYS[4], job_id, group)
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if #last > 0 and cjson.decode(last[1][2][2]).type == 'end' then return 'already' end
  local data = ending(KEYS[1])
  append(KEYS[2], maxlen, job_id, now, 'status', data)
  append(KEYS[2], maxlen, job_id, now, 'end', data)
  if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], ttl) end
  return 'resent'
end
local function terminal(status)
  return status ~= '"queued"' and status ~= '"running"'
end
-- No worker will run the job (any more): expired, or succeeded with the best image it has.
local function end_unclaimed(job_id, now, ttl, maxlen, group, err)
  local best = redis.call('HGET', KEYS[1], 'best')
  local outcome = 'expired'
  if best and best ~= 'null' then outcome = 'succeeded' end
  redis.call('HSET', KEYS[1], 'status', cjson.encode(outcome), 'stop_reason', '"unclaimed"',
             'stage', 'null', 'finished_at', now, 'error', err)
  close(job_id, now, ttl, maxlen, group, true)
  return outcome
end
""".replace("OUTBOX_MAXLEN", str(OUTBOX_MAXLEN))

# ARGV: id, guard (owner: only its worker; any: whoever holds it; settle: only if it ended),
# worker, now, ttl, maxlen, group, field pairs...
_END = (
    _LIB
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if terminal(status) then return settle(ARGV[1], ARGV[4], ARGV[5], ARGV[6], ARGV[7]) end
if ARGV[2] == 'settle' then return 'open' end
if ARGV[2] == 'owner' and not owned(KEYS[1], ARGV[3]) then
  return 'not_owner'
end
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
close(ARGV[1], ARGV[4], ARGV[5], ARGV[6], ARGV[7], false)
return 'ended'
"""
)

# ARGV: id, now, ttl, maxlen, group
_CANCEL = (
    _LIB
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == '"queued"' then
  redis.call('HSET', KEYS[1], 'status', '"cancelled"', 'stop_reason', '"cancelled"',
             'finished_at', ARGV[2], 'cancel_requested', 'true', 'stage', 'null')
  close(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], true)
  return 'cancelled'
elseif status == '"running"' then
  redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
  return 'requested'
end
settle(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
return 'terminal'
"""
)

# A job still queued since before the cutoff ends as expired (stop reason `unclaimed`); one
# that has a best image (it waited to hop to another model) ends as succeeded with it.
# ARGV: id, cutoff, now, ttl, maxlen, group, error
_EXPIRE = (
    _LIB
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= '"queued"' then
  -- Running or ended: already out of the queued index. Its record expired while queued: an id
  -- left there would count against the queue cap for good.
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 'gone'
end
local since = redis.call('ZSCORE', KEYS[4], ARGV[1])
if since and tonumber(since) > tonumber(ARGV[2]) then return 'not_due' end
return end_unclaimed(ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
"""
)

# A running job whose stream entry nobody has held for ARGV[2] ms (its worker stopped, and
# no worker of its model took it over) ends like an unclaimed one: expired, or succeeded
# with the best image of the rounds it finished.
# ARGV: id, min idle ms, now, ttl, maxlen, group, error
_ORPHAN = (
    _LIB
    + """
if redis.call('HGET', KEYS[1], 'status') ~= '"running"' then return 'gone' end
local entry = decoded(KEYS[1], 'queue')
if entry == cjson.null then return 'gone' end
local idle = redis.call('XPENDING', entry.stream, ARGV[6], 'IDLE', ARGV[2], entry.entry_id, entry.entry_id, 1)
if #idle == 0 then return 'held' end
return end_unclaimed(ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
"""
)

# Admission and enqueue in one step, so concurrent submits cannot overshoot the queue cap.
# KEYS: job, queued index, all jobs, queue stream, the tenant's jobs, queued-since index.
# ARGV: cap (0: none), ttl, queue order, created_at, id, oldest kept, model, mode, priority, field pairs...
_CREATE = (
    _LIB
    + """
if tonumber(ARGV[1]) > 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
for i = 10, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
enqueue(KEYS[1], KEYS[4], ARGV[5], ARGV[7], ARGV[8], ARGV[9], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
redis.call('ZADD', KEYS[6], ARGV[4], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[6])
redis.call('EXPIRE', KEYS[5], ARGV[2])
return 1
"""
)

# KEYS: job, queued index, queued-since index, events, rounds.
# ARGV: id, worker, now, max attempts, count the attempt (1|0), ttl, maxlen
_START = (
    _LIB
    + """
-- Out of the queued indexes whatever follows (an id whose record expired included).
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', '0'} end
if terminal(status) then return {'terminal', '0'} end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if ARGV[5] == '1' then attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
if attempts > tonumber(ARGV[4]) then return {'exhausted', tostring(attempts)} end
redis.call('HSET', KEYS[1], 'status', '"running"', 'worker', ARGV[2])
if redis.call('HEXISTS', KEYS[1], 'started_at') == 0 then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[3])
end
local data = {status = 'running', attempt = attempts, resumed_rounds = redis.call('LLEN', KEYS[5])}
append(KEYS[4], ARGV[7], ARGV[1], ARGV[3], 'status', data)
redis.call('EXPIRE', KEYS[4], ARGV[6])
return {'ok', tostring(attempts)}
"""
)

# Hand a running job owned by ARGV[1] to another model's stream and let go of the entry
# this worker held, in one step: the job is queued on exactly one stream whatever crashes.
# A hop is progress, not a failed attempt: the next start's count is taken back here.
# KEYS: job, queued index, target stream, held stream, events, queued-since index.
# ARGV: worker, id, queue order, held entry, group, now, model, mode, priority, status event, maxlen
_HOP = (
    _LIB
    + """
if not owned(KEYS[1], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'status', '"queued"', 'stage', '"queued"', 'worker', 'null')
if tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') > 0 then
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[6], ARGV[6], ARGV[2])
enqueue(KEYS[1], KEYS[3], ARGV[2], ARGV[7], ARGV[8], ARGV[9], ARGV[6])
redis.call('XACK', KEYS[4], ARGV[5], ARGV[4])
redis.call('XDEL', KEYS[4], ARGV[4])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[11], '*', 'event', ARGV[10])
return 1
"""
)

# Apply field updates only while the job runs and is owned by ARGV[1].
_OWNED_SET = (
    _LIB
    + """
if not owned(KEYS[1], ARGV[1]) then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""
)

# Append round ARGV[2] at index ARGV[1] exactly once, if the job is still ours, with its event.
# KEYS: rounds, job, events. ARGV: index, round, worker, ttl, round event, maxlen, field pairs...
_CHECKPOINT = (
    _LIB
    + """
if not owned(KEYS[2], ARGV[3]) then return -1 end
local n = redis.call('LLEN', KEYS[1])
if n > tonumber(ARGV[1]) then return 0 end
if n < tonumber(ARGV[1]) then return -2 end
redis.call('RPUSH', KEYS[1], ARGV[2])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'event', ARGV[5])
return n + 1
"""
)


def queue_order(job: StoredJob) -> int:
    """A job's score in the queued index: priority first, then submit time (a job that hops
    between models keeps its place)."""
    return PRIORITY_RANK[job.spec.priority] * ORDER_SPAN + int(job.created_at * 1000)


def _encode(value: Any) -> str:
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return json.dumps(value)


def _queue_entry(raw: bytes | None) -> QueueEntry | None:
    """Where a job waits, from its `queue` field; None when it waits nowhere (or has no record)."""
    if not raw or raw == b"null":
        return None
    return QueueEntry.model_validate_json(raw)


def _pairs(fields: Mapping[str, Any]) -> list[str]:
    """Flattened for a Lua script's ARGV: key1, value1, key2, value2, ..."""
    return [item for key, value in fields.items() for item in (key, _encode(value))]


def round_event(job_id: str, round_: Round) -> str:
    """The `round` event of a checkpointed round (without the critic's raw answers)."""
    data = {"round": round_.model_dump(mode="json", exclude={"candidates": {"__all__": {"critique": {"raw"}}}})}
    return JobEvent(type="round", job_id=job_id, at=time.time(), data=data).model_dump_json()


class JobLifecycle:
    """The job's state changes, for the gateway (create, cancel, expire) and the workers."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int, artifacts: ArtifactStore | None = None) -> None:
        self.redis = client
        self.keys = keys
        self.ttl_s = ttl_s
        self._artifacts = artifacts
        self._end = client.register_script(_END)
        self._cancel = client.register_script(_CANCEL)
        self._expire = client.register_script(_EXPIRE)
        self._orphan = client.register_script(_ORPHAN)
        self._create = client.register_script(_CREATE)
        self._start = client.register_script(_START)
        self._hop = client.register_script(_HOP)
        self._owned_set = client.register_script(_OWNED_SET)
        self._checkpoint = client.register_script(_CHECKPOINT)

    def _ending_keys(self, job_id: str) -> list[str]:
        keys = self.keys
        return [keys.job(job_id), keys.events(job_id), keys.queued_index(), keys.queued_since(), keys.webhook_outbox()]

    # --- the gateway ----------------------------------------------------------------------
    @translate_errors
    async def create(self, job: StoredJob, source_png: bytes | None = None, queue_max: int = 0) -> None:
        """Store a new job and queue it in one atomic step: a job is never stored but not queued,
        and with `queue_max` the cap holds however many submits race (`QueueFull` beyond it).
        An edit's source image goes to the artifact store first (swept with the rest if the
        job is then refused)."""
        spec = job.spec
        if spec.model is None:
            raise ValueError("a job is placed on a model (the gateway's fleet) before it is stored")
        if source_png is not None:
            if self._artifacts is None:
                raise RuntimeError("this JobLifecycle was made without an artifact store")
            await self._artifacts.put(self.keys.source_image(job.id), source_png)
        # Drop unset top-level fields only: a nested null (e.g. loop.patience) is a choice.
        dumped = job.model_dump(exclude={"rounds", "queue_position", "links", "queue"})
        fields = {key: value for key, value in dumped.items() if value is not None}
        tenant = job.owner or ""
        keys = [
            self.keys.job(job.id),
            self.keys.queued_index(),
            self.keys.all_jobs(),
            self.keys.queue(spec.model, spec.mode, spec.priority),
            self.keys.tenant_jobs(tenant),
            self.keys.queued_since(),
        ]
        created = job.created_at
        args: list[Any] = [queue_max, self.ttl_s, queue_order(job), created, job.id, created - self.ttl_s]
        args += [spec.model, spec.mode, spec.priority]
        if not await self._create(keys=keys, args=[*args, *_pairs(fields)]):
            raise QueueFull(f"the queue holds {queue_max} jobs; retry later")

    @translate_errors
    async def cancel(self, job_id: str) -> str:
        """`cancelled` (was queued: it ends now and will never run), `requested` (running: it
        stops at its next stage boundary), `terminal` (already over) or `missing`."""
        outcome = await self._cancel(
            keys=self._ending_keys(job_id),
            args=[job_id, _encode(time.time()), self.ttl_s, EVENTS_MAXLEN, CONSUMER_GROUP],
        )
        return str(outcome.decode())

    @translate_errors
    async def expire_unclaimed(self, max_wait_s: float, batch: int = 100) -> list[str]:
        """End as `expired` (stop reason `unclaimed`) the jobs queued longer than `max_wait_s`
        (since they were created, or handed to another model) that no worker claimed: workers
        may vanish after a job was accepted, and nobody should wait forever.

        Safe to run from every gateway replica at once: each job ends once."""
        now = time.time()
        cutoff = now - max_wait_s
        ended: list[str] = []
        for raw in await self.redis.zrangebyscore(self.keys.queued_since(), "-inf", cutoff, start=0, num=batch):
            job_id = raw.decode()
            error = await self._unclaimed_error(job_id, max_wait_s)
            args = [job_id, cutoff, _encode(now), self.ttl_s, EVENTS_MAXLEN, CONSUMER_GROUP, _encode(error)]
            outcome = (await self._expire(keys=self._ending_keys(job_id), args=args)).decode()
            if outcome in ("expired", "succeeded"):
                ended.append(job_id)
        return ended

    @translate_errors
    async def expire_orphaned(self, max_idle_s: float, batch: int = 100) -> list[str]:
        """End the running jobs whose queue entry no worker has held for `max_idle_s`: their
        worker stopped (its heartbeat keeps the entry fresh) and no worker of their model took
        them over (a re-claim does too), so without this they would stay `running` for good.
        They end as unclaimed ones do, with the rounds they finished.

        Safe to run from every gateway replica at once: each job ends once."""
        ended: list[str] = []
        models = sorted(m.decode() for m in await self.redis.smembers(self.keys.models()))
        streams = [self.keys.queue(model, mode, p) for model in models for mode in MODES for p in PRIORITIES]
        for stream in streams:
            try:
                stale = await self.redis.xpending_range(
                    stream, CONSUMER_GROUP, "-", "+", batch, idle=int(max_idle_s * 1000)
                )
            except redis_exceptions.ResponseError:  # no stream or group: nothing pending there
                continue
            for pending in stale:
                entry = await self.redis.xrange(stream, pending["message_id"], pending["message_id"])
                if not entry:
                    continue
                job_id = entry[0][1][b"job"].decode()
                error = _encode(await self._orphaned_error(job_id, max_idle_s))
                args = [job_id, int(max_idle_s * 1000), _encode(time.time()), self.ttl_s, EVENTS_MAXLEN]
                outcome = await self._orphan(keys=self._ending_keys(job_id), args=[*args, CONSUMER_GROUP, error])
                if outcome.decode() in ("expired", "succeeded"):
                    ended.append(job_id)
        return ended

    async def _orphaned_error(self, job_id: str, max_idle_s: float) -> JobError:
        worker, raw = await self.redis.hmget(self.keys.job(job_id), ["worker", "queue"])
        waits = _queue_entry(raw)
        model = f"model {waits.model!r}" if waits else "its model"
        who = f"its worker {json.loads(worker)!s}" if worker else "its worker"
        return JobError(
            code="unclaimed",
            message=f"{who} stopped, and no worker of {model} took the job over within {max_idle_s:.0f}s "
            "(GCR_QUEUE_TIMEOUT_S); the rounds it finished are kept",
            retryable=True,
        )

    async def _unclaimed_error(self, job_id: str, max_wait_s: float) -> JobError:
        waits = _queue_entry(await self.redis.hget(self.keys.job(job_id), "queue"))
        where = f"model {waits.model!r} in mode {waits.mode!r} ({waits.priority} priority)" if waits else "its model"
        return JobError(
            code="unclaimed",
            message=f"no worker claimed this job within {max_wait_s:.0f}s (GCR_QUEUE_TIMEOUT_S); "
            f"check that a worker serving {where} runs",
            retryable=True,
        )

    # --- the worker -------------------------------------------------------------------------
    @translate_errors
    async def start(
        self, job_id: str, worker_id: str, max_attempts: int, *, count_attempt: bool = True
    ) -> tuple[str, int]:
        """Mark a claimed job running and owned by `worker_id`, and say so on its events.

        `count_attempt=False` when the same worker resumes a job after losing Redis for
        a moment: that is not the job's fault. Returns
        (`ok` | `terminal` | `missing` | `exhausted`, attempts)."""
        keys = self.keys
        outcome, attempts = await self._start(
            keys=[keys.job(job_id), keys.queued_index(), keys.queued_since(), keys.events(job_id), keys.rounds(job_id)],
            args=[
                job_id,
                _encode(worker_id),
                _encode(time.time()),
                max_attempts,
                "1" if count_attempt else "0",
                self.ttl_s,
                EVENTS_MAXLEN,
            ],
        )
        return outcome.decode(), int(attempts)

    @translate_errors
    async def update(self, job_id: str, worker_id: str, **fields: Any) -> bool:
        """Set fields of a running job this worker owns; False when it no longer does."""
        applied = await self._owned_set(keys=[self.keys.job(job_id)], args=[_encode(worker_id), *_pairs(fields)])
        return bool(applied)

    @translate_errors
    async def checkpoint(self, job_id: str, worker_id: str, round_: Round, **fields: Any) -> bool:
        """Append a finished round exactly once, set `fields` and send its `round` event, atomically.

        True when the round is stored (now, or by an earlier call whose answer was lost);
        False when the job is no longer this worker's, or a round before it is missing."""
        result = await self._checkpoint(
            keys=[self.keys.rounds(job_id), self.keys.job(job_id), self.keys.events(job_id)],
            args=[
                round_.index,
                round_.model_dump_json(),
                _encode(worker_id),
                self.ttl_s,
                round_event(job_id, round_),
                EVENTS_MAXLEN,
                *_pairs(fields),
            ],
        )
        return int(result) >= 0

    @translate_errors
    async def hop(self, job: StoredJob, worker_id: str, held: Claim, model: str, mode: str, round_index: int) -> bool:
        """Queue a running job this worker owns on `model`'s `mode` stream and let go of the entry
        it holds (`held`), atomically; False when the job is no longer this worker's."""
        now = time.time()
        hop = {"model": model, "mode": mode, "round": round_index}
        event = JobEvent(type="status", job_id=job.id, at=now, data={"status": "queued", "hop": hop})
        keys = self.keys
        handed = await self._hop(
            keys=[
                keys.job(job.id),
                keys.queued_index(),
                keys.queue(model, mode, job.spec.priority),
                held.stream,
                keys.events(job.id),
                keys.queued_since(),
            ],
            args=[
                _encode(worker_id),
                job.id,
                queue_order(job),
                held.entry_id,
                CONSUMER_GROUP,
                _encode(now),
                model,
                mode,
                job.spec.priority,
                event.model_dump_json(),
                EVENTS_MAXLEN,
            ],
        )
        return bool(handed)

    async def finish(self, job_id: str, worker_id: str | None, **fields: Any) -> Ending:
        """End a job with `fields` (status, stop reason, best, summary, ...). With `worker_id`,
        only while that worker owns it (`not_owner` otherwise); None ends it whoever holds it
        (a dead letter). A job that already ended is settled again (`already`, or `resent`
        when its `end` event was missing)."""
        return await self._ending(job_id, "owner" if worker_id is not None else "any", worker_id, fields)

    async def fail(self, job_id: str, error: JobError, worker_id: str | None = None) -> Ending:
        """End a job as failed with `error` (see `finish` for `worker_id`)."""
        fields = {"status": "failed", "stop_reason": "failed", "stage": None, "finished_at": time.time()}
        return await self.finish(job_id, worker_id, **fields, error=error)

    async def settle(self, job_id: str) -> Ending:
        """Close a job that already ended, for good: its entry removed, a missing `end` re-sent.
        `open` for a job still queued or running (nothing is done)."""
        return await self._ending(job_id, "settle", None, {})

    @translate_errors
    async def _ending(self, job_id: str, guard: str, worker_id: str | None, fields: Mapping[str, Any]) -> Ending:
        outcome = await self._end(
            keys=self._ending_keys(job_id),
            args=[
                job_id,
                guard,
                _encode(worker_id),
                _encode(time.time()),
                self.ttl_s,
                EVENTS_MAXLEN,
                CONSUMER_GROUP,
                *_pairs(fields),
            ],
        )
        return outcome.decode()  # type: ignore[no-any-return]
