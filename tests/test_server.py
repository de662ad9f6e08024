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
