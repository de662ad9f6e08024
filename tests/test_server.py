"""The serving process: start-up, ports, shutdown."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from tests import harness


def test_sigterm_exits_zero(workdir: Path, config_path: Path, redis_port: int) -> None:
    side = harness.start_sidecar(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0")
    side.proc.popen.send_signal(signal.SIGTERM)
    assert side.proc.popen.wait(15) == 0
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
    from tests.test_check_grpc import check_request

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
        assert side.proc.popen.wait(15) == 0
        side.proc.stop()
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
