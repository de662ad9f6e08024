"""Real processes for integration tests: redis-server, the fake upstream, the sidecar, Envoy.

The fake upstream, the sidecar and Envoy bind port 0 and report the ports they got
(a ready file, Envoy's admin address file and its listener list), so no port is picked
free here and taken by someone else before the process binds it; their readiness is
what the process itself reports. redis-server, which cannot report an ephemeral port,
gets a port picked free. Every process is stopped by PID; one that does not come up
fails the test with its log.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import pytest
import redis

from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EXAMPLE_CONFIG = ROOT / "examples" / "config.yaml"
MASTER_KEY = "sk-1234"


@lru_cache(maxsize=None)
def installed(tool: str, script: str) -> str:
    """The path of a tool the tests run (``$TOOL`` in upper case overrides it); a test
    fails, naming the script that installs it, when there is none."""
    path = os.environ.get(tool.upper()) or shutil.which(tool)
    if not path:
        pytest.fail(f"{tool} is not installed: run scripts/{script} (make test does), "
                    f"or set {tool.upper()} to a {tool} binary", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every process a test started, so that none outlives the run when a test fails before
# stopping what it started (conftest.py stops them all at the end of the session).
STARTED: list["Proc"] = []


def stop_all() -> None:
    for proc in reversed(STARTED):
        proc.stop(sig_timeout=5)
    STARTED.clear()


@dataclass
class Proc:
    name: str
    args: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen | None = field(default=None, init=False)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> "Proc":
        self._log_file = open(self.log, "ab")
        self.popen = subprocess.Popen(self.args, stdout=self._log_file, stderr=subprocess.STDOUT,
                                      env=self.env, cwd=ROOT, start_new_session=True)
        STARTED.append(self)
        return self

    def log_text(self) -> str:
        """The whole log: a tail can lose the line a test looks for to later output."""
        return self.log.read_text(errors="replace")

    def log_tail(self) -> str:
        return self.log_text()[-4000:]

    def wait_ready(self, probe: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; log:\n{self.log_tail()}")
            if probe():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout}s; log:\n{self.log_tail()}")

    def stop(self, sig_timeout: float = 10.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(sig_timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if not self._log_file.closed:
            self._log_file.close()
        return self.popen.returncode


def wait_until(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> float:
    """Poll ``condition`` until it holds; the seconds it took. Fails past ``timeout``, which
    is a bound for a loaded machine, not a measurement."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what} not reached in {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - start


def check_request(headers: dict[str, str], raw_body: bytes = b"", body: str = "",
                  path: str = "/v1/chat/completions") -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy sends one for a POST to ``path``."""
    req = external_auth_pb2.CheckRequest()
    http_req = req.attributes.request.http
    http_req.method, http_req.path, http_req.host = "POST", path, "gateway"
    http_req.headers.update({":path": path, ":method": "POST", **headers})
    http_req.raw_body, http_req.body = raw_body, body
    return req


def redis_asleep(port: int) -> bool:
    """Whether the redis-server on ``port`` is stalled (DEBUG SLEEP) and not answering."""
    try:
        with redis.Redis(port=port, socket_timeout=0.05, retry=None) as probe:
            probe.ping()
            return False
    except redis.RedisError:
        return True


def tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         raw: bytes | None = None, timeout: float = 10.0) -> Response:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None and not req.has_header("Content-type"):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Response(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode())
    except urllib.error.HTTPError as e:
        return Response(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode())


def http_ok(url: str) -> bool:
    try:
        return http("GET", url, timeout=1).status == 200
    except OSError:
        return False


def start_redis(workdir: Path) -> tuple[Proc, int]:
    port = free_port()
    redis = shutil.which("redis-server")
    if redis is None:
        raise RuntimeError("redis-server is not installed: run scripts/ensure-redis-server")
    proc = Proc("redis-server", [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(workdir)], workdir / f"redis-{port}.log").start()
    proc.wait_ready(lambda: _redis_ping(port))
    return proc, port


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


_serial = iter(range(10**9))


def ready_file(workdir: Path, what: str) -> Path:
    return workdir / f"{what}-{os.getpid()}-{next(_serial)}.ready.json"


def reported(proc: Proc, path: Path) -> dict[str, Any]:
    """Wait for the process to say it serves (its ready file), and read what it says."""
    proc.wait_ready(path.exists)
    return json.loads(path.read_text())


def start_upstream(workdir: Path) -> tuple[Proc, int]:
    ready = ready_file(workdir, "upstream")
    proc = Proc("fake upstream", [sys.executable, str(ROOT / "tools" / "fake_upstream.py"), "--port", "0",
                                  "--ready-file", str(ready)], workdir / f"{ready.stem}.log").start()
    return proc, reported(proc, ready)["port"]


def write_config(workdir: Path, upstream_port: int, text: str | None = None) -> Path:
    """The example config, pointed at this test's fake upstream."""
    text = text if text is not None else EXAMPLE_CONFIG.read_text()
    path = workdir / f"config-{upstream_port}.yaml"
    path.write_text(text.replace("127.0.0.1:8081", f"127.0.0.1:{upstream_port}"))
    return path


