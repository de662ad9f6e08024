"""The gateway pod's Envoy as the sidecar overlay ships it, run here against a real Envoy:
its preStop hook drains the listeners and returns only once no request is in flight, so
a rollout cuts no streamed answer short; and its metrics are scraped from a listener that
serves /stats/prometheus and nothing else of the admin API."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import yaml

from tests.harness import MASTER_KEY, free_port, http, start_envoy, start_sidecar, tcp_open
from tests.test_deploy import OVERLAYS, container, kustomize, one

DRAIN_ARGS_OF_THE_POD = ("--drain-strategy", "--drain-time-s")


def envoy_container() -> dict:
    docs = kustomize(OVERLAYS["sidecar"])
    spec = one(docs, "Deployment", "llm-gateway")["spec"]["template"]["spec"]
    return container(spec, "envoy")


def test_the_pod_gives_the_longest_stream_time_to_end() -> None:
    docs = kustomize(OVERLAYS["sidecar"])
    spec = one(docs, "Deployment", "llm-gateway")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 600 + 10  # the route timeout, and the pause
    args = envoy_container()["args"]
    assert args[args.index("--drain-strategy") + 1] == "immediate"


def test_the_prestop_hook_drains_and_waits_for_the_streams_in_flight(
        workdir: Path, config_path: Path, redis_port: int) -> None:
    side = start_sidecar(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0")
    envoy = None
    try:
        c = envoy_container()
        args = c["args"]
        drain = tuple(a for flag in DRAIN_ARGS_OF_THE_POD for a in (flag, args[args.index(flag) + 1]))
        envoy = start_envoy(workdir, config_path, side, args=drain)
        key = http("POST", side.admin + "/key/generate", {"models": ["gpt-4"]},
                   {"Authorization": f"Bearer {MASTER_KEY}"}).json()["key"]
        streamed: dict = {}

        def stream() -> None:  # a streamed answer of several seconds
            streamed["answer"] = http("POST", envoy.url + "/v1/chat/completions",
                                      {"model": "gpt-4", "stream": True, "messages": [{"role": "user", "content": "x"}]},
                                      {"Authorization": f"Bearer {key}", "x-fake-delay": "0.5"}, timeout=60)
            streamed["at"] = time.monotonic()

        thread = threading.Thread(target=stream)
        thread.start()
        time.sleep(0.5)
        hook = c["lifecycle"]["preStop"]["exec"]["command"]
        started = time.monotonic()
        ran = subprocess.run(hook, env={"ENVOY_ADMIN": f"127.0.0.1:{envoy.admin_port}", "PRESTOP_PAUSE_S": "0",
                                        "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
        returned = time.monotonic()
        thread.join(60)
        assert ran.returncode == 0, ran.stderr
        answer = streamed["answer"]
        assert answer.status == 200 and "data: [DONE]" in answer.text  # the stream ran to its end
        assert streamed["at"] <= returned + 0.5 and returned - started >= 1.0  # the hook waited for it
        time.sleep(6)  # past --drain-time-s: the listener is closed
        assert not tcp_open(envoy.port)
    finally:
        if envoy is not None:
            envoy.proc.stop()
        side.proc.stop()


def test_envoys_metrics_are_scraped_without_its_admin_api(workdir: Path, config_path: Path,
                                                         redis_port: int) -> None:
    stats_port = free_port()
    config = yaml.safe_load(config_path.read_text())
    config.setdefault("extauthz_settings", {})["envoy_stats_port"] = stats_port
    with_stats = workdir / f"config-stats-{stats_port}.yaml"
    with_stats.write_text(yaml.safe_dump(config))
    side = start_sidecar(workdir, with_stats, f"redis://127.0.0.1:{redis_port}/0")
    envoy = None
    try:
        envoy = start_envoy(workdir, with_stats, side, envoy_admin=free_port())  # (the stats listener names it)
        base = f"http://127.0.0.1:{stats_port}"
        scraped = http("GET", base + "/stats/prometheus")
        assert scraped.status == 200 and "envoy_http_downstream_rq_total" in scraped.text
        for method, path in (("GET", "/config_dump"), ("GET", "/stats"), ("POST", "/quitquitquit"),
                             ("POST", "/drain_listeners"), ("POST", "/stats/prometheus"),
                             ("GET", "/stats/prometheus/../../config_dump"), ("GET", "/clusters")):
            assert http(method, base + path).status == 404, (method, path)
        assert http("GET", f"http://127.0.0.1:{envoy.admin_port}/ready").status == 200  # Envoy still up
    finally:
        if envoy is not None:
            envoy.proc.stop()
        side.proc.stop()
