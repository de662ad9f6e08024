"""The population in Redis (100,000 keys, 1,000 teams) and the requests sent: who may call what is known
from a key's number alone, so every answer can be verified."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis

from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2
from extauthz.domain.record import hash_token
from bench.shape import FUTURE, GROUP, H2_PROCS, MODEL_A, MODEL_B, N_KEYS, N_TEAMS, PAST, PREFIX, UNKNOWN_MODEL

# == population =================================================================================

def team_number(n: int) -> int | None:
    """Every fifth key belongs to a team; the teams' members are spread over all 1,000."""
    return (n // 5) % N_TEAMS if n % 5 == 4 else None


def key_models(n: int) -> list[str]:
    if team_number(n) is not None:
        return []                       # a team key: the team's list decides
    if n % 10 == 3:
        return [MODEL_B]                # restricted: bench-model is denied
    if n % 10 == 1:
        return [GROUP]                  # through the access group: bench-model only
    return [MODEL_A, MODEL_B]


def key_expires(n: int) -> str | None:
    if n % 1000 == 500:
        return PAST                     # expired
    return FUTURE if n % 3 == 0 else None


def key_blocked(n: int) -> bool:
    return n % 997 == 996


def team_models(t: int) -> list[str]:
    return [MODEL_B] if t % 10 == 7 else [MODEL_A, MODEL_B]


def team_blocked(t: int) -> bool:
    return t % 250 == 249


def admits(models: list[str], model: str) -> bool:
    if not models:
        return True
    return model in models or (GROUP in models and model == MODEL_A)


def allowed(n: int | None, model: str) -> bool:
    """What the sidecar must answer for key ``n`` (None: an unknown key) and ``model``."""
    if n is None or not 0 <= n < N_KEYS or key_blocked(n) or key_expires(n) == PAST:
        return False
    if model not in (MODEL_A, MODEL_B) or not admits(key_models(n), model):
        return False
    t = team_number(n)
    return t is None or (not team_blocked(t) and admits(team_models(t), model))


def raw_key(n: int) -> str:
    return f"sk-bench-{n}"


def key_doc(n: int) -> dict[str, Any]:
    key = raw_key(n)
    t = team_number(n)
    return {"token": hash_token(key), "key_name": f"sk-...{key[-4:]}", "key_alias": f"bench-key-{n}",
            "models": key_models(n), "team_id": None if t is None else f"bench-team-{t}",
            "expires": key_expires(n), "blocked": key_blocked(n), "metadata": {"bench": True},
            "created_at": "2025-01-01T00:00:00+00:00", "updated_at": "2025-01-01T00:00:00+00:00",
            "max_budget": None, "spend": 0.0}


def team_doc(t: int) -> dict[str, Any]:
    return {"team_id": f"bench-team-{t}", "team_alias": f"bench-team-alias-{t}", "models": team_models(t),
            "blocked": team_blocked(t), "metadata": {"bench": True},
            "created_at": "2025-01-01T00:00:00+00:00", "updated_at": "2025-01-01T00:00:00+00:00"}


def populate(r: redis.Redis, keys: int = N_KEYS, prefix: str = PREFIX) -> float:
    """``prefix``: where records live (``{extauthz:}`` in a cluster: records/keyspace.py)."""
    started = time.monotonic()
    PREFIX = prefix  # noqa: N806
    dump = lambda doc: json.dumps(doc, separators=(",", ":"))  # noqa: E731
    pipe = r.pipeline(transaction=False)
    for t in range(N_TEAMS):
        doc = team_doc(t)
        pipe.set(f"{PREFIX}team:{doc['team_id']}", dump(doc))
        pipe.sadd(f"{PREFIX}teams", doc["team_id"])
    pipe.execute()
    for start in range(0, keys, 5000):
        for n in range(start, min(start + 5000, keys)):
            doc = key_doc(n)
            pipe.set(f"{PREFIX}key:{doc['token']}", dump(doc))
            pipe.set(f"{PREFIX}alias:{doc['key_alias']}", doc["token"])
            pipe.sadd(f"{PREFIX}keys", doc["token"])
            if doc["team_id"]:
                pipe.sadd(f"{PREFIX}team_keys:{doc['team_id']}", doc["token"])
        pipe.execute()
    got = r.dbsize()  # (a cluster client sums its primaries')
    if got < keys + N_TEAMS:
        raise RuntimeError(f"redis holds {got} keys after populating")
    return time.monotonic() - started


# == requests ==================================================================================

def chat_body(model: str, tag: str) -> bytes:
    return json.dumps({"model": model, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": f"Write one sentence about benchmarks, request {tag}."}],
        "max_tokens": 64, "temperature": 0.2}, separators=(",", ":")).encode()


def check_request(key: str, model: str, tag: str) -> external_auth_pb2.CheckRequest:
    """A CheckRequest shaped like the one Envoy sends for POST /v1/chat/completions."""
    body = chat_body(model, tag)
    req = external_auth_pb2.CheckRequest()
    h = req.attributes.request.http
    h.id, h.method, h.path, h.host, h.scheme, h.protocol = tag, "POST", "/v1/chat/completions", \
        "127.0.0.1:4000", "http", "HTTP/1.1"
    h.size = len(body)
    h.raw_body = body
    h.headers.update({
        ":authority": "127.0.0.1:4000", ":method": "POST", ":path": "/v1/chat/completions", ":scheme": "http",
        "authorization": f"Bearer {key}", "content-type": "application/json", "content-length": str(len(body)),
        "user-agent": "bench/1.0", "accept": "*/*", "x-forwarded-proto": "http",
        "x-request-id": f"00000000-0000-4000-8000-{int(tag) % 10**12:012d}" if tag.isdigit() else tag,
        "x-envoy-auth-partial-body": "false",
    })
    return req


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


@dataclass(frozen=True)
class Probe:
    label: str
    key: str
    n: int | None
    model: str

    @property
    def allowed(self) -> bool:
        return allowed(self.n, self.model)

    def request(self) -> external_auth_pb2.CheckRequest:
        return check_request(self.key, self.model, str(self.n if self.n is not None else 0))


# One round's bodies: (label, predicate on the key number, model, expected allow).
PERSONAL_AB = lambda n: team_number(n) is None and key_models(n) == [MODEL_A, MODEL_B]  # noqa: E731
ROUND_PLAN: list[tuple[str, Callable[[int], bool] | None, str, bool]] = [
    *[("allow personal key", PERSONAL_AB, MODEL_A, True)] * 5,
    ("allow via access group", lambda n: key_models(n) == [GROUP], MODEL_A, True),
    ("allow team key", lambda n: team_number(n) is not None, MODEL_A, True),
    ("allow other model", PERSONAL_AB, MODEL_B, True),
    ("allow team key, other model", lambda n: team_number(n) is not None, MODEL_B, True),
    ("deny model not allowed", lambda n: key_models(n) == [MODEL_B], MODEL_A, False),
    ("deny unknown key", None, MODEL_A, False),
    ("deny team without the model", lambda n: team_number(n) is not None
     and team_models(team_number(n)) == [MODEL_B], MODEL_A, False),
]
assert len(ROUND_PLAN) == H2_PROCS


def h2_rounds(rounds: int) -> list[list[Probe]]:
    """Distinct keys for every body of every round, each with the outcome the plan wants."""
    used: set[int] = set()
    out = []
    for r in range(rounds):
        probes = []
        for j, (label, pred, model, want) in enumerate(ROUND_PLAN):
            if pred is None:
                probes.append(Probe(label, f"sk-bench-unknown-{r}-{j}", None, model))
                continue
            n = 1 + r * 24_989 + j * 1_999
            while n in used or not pred(n) or allowed(n, model) != want:
                n = (n + 1) % N_KEYS
            used.add(n)
            probes.append(Probe(label, raw_key(n), n, model))
        out.append(probes)
    return out


def lua_mix(count: int, start: int = 0, n_keys: int = N_KEYS) -> int:
    """How many of bench/mix.lua's requests start+1 .. start+count the sidecar must deny."""
    denied = 0
    for c in range(start + 1, start + count + 1):
        n = None if c % 20 == 0 else (c * 7919) % n_keys
        m = c % 20
        model = MODEL_B if m in (3, 7, 13) else UNKNOWN_MODEL if m == 11 else MODEL_A
        denied += not allowed(n, model)
    return denied
