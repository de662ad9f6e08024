"""No raw virtual key, master key or provider key in logs, Redis, error bodies or metadata."""

from __future__ import annotations

import json
import re
from pathlib import Path

import redis

from tests import harness
from tests.harness import MASTER_KEY, http

PROVIDER_KEYS = re.findall(r"api_key: (\S+)", harness.EXAMPLE_CONFIG.read_text())


def test_secrets_never_leak(workdir: Path, upstream_port: int, redis_port: int) -> None:
    run_dir = workdir / "secrets"
    run_dir.mkdir()
    config = harness.write_config(run_dir, upstream_port)
    side = harness.start_sidecar(run_dir, config, f"redis://127.0.0.1:{redis_port}/0",
                                 extra_args=["--log-level", "DEBUG"])
    proxy = harness.start_envoy(run_dir, config, side)
    master = {"Authorization": f"Bearer {MASTER_KEY}"}
    bodies: list[str] = []
    try:
        keys = []
        for fields in ({"models": ["gpt-4"], "key_alias": "leak-check"}, {"models": ["beta-models"]}, {}):
            r = http("POST", proxy.url + "/key/generate", fields, master)
            keys.append(r.json()["key"])
        for key in keys:
            for model in ("gpt-4", "gpt-4o", 7, "openai/o1-mini"):
                r = http("POST", proxy.url + "/v1/chat/completions", {"model": model}, {"Authorization": f"Bearer {key}"})
                if r.status != 200:
                    bodies.append(r.text)
            bodies.append(http("POST", proxy.url + "/v1/chat/completions", raw=b"{bad",
                               headers={"Authorization": f"Bearer {key}"}).text)
            bodies.append(http("GET", proxy.url + f"/key/info?key={key}", headers=master).text)
            bodies.append(http("POST", proxy.url + "/key/update", {"key": key, "bogus": 1}, master).text)
            bodies.append(http("POST", proxy.url + "/key/generate", {}, {"Authorization": f"Bearer {key}"}).text)
            bodies.append(http("GET", proxy.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).text)
        # Rotation in both forms (the path form carries a key in its URL), the audit trail, explain.
        regenerated = http("POST", proxy.url + "/key/regenerate", {"key": keys[1], "grace_period": "1h"}, master)
        keys.append(regenerated.json()["key"])
        regenerated = http("POST", proxy.url + f"/key/{keys[2]}/regenerate", {}, master)
        keys.append(regenerated.json()["key"])
        bodies.append(http("POST", proxy.url + f"/key/{keys[2]}/regenerate", {}, master).text)  # gone: 404
        bodies.append(http("GET", proxy.url + "/audit?limit=1000", headers=master).text)
        bodies.append(http("POST", proxy.url + "/access/explain", {"key": keys[3], "model": "gpt-4o"}, master).text)
        bodies.append(http("GET", proxy.url + "/model/info", headers=master).text)
        bodies.append(http("POST", proxy.url + "/key/generate", {}, {"Authorization": "Bearer sk-12345"}).text)
        http("POST", proxy.url + "/key/delete", {"keys": [keys[0]]}, master)
    finally:
        proxy.proc.stop()
        side.proc.stop()

    logs = "\n".join(p.read_text(errors="replace") for p in run_dir.glob("*.log"))
    assert '"code": "model_not_allowed"' in logs  # the decision logs are there and were written
    client = redis.Redis(port=redis_port)
    dump = []
    for name in client.scan_iter(count=1000):
        kind = client.type(name)
        value = {b"string": lambda: client.get(name), b"set": lambda: sorted(client.smembers(name)),
                 b"stream": lambda: client.xrange(name), b"zset": lambda: client.zrange(name, 0, -1),
                 b"hash": lambda: client.hgetall(name)}[kind]()
        dump.append(f"{name!r} {value!r}")
    client.close()
    stored = "\n".join(dump)
    answers = "\n".join(bodies)
    secrets = {MASTER_KEY: "master key", **{k: "virtual key" for k in keys}, **{p: "provider key" for p in PROVIDER_KEYS}}
    for secret, what in secrets.items():
        assert secret not in logs, f"{what} in the logs"
        assert secret not in stored, f"{what} in Redis"
        assert secret not in answers, f"{what} in an answer"
    access = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert access and all(len(entry.get("key_hash") or "") in (0, 12) for entry in access)
