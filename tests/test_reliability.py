"""Faults injected for real: Redis killed, partitioned or stalled, the sidecar stopped,
the config reloaded under load. Nothing may be wrongly allowed."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import redis

from tests import harness
from tests.harness import MASTER_KEY, Stack, http, redis_asleep, wait_until
from tests.tcp_proxy import TcpProxy


def chat(stack: Stack, key: str, model: str = "gpt-4") -> tuple[int, str]:
    r = http("POST", stack.envoy.url + "/v1/chat/completions", {"model": model, "messages": []},
             {"Authorization": f"Bearer {key}"})
    code = r.json()["error"]["code"] if r.status != 200 and r.headers.get("content-type", "").startswith(
        "application/json") else ""
    return r.status, code


def admin(stack: Stack, path: str, body: object) -> harness.Response:
    return http("POST", stack.sidecar.admin + path, body, {"Authorization": f"Bearer {MASTER_KEY}"})


def readiness(stack: Stack) -> tuple[int, dict]:
    r = http("GET", stack.sidecar.admin + "/health/readiness")
    return r.status, r.json()


def test_redis_killed_then_restarted(workdir: Path, config_path: Path) -> None:
    port = harness.free_port()
    aof = ("--appendonly", "yes", "--appendfsync", "always")
    redis_proc = harness.start_redis_at(workdir, port, *aof)
    stack = harness.start_stack(workdir, config_path, f"redis://127.0.0.1:{port}/0")
    try:
        key = admin(stack, "/key/generate", {"models": ["gpt-4"]}).json()["key"]
        wait_until(lambda: readiness(stack)[1]["cache"]["trusted"])
        assert chat(stack, key) == (200, "")  # now cached

        redis_proc.popen.send_signal(signal.SIGKILL)
        redis_proc.popen.wait()
        stale = [chat(stack, key) for _ in range(25)]
        assert stale == [(200, "")] * 25, "a cached key keeps working within max_stale"
        assert chat(stack, "sk-never-seen-before") == (503, "authz_unavailable")
        assert admin(stack, "/key/generate", {}).status == 503
        status, ready = readiness(stack)
        assert status == 503 and ready["redis"] == "unreachable"
        assert ready["cache"]["stale_served"] >= 25

        redis_proc = harness.start_redis_at(workdir, port, *aof)
        recovery = wait_until(lambda: readiness(stack)[0] == 200 and readiness(stack)[1]["cache"]["trusted"])
        print(f"\nredis restart: {ready['cache']['stale_served']} stale decisions served, "
              f"sidecar trusted its cache again {recovery * 1000:.0f} ms after redis was back")
        assert chat(stack, key) == (200, "")
        assert admin(stack, "/key/block", {"key": key}).status == 200
        assert chat(stack, key) == (401, "key_blocked")
    finally:
        stack.stop()
        redis_proc.stop()


def test_key_revoked_while_cut_off_is_denied_after_recovery(workdir: Path, config_path: Path,
                                                            redis_port: int) -> None:
    direct = redis.Redis(port=redis_port)
    with TcpProxy(harness.free_port(), redis_port) as proxy:
        stack = harness.start_stack(workdir, config_path, f"redis://127.0.0.1:{proxy.listen_port}/0")
        try:
            created = admin(stack, "/key/generate", {"models": ["gpt-4"]}).json()
            wait_until(lambda: readiness(stack)[1]["cache"]["trusted"])
            assert chat(stack, created["key"]) == (200, "")

            proxy.cut()
            record = f"extauthz:key:{created['token']}"
            direct.set(record, json.dumps({**json.loads(direct.get(record)), "blocked": True}))
            assert chat(stack, created["key"]) == (200, "")  # stale by design, bounded by max_stale
            proxy.restore()
            wait_until(lambda: chat(stack, created["key"]) == (401, "key_blocked"))
        finally:
            stack.stop()
            direct.close()


def test_a_connection_lost_at_exec_is_a_503_never_a_second_run(workdir: Path, config_path: Path,
                                                                 redis_port: int) -> None:
    """The admin write's EXEC reaches Redis and commits; its answer is lost. Nobody can tell
    whether it committed, so the answer is 503, not a transaction run twice (a create would
    then answer 409, an audit entry would be written twice)."""
    with TcpProxy(harness.free_port(), redis_port) as proxy:
        side = harness.start_sidecar(workdir, config_path, f"redis://127.0.0.1:{proxy.listen_port}/7")
        try:
            headers = {"Authorization": f"Bearer {harness.MASTER_KEY}"}
            key = http("POST", side.admin + "/key/generate", {"models": ["gpt-4"]}, headers).json()
            proxy.cut_after = b"EXEC"
            r = http("POST", side.admin + "/key/block", {"key": key["key"]}, headers)
            assert r.status == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
            assert proxy.cut_after is None  # the cut happened
            info = http("GET", side.admin + f"/key/info?key={key['key']}", None, headers).json()["info"]
            assert info["blocked"] is True  # it had committed
            trail = http("GET", side.admin + f"/audit?target={key['token']}", None, headers).json()["entries"]
            assert [e["route"] for e in trail] == ["/key/block", "/key/generate"]  # once each
        finally:
            side.proc.stop()


def test_stale_decisions_stop_after_max_stale(workdir: Path, config_path: Path, redis_port: int) -> None:
    with TcpProxy(harness.free_port(), redis_port) as proxy:
        stack = harness.start_stack(workdir, config_path, f"redis://127.0.0.1:{proxy.listen_port}/0",
                                    {"EXTAUTHZ_MAX_STALE_S": "0.5"})
        try:
            key = admin(stack, "/key/generate", {"models": ["gpt-4"]}).json()["key"]
            wait_until(lambda: readiness(stack)[1]["cache"]["trusted"])
            assert chat(stack, key) == (200, "")
            proxy.cut()
            wait_until(lambda: chat(stack, key) == (503, "authz_unavailable"), timeout=5)
        finally:
            proxy.restore()
            stack.stop()


def test_slow_redis_answers_503_before_envoy_times_out(workdir: Path, config_path: Path) -> None:
    port = harness.free_port()
    redis_proc = harness.start_redis_at(workdir, port, "--enable-debug-command", "yes")
    stack = harness.start_stack(workdir, config_path, f"redis://127.0.0.1:{port}/0")
    stall = redis.Redis(port=port)
    try:
        sleeper = threading.Thread(target=lambda: stall.execute_command("DEBUG", "SLEEP", "2"))
        sleeper.start()
        wait_until(lambda: redis_asleep(port), timeout=2)
        r = http("POST", stack.envoy.url + "/v1/chat/completions", {"model": "gpt-4", "messages": []},
                 {"Authorization": "Bearer sk-uncached-key"})
        sleeper.join()
        # The sidecar's own answer (its Redis timeout), not Envoy's timeout, whose error
        # says the authorization service "did not answer".
        assert r.status == 503 and r.json()["error"]["code"] == "authz_unavailable", r.text
        assert "temporarily unavailable" in r.json()["error"]["message"], r.text
    finally:
        stall.close()
        stack.stop()
        redis_proc.stop()


def test_sidecar_down_means_503_and_nothing_forwarded(workdir: Path, config_path: Path, redis_port: int,
                                                      upstream_port: int) -> None:
    stack = harness.start_stack(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0")
    try:
        key = admin(stack, "/key/generate", {"models": ["gpt-4"]}).json()["key"]
        stack.sidecar.proc.stop()
        http("DELETE", f"http://127.0.0.1:{upstream_port}/__fake/requests")
        for _ in range(5):
            assert chat(stack, key)[0] == 503
        assert http("GET", f"http://127.0.0.1:{upstream_port}/__fake/requests").json() == []
    finally:
        stack.stop()


def test_config_reload_under_load(workdir: Path, config_path: Path, redis_port: int) -> None:
    config = workdir / "reloadable.yaml"
    original = config_path.read_text()
    config.write_text(original)
    stack = harness.start_stack(workdir, config, f"redis://127.0.0.1:{redis_port}/0")
    results: list[tuple[int, str]] = []
    stop = threading.Event()
    try:
        key = admin(stack, "/key/generate", {"models": ["beta-models"]}).json()["key"]
        assert chat(stack, key, "gpt-4o") == (403, "model_not_allowed")

        def load() -> None:
            while not stop.is_set():
                results.append(chat(stack, key, "gpt-4"))

        worker = threading.Thread(target=load)
        worker.start()
        wait_until(lambda: len(results) >= 50)
        # gpt-4o joins the key's access group: the key gains it without being re-issued.
        config.write_text(original.replace(
            "      api_key: sk-upstream-gpt-4o\n",
            "      api_key: sk-upstream-gpt-4o\n    model_info:\n      access_groups: [\"beta-models\"]\n"))
        stack.sidecar.proc.popen.send_signal(signal.SIGHUP)
        wait_until(lambda: chat(stack, key, "gpt-4o") == (200, ""))
        during = len(results)
        wait_until(lambda: len(results) >= during + 50)

        config.write_text("model_list: [oops")
        stack.sidecar.proc.popen.send_signal(signal.SIGHUP)
        wait_until(lambda: readiness(stack)[1]["config"]["reload_failures"] == 1)
        assert chat(stack, key, "gpt-4o") == (200, "")  # the last good config keeps running
        stop.set()
        worker.join()
        assert len(results) >= 100 and set(results) == {(200, "")}
        assert readiness(stack)[1]["config"]["reloads"] == 1
        assert "config reload failed" in stack.sidecar.proc.log_text()
    finally:
        stop.set()
        stack.stop()
