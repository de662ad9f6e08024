"""Benchmark the sidecar against a floor, on this machine, in one run: ``python -m bench.run``.

What runs (every process on 127.0.0.1, started here on free ports and stopped by PID):

- redis-server, filled with 100,000 keys and 1,000 teams in the store's layout;
- ``bench/noop_server.py``: the floor, the same gRPC stack answering OK after parsing the body;
- the sidecar (``python -m extauthz serve``, one process), once with its cache warm, once
  with no cache (``EXTAUTHZ_CACHE_MAX_ENTRIES=0``: every check reads Redis);
- Envoy (``--concurrency 1``), three of them, from the rendered bootstrap.

Measurements:

1. Direct gRPC load with h2load at the floor, the warm sidecar and the cold sidecar.
   h2load sends one body per process, so a round runs H2_PROCS h2load processes at once,
   each with its own CheckRequest (its own key): 9 allowed and 3 denied (model not
   allowed, unknown key, team without the model). Each of REPS repetitions runs one
   round per server, with new keys, the servers taking turns; a server's figures add up
   its rounds. checks/s over the rounds; p50/p99 from h2load's per-request logs; server
   CPU µs per check from /proc/<pid>/stat (utime+stime, all threads) over the same windows.
2. Resident memory (VmRSS) of the warm sidecar after a check for each of the 100,000 keys.
   Then what a hold costs (``bench/holds.py``): checks one at a time for a caller with
   budgets (its estimate held), one with rate limits only and one with neither, the
   sidecar's CPU per check for each.
3. End to end with wrk (1 thread, ``bench/mix.lua``) through Envoy: ``envoy_direct`` (no
   authorization), ``envoy_noop`` (ext_authz to the floor), ``envoy_sidecar`` (the full
   rendered config, warm sidecar: every allowed call's usage read, reported and settled)
   and ``envoy_sidecar_untracked`` (the same with ``spend_tracking`` off: no accounting for
   keys without limits), the last two also with streamed calls (``_stream``), taking
   turns the same way. The upstream is a second listener of each Envoy answering a
   ``direct_response`` (JSON with usage, or events ending with a usage chunk): no Python
   process upstream.

Taking turns matters here: this machine's speed drifts (other load on the host), so a
ratio of two figures measured seconds apart is steadier than either figure. The run
times a fixed Python loop between repetitions and reports the spread.

Writes ``bench/results.json`` and prints one table. ``--strict`` exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import re

import redis

from extauthz import config as config_module
from tests.harness import Proc, Sidecar, free_port, http, start_redis, start_sidecar
from bench.shape import BENCH, COLD_ENV, H2_PROCS, H2_STREAMS, MEMORY_CONCURRENCY, N_KEYS, N_TEAMS, REPS, RESULTS, ROUND_S, WARM_ENV, WRK_CONNECTIONS, WRK_REPS, WRK_S
from bench.population import grpc_frame, h2_rounds, populate
from bench.measure import calibrate, rss_mb, stop_all
from bench.grpc_load import cache_hit_share, cache_stats, check_every_key, grpc_phase, grpc_ready, record_memory_estimate, verify
from bench.envoy_load import EnvoyCase, bench_config, bootstrap, envoy_phase, start_envoy, verify_envoy
from bench.report import table, targets, warnings
from bench.holds import holds
from bench import instructions

# == the run ====================================================================================

def step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    for tool in ("h2load", "wrk", "valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed: run scripts/ensure-bench-tools", file=sys.stderr)
            return 2
    # SIGTERM ends the run like an error does: the finally below stops every process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    (BENCH / "raw").mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=BENCH / "raw"))
    started = time.monotonic()
    procs: list[Proc] = []
    ok = False
    try:
        results = run(workdir, procs)
        results["run_seconds"] = round(time.monotonic() - started, 1)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print()
        print(table(results))
        print()
        print(instructions.table(results["instructions"]))
        print()
        print(f"sidecar RSS after a check for each of the {N_KEYS:,} keys: {results['sidecar_rss_mb_100k_keys']} MiB "
              f"(before: {results['sidecar_rss_mb_before_100k_keys']}; every key cached, estimated: "
              f"{results['sidecar_rss_mb_100k_keys_estimate']['mb']})")
        held = results["holds"]
        print("checks one at a time, warm (sidecar CPU µs/check, p50 ms): "
              + ", ".join(f"{n} {held[n]['cpu_us_per_check']} / {held[n]['p50_ms']}"
                          for n in ("free", "limited", "budgeted"))
              + f"; budgeted x limited {held['budgeted_cpu_x_limited']}")
        for name, t in results["targets"].items():
            print(f"target {name}: {t['value']} (limit {t['limit']}) {'PASS' if t['pass'] else 'MISS'}")
        for w in results["warnings"]:
            print(f"WARNING {w}")
        print(f"\n{results['note']}\nwrote {args.out} in {results['run_seconds']} s")
        ok = True
        return 1 if args.strict and not all(t["pass"] for t in results["targets"].values()) else 0
    finally:
        stop_all(procs, workdir, keep=args.keep or not ok)


def run(workdir: Path, procs: list[Proc]) -> dict[str, Any]:
    def started(proc: Proc) -> Proc:
        procs.append(proc)
        return proc

    def sidecar(name: str, env: dict[str, str]) -> Sidecar:
        # Every listening port of its own, on loopback.
        side = start_sidecar(workdir, cfg_path, redis_url, {"EXTAUTHZ_METRICS_HOST": "127.0.0.1", **env})
        procs.append(side.proc)
        return side

    calibration = [calibrate()]
    results: dict[str, Any] = {"cpu_count": os.cpu_count()}

    step(f"redis-server, {N_KEYS:,} keys and {N_TEAMS:,} teams")
    redis_proc, redis_port = start_redis(workdir)
    started(redis_proc)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    r = redis.Redis(port=redis_port)
    populate_s = populate(r)

    cfg_path = bench_config(workdir, free_port())
    cfg = config_module.load(str(cfg_path))
    rounds = h2_rounds(REPS)
    files: list[list[Path]] = []
    for i, probes in enumerate(rounds):
        files.append([])
        for j, p in enumerate(probes):
            path = workdir / f"body-r{i}-{j}.bin"
            path.write_bytes(grpc_frame(p.request().SerializeToString()))
            files[-1].append(path)
    all_probes = [p for probes in rounds for p in probes]
    h2logs = workdir / "h2load"
    h2logs.mkdir()

    step("no-op server (floor); sidecar with a warm cache; sidecar without a cache")
    noop_port = free_port()
    noop = started(Proc("noop server", [sys.executable, "-m", "bench.noop_server", "--port", str(noop_port)],
                        workdir / "noop.log").start())
    noop.wait_ready(lambda: grpc_ready(noop_port))
    warm = sidecar("warm", WARM_ENV)
    warm_started = time.monotonic()
    # The cache serves only once Redis tracking is on (invalidation.py): wait for that client.
    warm.proc.wait_ready(lambda: any(int(c.get("redir", -1)) > 0 for c in r.client_list()))
    cold = sidecar("cold", COLD_ENV)
    verify(noop_port, all_probes, decisions=False)
    verify(cold.grpc_port, all_probes, decisions=True)
    verify(warm.grpc_port, all_probes, decisions=True)     # also the warm-up pass: every key once

    step(f"h2load: {REPS} x (floor, warm, cold), {ROUND_S:g} s each, {H2_PROCS} h2load x {H2_STREAMS} streams")
    servers = {"floor": (noop_port, noop.pid), "warm": (warm.grpc_port, warm.proc.pid),
               "cold": (cold.grpc_port, cold.proc.pid)}
    results.update(grpc_phase(servers, files, h2logs, r, redis_proc.pid, calibration))
    cold.proc.stop()

    step(f"sidecar memory: one check for each of the {N_KEYS:,} keys")
    rss_before = rss_mb(warm.proc.pid)
    every = asyncio.run(check_every_key(warm.grpc_port, N_KEYS, MEMORY_CONCURRENCY))
    if every["wrong"] or every["still_unavailable"]:
        raise RuntimeError(f"of the {N_KEYS} key checks, {every['wrong']} had the wrong answer and "
                           f"{every['still_unavailable']} stayed unavailable")
    results["sidecar_rss_mb_100k_keys"] = round(rss_mb(warm.proc.pid), 1)
    results["sidecar_rss_mb_before_100k_keys"] = round(rss_before, 1)
    every["cache_stats"] = cache_stats(warm.admin_port)
    # Does the figure show what it claims? A cache holding every key answers a sample of
    # them again without reading Redis.
    every["cache_hit_share_after"] = cache_hit_share(warm.grpc_port, r)
    results["memory_pass"] = every
    estimate = record_memory_estimate()
    results["sidecar_rss_mb_100k_keys_estimate"] = {
        "mb": round(rss_before + estimate["mb"], 1),
        "how": f"RSS before the pass ({rss_before:.1f}) + {estimate['mb']} MiB for {estimate['records']:,} "
               f"records built with extauthz.domain.record in an OrderedDict, in a separate process"}

    step("a second warm sidecar, with spend_tracking off (no usage accounting for keys without limits)")
    untracked = sidecar("untracked", {**WARM_ENV, "EXTAUTHZ_SPEND_TRACKING": "false"})
    untracked.proc.wait_ready(lambda: sum(int(c.get("redir", -1)) > 0 for c in r.client_list()) >= 2)
    verify(untracked.grpc_port, all_probes, decisions=True)
    asyncio.run(check_every_key(untracked.grpc_port, N_KEYS, MEMORY_CONCURRENCY))  # as warm as the other
    step("holds: checks of a caller with budgets, one with rate limits, one with neither")
    results["holds"] = holds(r, warm.grpc_port, warm.proc.pid)

    step("four Envoys: direct, ext_authz to the no-op server, to the sidecar, to the untracked sidecar")
    cases = []
    sample = [rounds[0][0], rounds[0][6], rounds[0][9], rounds[0][10], rounds[0][11]]
    for kind, authz_port, authz_pid, admin_api in (
            ("direct", noop_port, None, warm.admin_port), ("noop", noop_port, noop.pid, warm.admin_port),
            ("sidecar", warm.grpc_port, warm.proc.pid, warm.admin_port),
            ("sidecar_untracked", untracked.grpc_port, untracked.proc.pid, untracked.admin_port)):
        listen, admin = free_port(), free_port()
        boot = bootstrap(kind, cfg, listen, admin, authz_port, admin_api, free_port())
        proc = started(start_envoy(workdir, kind, boot, admin))
        decisions = kind.startswith("sidecar")
        verify_envoy(listen, sample, decisions=decisions)
        cases.append(EnvoyCase(f"envoy_{kind}", proc, listen, authz_pid, decisions))
        if decisions:  # the same Envoy, streamed calls
            verify_envoy(listen, sample, decisions=True, stream=True)
            cases.append(EnvoyCase(f"envoy_{kind}_stream", proc, listen, authz_pid, True, stream=True))
    settled_before = settled_reports(warm)
    step(f"wrk: {WRK_REPS} x {len(cases)} cases, {WRK_S} s each, 1 thread x {WRK_CONNECTIONS} connections")
    results.update(envoy_phase(cases, r, calibration))
    results["accounting"] = accounting(results, settled_reports(warm) - settled_before)
    for case in cases:
        if case.proc.popen is not None and case.proc.popen.poll() is None:
            case.proc.stop()
        _trim(case.proc.log)
    untracked.proc.stop()

    step("instructions per check under callgrind: the floor and the sidecar over gRPC, then each behind Envoy")
    results["instructions"] = instructions.measure(workdir, procs, cfg_path, redis_url, r, N_KEYS)

    results["warm_sidecar_cache_stats_at_end"] = cache_stats(warm.admin_port)
    uptime = time.monotonic() - warm_started
    warm.proc.stop()
    log_text = warm.proc.log.read_text(errors="replace")
    results["warm_sidecar_invalidation_channel_losses"] = {
        "count": log_text.count("invalidation channel lost"), "uptime_s": round(uptime, 1),
        "store_unavailable_log_lines": log_text.count("store unavailable")}
    calibration.append(calibrate())
    results["machine_calibration_ms"] = {"min": min(calibration), "median": statistics.median(calibration),
                                         "max": max(calibration), "all": calibration}

    results["targets"] = targets(results)
    results["warnings"] = warnings(results)
    denied = sum(not p.allowed for p in all_probes) / len(all_probes)
    results["setup"] = {
        "populate_seconds": round(populate_s, 1), "keys": N_KEYS, "teams": N_TEAMS,
        "grpc_load": {"tool": "h2load", "processes_per_round": H2_PROCS, "streams_per_process": H2_STREAMS,
                      "repetitions": REPS, "round_seconds": ROUND_S, "distinct_keys": len(all_probes),
                      "denied_share": round(denied, 3), "round": [f"{p.label}: {p.key} {p.model}" for p in rounds[0]]},
        "envoy_load": {"tool": "wrk", "threads": 1, "connections": WRK_CONNECTIONS, "repetitions": WRK_REPS,
                       "run_seconds": WRK_S, "script": "bench/mix.lua", "envoy_concurrency": 1,
                       "envoy_noop_filters": "as rendered (decompressor, ext_authz, lua splice, router), fixed route",
                       "envoy_direct_filters": "decompressor, router, fixed route",
                       "envoy_sidecar_filters": "the rendered bootstrap as it is",
                       "all": "listener bound to 127.0.0.1; the upstream cluster (its rendered name) pointed at a "
                              "second listener of the same Envoy answering direct_response 200"},
        "warm_sidecar_env": WARM_ENV,
        "cold_sidecar_env": COLD_ENV,
        "rss_unit": "MiB (VmRSS kB / 1024)",
        "latency": "gRPC rows: nearest-rank percentiles of every request's duration in the h2load logs; "
                   "Envoy rows: median over the wrk runs of wrk's percentiles",
    }
    results["note"] = (
        f"{os.cpu_count()} cores shared by everything: Envoy --concurrency 1, wrk 1 thread, one authorization "
        f"process, redis-server and the load generators. gRPC rows: h2load {H2_PROCS} processes x {H2_STREAMS} "
        f"streams, {REPS} rounds x {ROUND_S:g} s per server in alternation, {denied:.0%} denied. Envoy rows: wrk "
        f"{WRK_CONNECTIONS} connections, {WRK_REPS} runs x {WRK_S} s per Envoy in alternation, bench/mix.lua "
        f"({results['envoy_sidecar']['denied_share']:.0%} denied). 'x floor': against the no-op server "
        f"(Envoy rows: against Envoy + no-op server).")
    return results


def settled_reports(side: Sidecar) -> float:
    """Usage reports the sidecar settled so far (priced: settled; no usage: unpriced)."""
    text = http("GET", f"http://127.0.0.1:{side.metrics_port}/metrics").text
    return sum(float(v) for v in re.findall(r'^extauthz_usage_reports_total\{result="(?:settled|unpriced)"\} (\S+)$',
                                            text, re.M))


def accounting(results: dict[str, Any], settled: float) -> dict[str, Any]:
    """Usage accounting's cost: the same load with it (every call's usage read by Envoy,
    reported and settled in Redis) and without (spend_tracking off), JSON and streamed.
    CPU per settled response: the difference in CPU per request over the allowed share."""
    out: dict[str, Any] = {"reports_settled_during_wrk": int(settled)}
    for kind in ("json", "stream"):
        suffix = "" if kind == "json" else "_stream"
        on, off = results[f"envoy_sidecar{suffix}"], results[f"envoy_sidecar_untracked{suffix}"]
        allowed = 1 - on["denied_share"]
        out[kind] = {
            "rps_on": on["rps"], "rps_off": off["rps"], "rps_on_x_off": round(on["rps"] / off["rps"], 3),
            "per_rep_x": [round(a / b, 3) for a, b in zip(on["rps_per_rep"], off["rps_per_rep"])],
            "sidecar_cpu_us_per_settled_response": round(
                (on["authz_cpu_us_per_request"] - off["authz_cpu_us_per_request"]) / allowed, 1),
            "envoy_cpu_us_per_settled_response": round(
                (on["envoy_cpu_us_per_request"] - off["envoy_cpu_us_per_request"]) / allowed, 1),
        }
    return out


def _trim(log: Path, keep: int = 64 * 1024) -> None:
    """Envoy's access log is one line per request: keep its tail only."""
    try:
        size = log.stat().st_size
        if size > keep:
            with open(log, "rb") as f:
                f.seek(size - keep)
                tail = f.read()
            log.write_bytes(tail)
    except OSError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
