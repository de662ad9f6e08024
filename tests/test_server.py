"""The serving process: start-up, ports, shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import grpc
import pytest
import redis

from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from tests import harness
from tests.harness import check_request, http, redis_asleep, wait_until


def test_sigterm_exits_zero(workdir: Path, config_path: Path, redis_port: int) -> None:
    side = harness.start_sidecar(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0")
    side.proc.popen.send_signal(signal.SIGTERM)
    assert side.proc.popen.wait(30) == 0
    log = side.proc.log_text()
    assert "shutting down" in log and "Traceback" not in log
    assert not harness.tcp_open(side.grpc_port) and not harness.tcp_open(side.admin_port)


def test_port_in_use_fails_with_a_message(workdir: Path, config_path: Path, redis_port: int) -> None:
    first = harness.start_sidecar(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0")
    second = harness.Proc("extauthz", [sys.executable, "-m", "extauthz", "serve", "--config", str(config_path),
                                       "--grpc-port", str(first.grpc_port), "--admin-port", str(harness.free_port())],
                          workdir / "port-clash.log")
    try:
        second.start()
        assert second.popen.wait(30) == 1
        assert "cannot start" in second.log_text() and "Traceback" not in second.log_text()
    finally:
        second.stop()
        first.proc.stop()


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return found


def test_workers_share_the_port_and_stop_together(workdir: Path, config_path: Path, redis_port: int) -> None:
    import grpc

    from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2_grpc
    side = harness.start_sidecar(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0",
                                 extra_args=["--workers", "2"])
    try:
        workers = children_of(side.proc.popen.pid)
        assert len(workers) == 2
        before = {pid: cpu_ticks(pid) for pid in workers}
        request = check_request({"authorization": "Bearer sk-1234"}, b'{"model": "gpt-4"}')
        for _ in range(16):  # separate connections: the kernel spreads connections over the workers
            with grpc.insecure_channel(f"127.0.0.1:{side.grpc_port}",
                                       options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                for _ in range(100):
                    assert stub.Check(request, timeout=5).status.code == 0
        busy = [pid for pid in workers if cpu_ticks(pid) > before[pid]]
        assert busy == workers
    finally:
        side.proc.popen.send_signal(signal.SIGTERM)
        assert side.proc.popen.wait(30) == 0
        side.proc.stop()
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


# -- start-up fails before anything is served, in one line ---------------------------------

def held_port() -> socket.socket:
    """A port some other process holds, as another sidecar on the host network would."""
    holder = socket.create_server(("0.0.0.0", 0))
    return holder


def failed_start(workdir: Path, config_path: Path, env: dict[str, str], args: list[str] | None = None) -> str:
    grpc_port, admin_port = harness.free_port(), harness.free_port()
    proc = harness.Proc("extauthz", [sys.executable, "-m", "extauthz", "serve", "--config", str(config_path),
                                     "--grpc-port", str(grpc_port), "--admin-port", str(admin_port), *(args or [])],
                        workdir / f"failed-start-{grpc_port}.log", {**os.environ, **env})
    try:
        proc.start()
        assert proc.popen.wait(30) == 1
        log = proc.log_text()
        assert "Traceback" not in log and "never awaited" not in log and "serving Check" not in log, log
        assert not harness.tcp_open(grpc_port) and not harness.tcp_open(admin_port)
        return log
    finally:
        proc.stop()


def test_a_taken_metrics_port_stops_the_start_before_anything_is_served(workdir: Path, config_path: Path,
                                                                        redis_port: int) -> None:
    with held_port() as holder:
        port = holder.getsockname()[1]
        log = failed_start(workdir, config_path, {"EXTAUTHZ_METRICS_PORT": str(port),
                                                  "EXTAUTHZ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})
    assert f"cannot listen for metrics on 0.0.0.0:{port}: address in use" in log
    assert len([line for line in log.splitlines() if "cannot start" in line]) == 1


def test_a_taken_metrics_port_stops_the_workers_too(workdir: Path, config_path: Path, redis_port: int) -> None:
    with held_port() as holder:
        port = holder.getsockname()[1]
        log = failed_start(workdir, config_path, {"EXTAUTHZ_METRICS_PORT": str(port),
                                                  "EXTAUTHZ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"},
                           ["--workers", "2"])
    assert f"cannot listen for metrics on 0.0.0.0:{port}: address in use" in log


def test_a_taken_admin_port_or_an_unusable_redis_url_stops_the_start(workdir: Path, config_path: Path,
                                                                    redis_port: int) -> None:
    with held_port() as holder:
        port = holder.getsockname()[1]
        log = failed_start(workdir, config_path, {"EXTAUTHZ_METRICS_PORT": "0", "EXTAUTHZ_ADMIN_HOST": "0.0.0.0",
                                                  "EXTAUTHZ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"},
                           ["--admin-port", str(port)])
    assert f"cannot listen for the admin API on 0.0.0.0:{port}: address in use" in log
    log = failed_start(workdir, config_path, {"EXTAUTHZ_METRICS_PORT": "0",
                                              "EXTAUTHZ_REDIS_URL": "rediss+nope://user:s3cret@127.0.0.1:1/0"})
    assert "unusable Redis settings" in log and "must start with redis://" in log and "s3cret" not in log


def test_metrics_port_zero_turns_the_listener_off(workdir: Path, config_path: Path, redis_port: int) -> None:
    """Two sidecars on one host network, neither serving metrics, both start."""
    sides = [harness.start_sidecar(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0",
                                   {"EXTAUTHZ_METRICS_PORT": "0"}) for _ in range(2)]
    try:
        for side in sides:
            assert http("GET", side.admin + "/health/liveliness").status == 200
            assert "metrics" not in side.proc.log_text()
    finally:
        for side in sides:
            side.proc.stop()


def test_health_on_its_own_port_serves_nothing_else(workdir: Path, config_path: Path, redis_port: int) -> None:
    """A sidecar keeps Check on 127.0.0.1 (its allows carry provider credentials) and
    answers the kubelet's gRPC probes on the pod's address, on a port that serves health only."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health_port = harness.free_port()
    side = harness.start_sidecar(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0",
                                 {"EXTAUTHZ_HEALTH_PORT": str(health_port), "EXTAUTHZ_GRPC_HOST": "127.0.0.1"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            for service in ("", "envoy.service.auth.v3.Authorization"):
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                   timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as refused:  # no Check there
                external_auth_pb2_grpc.AuthorizationStub(channel).Check(
                    check_request({"authorization": "Bearer sk-x"}, b'{"model": "gpt-4"}'), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        side.proc.popen.send_signal(signal.SIGTERM)
        assert side.proc.popen.wait(30) == 0
        assert not harness.tcp_open(health_port)
    finally:
        side.proc.stop()


# -- shutdown ends every task and flushes the decision log ---------------------------------------

def test_sigterm_ends_every_task_and_flushes_the_decision_log(workdir: Path, config_path: Path,
                                                              redis_port: int) -> None:
    side = harness.start_sidecar(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0",
                                 {"PYTHONWARNINGS": "always", "PYTHONASYNCIODEBUG": "0"})
    with grpc.insecure_channel(f"127.0.0.1:{side.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        denied = stub.Check(check_request({"x-request-id": "last-before-sigterm", "authorization": "Bearer sk-x"},
                                          b'{"model": "gpt-4"}'), timeout=5)
        assert denied.denied_response.status.code == 401
    side.proc.popen.send_signal(signal.SIGTERM)  # before the decision log's next flush
    assert side.proc.popen.wait(30) == 0
    side.proc.stop()
    log = side.proc.log.read_text()
    for trouble in ("Task was destroyed", "never awaited", "Traceback", "Exception ignored", "Unclosed"):
        assert trouble not in log, log[-3000:]
    decisions = [json.loads(line) for line in log.splitlines() if '"extauthz.decision"' in line]
    assert any(d.get("request_id") == "last-before-sigterm" for d in decisions), log[-3000:]


# -- checks that never reach the decision are answered or counted ---------------------------------

def scrape(side: harness.Sidecar, sample: str) -> float:
    text = http("GET", f"http://127.0.0.1:{side.metrics_port}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample))


def test_a_check_too_large_is_a_counted_json_deny(workdir: Path, config_path: Path, redis_port: int) -> None:
    side = harness.start_sidecar(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0",
                                 {"EXTAUTHZ_MAX_REQUEST_BYTES": "1000"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{side.grpc_port}", options=[
                ("grpc.max_send_message_length", -1)]) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            big = check_request({"authorization": "Bearer sk-1234"}, b'{"model": "gpt-4", "x": "'
                                + b"A" * (10 * 1024 * 1024) + b'"}')
            answer = stub.Check(big, timeout=30)
        assert answer.denied_response.status.code == 413
        assert json.loads(answer.denied_response.body)["error"]["code"] == "body_too_large"
        sample = 'extauthz_decisions_total{code="body_too_large",outcome="deny"}'
        wait_until(lambda: scrape(side, sample) == 1)
    finally:
        side.proc.stop()


def test_a_check_envoy_gave_up_on_is_counted(workdir: Path, config_path: Path) -> None:
    port = harness.free_port()
    redis_proc = harness.start_redis_at(workdir, port, "--enable-debug-command", "yes")
    side = harness.start_sidecar(workdir, config_path, f"redis://127.0.0.1:{port}/0",
                                 {"EXTAUTHZ_REDIS_TIMEOUT_MS": "3000"})
    stall = redis.Redis(port=port)
    try:
        sleeper = threading.Thread(target=lambda: stall.execute_command("DEBUG", "SLEEP", "2"))
        sleeper.start()
        wait_until(lambda: redis_asleep(port))
        with grpc.insecure_channel(f"127.0.0.1:{side.grpc_port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Check(check_request({"authorization": "Bearer sk-never-seen"}, b'{"model": "gpt-4"}'),
                           timeout=0.3)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        sleeper.join()
        wait_until(lambda: scrape(side, 'grpc_server_handled_total{grpc_code="DEADLINE_EXCEEDED"') == 1)
    finally:
        stall.close()
        side.proc.stop()
        redis_proc.stop()


def test_sigterm_while_redis_is_gone_still_ends_the_process(workdir: Path, config_path: Path) -> None:
    """The invalidation channel keeps reconnecting while Redis is down; stopping must end
    it (a lost cancellation once left a stopped sidecar reconnecting forever)."""
    port = harness.free_port()
    redis_proc = harness.start_redis_at(workdir, port)
    side = harness.start_sidecar(workdir, config_path, f"redis://127.0.0.1:{port}/0")
    redis_proc.stop()
    wait_until(lambda: not http("GET", side.admin + "/health/readiness").json()["cache"]["trusted"])
    side.proc.popen.send_signal(signal.SIGTERM)
    assert side.proc.popen.wait(30) == 0
    side.proc.stop()
    log = side.proc.log_text()
    assert "did not end" not in log and "Traceback" not in log, log[-2000:]
