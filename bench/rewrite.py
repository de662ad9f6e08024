"""How the body's model is rewritten, measured: ``python -m bench.rewrite``.

One Envoy (``--concurrency 1``) per case, wrk posting one chat body over and over to an
upstream that is a second listener of the same Envoy (``direct_response``), and the
instruction that the authorization service would send given by the client as a header:

- ``none``: no body filter, the floor;
- ``transform``: ``envoy.filters.http.transform`` merging ``"model"`` from a header (what
  the gateway used before: it re-serializes the whole body and forwards it unchanged when
  its parser refuses it);
- ``splice``: the gateway's Lua filter (``extauthz/envoy/splice.lua``) replacing the bytes of the
  model's value, with the plan ``x-extauthz-splice`` as the sidecar computes it;
- ``splice-none``: the same filter when the plan is ``-`` (the provider's name is the
  client's: the body is not touched, the common case).

Prints, per body size, requests/s and Envoy CPU µs per request (from /proc), and writes
``bench/rewrite.json``.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.measure import cpu_seconds
from extauthz.envoy import render as envoy_config
from extauthz.check.json_body import read_json_model
from extauthz.check.routing import splice_plan
from tests.harness import BIN, Proc, free_port, http_ok

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
TRANSFORM = {"name": "envoy.filters.http.transform", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.transform.v3.TransformConfig",
    "request_transformation": {"body_transformation": {"action": "MERGE", "body_format": {
        "omit_empty_values": True, "json_format": {"model": "%REQ(x-model)%"}}}}}}
SIZES = {"1 KiB": 1024, "64 KiB": 64 * 1024, "1 MiB": 1024 * 1024}
SECONDS, CONNECTIONS, REPS = 4, 16, 3


def body_of(size: int) -> bytes:
    head = b'{"model": "openai/gpt-4o", "temperature": 0.2, "messages": [{"role": "user", "content": "'
    tail = b'"}]}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def listener(name: str, port: int, filters: list[dict[str, Any]], route: dict[str, Any]) -> dict[str, Any]:
    hcm = {"@type": HCM, "stat_prefix": name, "http_filters": [*filters, ROUTER],
           "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": [route]}]}}
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "per_connection_buffer_limit_bytes": 4 * 1024 * 1024,
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


def bootstrap(case: str, port: int, upstream: int, admin: int) -> dict[str, Any]:
    filters = {"none": [], "transform": [TRANSFORM], "splice": [envoy_config._splice_filter()],
               "splice-none": [envoy_config._splice_filter()]}[case]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                listener("front", port, filters, {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}),
                listener("upstream", upstream, [], {"match": {"prefix": "/"},
                                                    "direct_response": {"status": 200, "body": {"inline_string": "{}"}}}),
            ],
            "clusters": [{"name": "upstream", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
                "cluster_name": "upstream", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}]}}],
        },
    }


def wrk_script(workdir: Path, case: str, body: bytes) -> Path:
    if case == "splice":
        plan = splice_plan(read_json_model(body), "gpt-4o", insert=False)
        header = f'wrk.headers["x-extauthz-splice"] = {json.dumps(plan)}'
    elif case == "splice-none":
        header = 'wrk.headers["x-extauthz-splice"] = "-"'
    else:
        header = 'wrk.headers["x-model"] = "gpt-4o"'
    path = workdir / f"{case}-{len(body)}.lua"
    path.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n{header}\n'
                    f"wrk.body = {json.dumps(body.decode())}\n")
    return path


def measure(port: int, script: Path, pid: int) -> tuple[float, float]:
    before = cpu_seconds(pid)
    done = subprocess.run(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{SECONDS}s", "-s", str(script),
                           f"http://127.0.0.1:{port}/v1/chat/completions"], capture_output=True, text=True,
                          timeout=SECONDS + 60)
    cpu = cpu_seconds(pid) - before
    total = re.search(r"(\d+) requests in ([\d.]+)s", done.stdout)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    if done.returncode or total is None or bad:
        raise RuntimeError(f"wrk: {done.stdout}\n{done.stderr}")
    requests, seconds = int(total.group(1)), float(total.group(2))
    return requests / seconds, cpu / requests * 1e6


def main() -> None:
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for case in ("none", "transform", "splice", "splice-none"):
            port, upstream, admin = free_port(), free_port(), free_port()
            config = workdir / f"{case}.yaml"
            config.write_text(yaml.safe_dump(bootstrap(case, port, upstream, admin)))
            proc = Proc(case, [str(BIN / "envoy"), "-c", str(config), "--concurrency", "1", "--disable-hot-restart",
                               "--log-level", "error"], workdir / f"{case}.log").start()
            try:
                proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"))
                for label, size in SIZES.items():
                    script = wrk_script(workdir, case, body_of(size))
                    measure(port, script, proc.pid)  # warm-up
                    runs = [measure(port, script, proc.pid) for _ in range(REPS)]
                    rps = sorted(r for r, _ in runs)[REPS // 2]
                    cpu = sorted(c for _, c in runs)[REPS // 2]
                    results.setdefault(label, {})[case] = {"rps": round(rps), "envoy_cpu_us": round(cpu, 1)}
                    print(f"{label:7s} {case:12s} {rps:9.0f} req/s {cpu:9.1f} µs Envoy CPU/request", flush=True)
            finally:
                proc.stop()
    Path(__file__).with_name("rewrite.json").write_text(json.dumps(
        {"measured": time.strftime("%Y-%m-%d"), "wrk": f"-t1 -c{CONNECTIONS} -d{SECONDS}s, median of {REPS}",
         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
