"""The mail id as idempotency key: submitted once, sent at most once per round.

Two records per mail in the shared state (Redis, ``rohrpost.shared.state``):

* ``{ns}:id:{mail_id}`` — written by the producer with ``SET NX`` before it
  publishes: the content's fingerprint. A second submit of the id finds it and is
  refused as a duplicate (same or different content, the caller is told which).
  A publish the broker did not confirm releases it, so the caller may try again.
  Kept as long as the history keeps the mail (its delay plus ``retention_days``).
* ``{ns}:send:{tenant}/{app}:{mail_id}:{round}`` — written by the worker that sends: ``sending:…``
  with a lease (15 s, renewed while its SMTP transaction runs), ``sent`` once the server took the
  mail. Another copy of the mail in the same round (a redelivery after a crash or a
  lost connection, a producer's republish, two copies consumed at the same moment)
  finds it: ``sent`` → dropped as a duplicate; ``sending`` → delayed a few seconds
  and looked at again. A failed attempt releases the claim. The route is part of the
  key: ids are chosen by clients and shown in Message-ID, and another tenant's mail
  published under the same id must not take this mail's claim (it would be dropped).

What remains possible, and documented: a duplicate send when a worker dies (or
Redis fails) in the ~20 ms between the server's 250 and the ``sent`` mark reaching
Redis; while Redis is unreachable (producers and workers go on without the checks);
after Redis lost its data (run it with persistence); after the record expired.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import redis

from rohrpost.shared.logs import get_logger
from rohrpost.shared.state import SharedState, StateUnavailable

log = get_logger(__name__)

#: ARGV[1]: the fingerprints of KEYS in order, FINGERPRINT_CHARS each; ARGV[2]: how
#: long to keep each (seconds, space-separated). Answers only for the keys that
#: existed: a flat list of (position from 1, fingerprint found). Two arguments and a
#: short answer instead of two arguments and an answer per mail: redis-py encodes and
#: parses each in Python, which cost submit_many ~8 µs a mail.
_SUBMIT = """
local ttls = {}
for ttl in string.gmatch(ARGV[2], '%d+') do ttls[#ttls + 1] = ttl end
local width = tonumber(ARGV[3])
local found = {}
for i, key in ipairs(KEYS) do
  local mine = string.sub(ARGV[1], width * (i - 1) + 1, width * i)
  if not redis.call('SET', key, mine, 'NX', 'EX', ttls[i]) then
    found[#found + 1] = i
    found[#found + 1] = redis.call('GET', key) or ''
  end
end
return found
"""

_RELEASE = """
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then n = n + redis.call('DEL', key) end
end
return n
"""

_MARK_SENT = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, 'sent', 'EX', ARGV[i])
end
return #KEYS
"""

_RENEW = """
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    n = n + redis.call('PEXPIRE', key, ARGV[1])
  end
end
return n
"""

_CLAIM = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[i + 1], 'NX', 'PX', ARGV[1]) then
    out[i] = ''
  else
    out[i] = redis.call('GET', key) or ''
  end
end
return out
"""

#: Where a container's wire JSON says when it was created: two submits of the same
#: mail differ there only.
_CREATED_AT = b'"created_at":"'


#: Length of a fingerprint (hex digits).
FINGERPRINT_CHARS = 24


def fingerprint(body: bytes) -> str:
    """A short hash of a container's wire JSON, ignoring when it was created.

    Hashes the body without each ``"created_at":"…"`` (and a comma after it), as the
    regular expression ``"created_at":"[^"]*",?`` of earlier versions removed them, so
    fingerprints recorded by them still match. Found with ``bytes.find`` and hashed in
    pieces: no second copy of the body, per submitted mail.
    """
    digest = hashlib.blake2b(digest_size=FINGERPRINT_CHARS // 2)
    view, start = memoryview(body), 0
    while (at := body.find(_CREATED_AT, start)) >= 0:
        end = body.find(b'"', at + len(_CREATED_AT))
        if end < 0:
            break
        end += 2 if body[end + 1 : end + 2] == b"," else 1
        digest.update(view[start:at])
        start = end
    digest.update(view[start:])
    return digest.hexdigest()


class Verdict(enum.Enum):
    """What the registry says about a submitted id."""

    NEW = "new"
    SAME = "same"  # submitted before with the same content
    DIFFERENT = "different"  # submitted before with other content
    UNCHECKED = "unchecked"  # the shared state is unreachable: not checked


@dataclass(frozen=True, slots=True)
class Submission:
    """One mail about to be published: its id, fingerprint and how long to remember it."""

    mail_id: uuid.UUID
    fingerprint: str
    ttl_seconds: int


class IdRegistry:
    """The producer's side: each mail id is submitted once."""

    def __init__(self, state: SharedState | None, namespace: str) -> None:
        self._state = state
        self._prefix = f"{namespace}:id:"
        self._submit = state.script(_SUBMIT) if state else None
        self._release = state.script(_RELEASE) if state else None
        self._background: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def claim_soon(self, submissions: Sequence[Submission]) -> Future[list[Verdict]]:
        """``claim`` on a thread of its own, so the caller goes on while Redis answers.

        Calls run one after another in the order given. Bulk submission prepares the
        next chunk meanwhile: a claim of 2,000 ids waits 20-90 ms for Redis here.
        """
        with self._lock:
            if self._background is None:
                self._background = ThreadPoolExecutor(1, thread_name_prefix="rohrpost-ids")
            return self._background.submit(self.claim, submissions)

    def close(self) -> None:
        """End the thread of ``claim_soon`` (after the claims it was given)."""
        with self._lock:
            background, self._background = self._background, None
        if background is not None:
            background.shutdown()

    def claim(self, submissions: Sequence[Submission]) -> list[Verdict]:
        """Record the ids (one round trip); say for each whether it was submitted before."""
        if self._state is None or self._submit is None or not submissions:
            return [Verdict.UNCHECKED] * len(submissions)
        prefix = self._prefix
        keys = [f"{prefix}{s.mail_id}" for s in submissions]
        fingerprints = "".join(s.fingerprint for s in submissions)
        if len(fingerprints) != FINGERPRINT_CHARS * len(submissions):
            raise ValueError(f"fingerprints must be {FINGERPRINT_CHARS} characters each")
        args = [fingerprints, " ".join(str(s.ttl_seconds) for s in submissions), FINGERPRINT_CHARS]
        script = self._submit
        try:
            found = self._state.run(lambda client: script(keys=keys, args=args, client=client))
        except StateUnavailable:
            return [Verdict.UNCHECKED] * len(submissions)
        verdicts = [Verdict.NEW] * len(submissions)
        for position, seen in zip(found[::2], found[1::2], strict=True):
            index = int(position) - 1
            verdicts[index] = _verdict(submissions[index].fingerprint, _text(seen))
        return verdicts

    def release(self, submissions: Sequence[Submission]) -> None:
        """Forget ids whose publish failed, so they may be submitted again."""
        if self._state is None or self._release is None or not submissions:
            return
        keys = [f"{self._prefix}{s.mail_id}" for s in submissions]
        args = [s.fingerprint for s in submissions]
        script = self._release
        try:
            self._state.run(lambda client: script(keys=keys, args=args, client=client))
        except StateUnavailable:
            log.warning("could not release mail ids after a failed publish", count=len(keys))


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return value or ""


def _verdict(mine: str, seen: str) -> Verdict:
    if not seen:
        return Verdict.NEW
    return Verdict.SAME if seen == mine else Verdict.DIFFERENT


class ClaimState(enum.Enum):
    """What a worker may do with a mail it is about to send."""

    MINE = "mine"  # send it
    SENT = "sent"  # sent before in this round: drop this copy
    BUSY = "busy"  # another worker is sending it now: look again shortly
    UNCHECKED = "unchecked"  # the shared state is unreachable: send it


@dataclass(frozen=True, slots=True)
class Claim:
    """A worker's claim on sending one mail in one round."""

    state: ClaimState
    key: str = ""
    token: str = ""

    def is_for(self, key: str) -> bool:
        """Whether this claim is about ``key`` (an unchecked claim is about any)."""
        return self.state is ClaimState.UNCHECKED or self.key == key


class SendClaims:
    """The workers' side: a mail is sent at most once per round.

    ``claim_many`` is one round trip for the mails a worker just received (``claim``
    for one). ``sent`` and ``release``
    are written by a background thread in batches (every 20 ms), which also renews
    the leases of the claims still sending (every ``lease / 3``): a claim outlives
    a slow SMTP server but not a dead worker, whose mails another worker sends once
    the lease ran out (15 s).
    """

    def __init__(
        self,
        state: SharedState | None,
        namespace: str,
        *,
        lease_seconds: float = 15.0,
        interval: float = 0.02,
    ) -> None:
        self._state = state
        self._prefix = f"{namespace}:send:"
        self._claim = state.script(_CLAIM) if state else None
        self._release = state.script(_RELEASE) if state else None
        self._renew = state.script(_RENEW) if state else None
        self._mark_sent = state.script(_MARK_SENT) if state else None
        # Tokens only need to be unique: a random base per process and a counter.
        self._token_base = f"sending:{uuid.uuid4().hex[:16]}:"
        self._tokens = itertools.count()
        self._lease_ms = int(lease_seconds * 1000)
        self._interval = interval
        self._pending: queue.SimpleQueue[tuple[str, str, int] | None] = queue.SimpleQueue()
        self._active: dict[str, str] = {}
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None

    def key(self, route: tuple[str, str], mail_id: uuid.UUID | str, round: int) -> str:
        """The shared-state key of ``mail_id``'s sending in ``round`` on ``route`` (tenant, app)."""
        tenant, app = route
        return f"{self._prefix}{tenant}/{app}:{mail_id}:{round}"

    def claim(self, route: tuple[str, str], mail_id: uuid.UUID, round: int) -> Claim:
        """Claim the sending of ``mail_id`` in ``round`` on ``route``."""
        return self.claim_many([self.key(route, mail_id, round)])[0]

    def claim_many(self, keys: Sequence[str]) -> list[Claim]:
        """Claim the sendings of ``keys`` (see ``key``) in one round trip."""
        if self._state is None or self._claim is None or not keys:
            return [Claim(ClaimState.UNCHECKED)] * len(keys)
        base = self._token_base
        tokens = [f"{base}{next(self._tokens)}" for _ in keys]
        script, args = self._claim, [self._lease_ms, *tokens]
        try:
            seen = self._state.run(lambda client: script(keys=keys, args=args, client=client))
        except StateUnavailable:
            return [Claim(ClaimState.UNCHECKED)] * len(keys)
        claims = []
        with self._lock:
            for key, token, value in zip(keys, tokens, seen, strict=True):
                if text := _text(value):
                    state = ClaimState.SENT if text == "sent" else ClaimState.BUSY
                    claims.append(Claim(state, key))
                else:
                    self._active[key] = token
                    claims.append(Claim(ClaimState.MINE, key, token))
            if self._active:
                self._start_writer()
        return claims

    def sent(self, claim: Claim, ttl_seconds: int) -> None:
        """Mark the claimed mail sent, for ``ttl_seconds`` (written within ~20 ms)."""
        if claim.state is ClaimState.MINE:
            self._done(claim.key, (claim.key, "", ttl_seconds))

    def release(self, claim: Claim | None) -> None:
        """Give up the claim (not sent), so another copy may try."""
        if claim is not None and claim.state is ClaimState.MINE:
            self._done(claim.key, (claim.key, claim.token, 0))

    def close(self) -> None:
        """Write what is pending and stop the writer thread."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            self._pending.put(None)
            writer.join(5)

    def _done(self, key: str, op: tuple[str, str, int]) -> None:
        with self._lock:
            self._active.pop(key, None)
        self._pending.put(op)

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_loop, name="send-claims", daemon=True
            )
            self._writer.start()

    def _write_loop(self) -> None:
        renew_every = self._lease_ms / 3000
        next_renewal = time.monotonic() + renew_every
        while True:
            try:
                ops = [self._pending.get(timeout=max(0.0, next_renewal - time.monotonic()))]
                time.sleep(self._interval)  # gather what the next 20 ms bring
            except queue.Empty:
                ops = []
            while not self._pending.empty():
                ops.append(self._pending.get())
            self._write([op for op in ops if op is not None])
            if None in ops:
                return
            if time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + renew_every
                self._renew_active()

    def _renew_active(self) -> None:
        with self._lock:
            active = list(self._active.items())
        if not active or self._state is None or self._renew is None:
            return
        script, lease = self._renew, self._lease_ms
        keys = [key for key, _ in active]
        args: list[str | int] = [lease, *[token for _, token in active]]
        try:
            self._state.run(lambda client: script(keys=keys, args=args, client=client))
        except StateUnavailable:
            log.warning("could not renew the claims of mails being sent", count=len(keys))

    def _write(self, ops: list[tuple[str, str, int]]) -> None:
        if not ops or self._state is None or self._release is None or self._mark_sent is None:
            return
        sent = [(key, ttl) for key, token, ttl in ops if not token]
        releases = [(key, token) for key, token, _ in ops if token]
        mark_sent, release = self._mark_sent, self._release

        def write(client: redis.Redis) -> None:
            pipe = client.pipeline(transaction=False)
            if sent:
                mark_sent(keys=[k for k, _ in sent], args=[t for _, t in sent], client=pipe)
            if releases:
                release(keys=[k for k, _ in releases], args=[t for _, t in releases], client=pipe)
            pipe.execute()

        try:
            self._state.run(write)
        except StateUnavailable:
            log.warning("could not record sent mails in the shared state", count=len(ops))