@dataclass
class Sidecar:
    proc: Proc
    grpc_port: int
    admin_port: int
    metrics_port: int

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


def start_sidecar(workdir: Path, config: Path, redis_url: str, extra_env: dict[str, str] | None = None,
                  extra_args: list[str] | None = None) -> Sidecar:
    args = list(extra_args or [])
    # Metrics stay on a port picked here: 0 turns them off. Workers share fixed ports.
    metrics_port = int((extra_env or {}).get("EXTAUTHZ_METRICS_PORT") or free_port())
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {}), "EXTAUTHZ_METRICS_PORT": str(metrics_port)}
    if "--workers" in args:
        grpc_port, admin_port = free_port(), free_port()
        proc = Proc("extauthz", [sys.executable, "-m", "extauthz", "serve", "--config", str(config),
                                 "--redis-url", redis_url, "--grpc-port", str(grpc_port),
                                 "--admin-port", str(admin_port), *args], workdir / f"extauthz-{grpc_port}.log",
                    env).start()
        proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{admin_port}/health/liveliness") and tcp_open(grpc_port))
        return Sidecar(proc, grpc_port, admin_port, metrics_port)
    ready = ready_file(workdir, "extauthz")
    proc = Proc("extauthz", [sys.executable, "-m", "extauthz", "serve", "--config", str(config),
                             "--redis-url", redis_url, "--grpc-port", "0", "--admin-port", "0",
                             "--ready-file", str(ready), *args], workdir / f"{ready.stem}.log", env).start()
    ports = reported(proc, ready)
    return Sidecar(proc, ports["grpc_port"], ports["admin_port"], ports.get("metrics_port", 0))


@dataclass
class Envoy:
    proc: Proc
    port: int
    admin_port: int
    config: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def render_envoy(config: Path, out: Path, listen: int, sidecar: Sidecar, envoy_admin: int) -> Path:
    rendered = subprocess.run(
        [sys.executable, "-m", "extauthz", "envoy-config", "--config", str(config), "--listen-port", str(listen),
         "--authz-port", str(sidecar.grpc_port), "--admin-port", str(sidecar.admin_port),
         "--envoy-admin-port", str(envoy_admin)], capture_output=True, text=True, cwd=ROOT)
    if rendered.returncode != 0:
        raise RuntimeError(f"envoy-config failed: {rendered.stderr}")
    out.write_text(rendered.stdout)
    return out


def start_envoy(workdir: Path, config: Path, sidecar: Sidecar, env: dict[str, str] | None = None,
                args: tuple[str, ...] = (), envoy_admin: int = 0) -> Envoy:
    """``env``: added to Envoy's environment (AWS credentials for signing, say); ``args``:
    more command-line options; ``envoy_admin``: its admin port (0: any, read back)."""
    name = ready_file(workdir, "envoy").stem
    bootstrap = render_envoy(config, workdir / f"{name}.yaml", 0, sidecar, envoy_admin)
    admin_file = workdir / f"{name}.admin"
    proc = Proc("envoy", [str(BIN / "envoy"), "-c", str(bootstrap), "--disable-hot-restart", "--log-level", "warn",
                          "--admin-address-path", str(admin_file), *args], workdir / f"{name}.log",
                {**os.environ, **env} if env else None).start()
    proc.wait_ready(lambda: admin_file.exists() and admin_file.read_text().strip() != "")
    admin_port = int(admin_file.read_text().strip().rsplit(":", 1)[1])
    proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{admin_port}/ready"))
    return Envoy(proc, listener_port(admin_port, "ingress"), admin_port, bootstrap)


def listener_port(admin_port: int, name: str) -> int:
    """The port Envoy bound for a listener configured on port 0, from its admin API."""
    statuses = http("GET", f"http://127.0.0.1:{admin_port}/listeners?format=json").json()["listener_statuses"]
    (status,) = [s for s in statuses if s["name"] == name]
    return int(status["local_address"]["socket_address"]["port_value"])


@dataclass
class Stack:
    """A sidecar and an Envoy of a test's own, on a Redis it names."""

    sidecar: Sidecar
    envoy: Envoy

    def stop(self) -> None:
        self.envoy.proc.stop()
        self.sidecar.proc.stop()


def start_stack(workdir: Path, config: Path, redis_url: str, extra_env: dict[str, str] | None = None,
                envoy_env: dict[str, str] | None = None) -> Stack:
    side = start_sidecar(workdir, config, redis_url, extra_env)
    try:
        return Stack(side, start_envoy(workdir, config, side, envoy_env))
    except Exception:
        side.proc.stop()
        raise


def start_redis_at(workdir: Path, port: int, *extra: str) -> Proc:
    """A redis-server on a given port (to restart one where it was), with extra options."""
    data = workdir / f"redis-data-{port}"
    data.mkdir(exist_ok=True)
    proc = Proc("redis-server", [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                                 "127.0.0.1", "--save", "", "--dir", str(data), *extra],
                workdir / f"redis-{port}.log").start()
    proc.wait_ready(lambda: _redis_ping(port))
    return proc
