from __future__ import annotations

import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from tests import harness
from tests.harness import MASTER_KEY, Envoy, Response, Sidecar, http


# Test lanes: `make test-fast` runs the tests not marked "stack" (pure logic and quick
# tools, for the edit-run loop); `make test` runs everything. A test is of the stack when
# it uses the session's processes (every such fixture needs workdir) or its module starts
# its own.
STACK_MODULES = frozenset({"test_make_run", "test_deploy", "test_monitoring", "test_litellm_differential",
                           "test_litellm_cli"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "workdir" in getattr(item, "fixturenames", ()) or item.module.__name__.rsplit(".", 1)[-1] in STACK_MODULES:
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_run() -> Iterator[None]:
    yield
    harness.stop_all()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def redis_port(workdir: Path) -> Iterator[int]:
    proc, port = harness.start_redis(workdir)
    yield port
    proc.stop()


@pytest.fixture(scope="session")
def upstream_port(workdir: Path) -> Iterator[int]:
    proc, port = harness.start_upstream(workdir)
    yield port
    proc.stop()


@pytest.fixture(scope="session")
def config_path(workdir: Path, upstream_port: int) -> Path:
    return harness.write_config(workdir, upstream_port)


@pytest.fixture(scope="session")
def sidecar(workdir: Path, config_path: Path, redis_port: int) -> Iterator[Sidecar]:
    side = harness.start_sidecar(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0")
    yield side
    side.proc.stop()


@pytest.fixture(scope="session")
def envoy(workdir: Path, config_path: Path, sidecar: Sidecar) -> Iterator[Envoy]:
    proxy = harness.start_envoy(workdir, config_path, sidecar)
    yield proxy
    proxy.proc.stop()


@dataclass
class Gateway:
    """A client of the Envoy listener, the way users call it."""

    envoy: Envoy
    upstream_port: int
    sidecar: Sidecar | None = None  # when the test started its own stack

    def admin(self, path: str, body: Any = None, method: str = "POST", key: str = MASTER_KEY) -> Response:
        return http(method, self.envoy.url + path, body, {"Authorization": f"Bearer {key}"})

    def new_key(self, **fields: Any) -> str:
        r = self.admin("/key/generate", fields)
        assert r.status == 200, r.text
        return r.json()["key"]

    def new_team(self, **fields: Any) -> str:
        r = self.admin("/team/new", fields)
        assert r.status == 200, r.text
        return r.json()["team_id"]

    def chat(self, key: str | None, model: Any, headers: dict[str, str] | None = None,
             path: str = "/v1/chat/completions") -> Response:
        all_headers = {"Authorization": f"Bearer {key}"} if key else {}
        all_headers.update(headers or {})
        body = {"model": model, "messages": [{"role": "user", "content": "Hello"}]}
        return http("POST", self.envoy.url + path, body, all_headers)

    def upstream_seen(self) -> list[dict]:
        return http("GET", f"http://127.0.0.1:{self.upstream_port}/__fake/requests").json()

    def forget_upstream(self) -> None:
        http("DELETE", f"http://127.0.0.1:{self.upstream_port}/__fake/requests")


@pytest.fixture(scope="session")
def gateway(envoy: Envoy, upstream_port: int) -> Gateway:
    return Gateway(envoy, upstream_port)


@pytest.fixture(scope="session")
def replica(workdir: Path, config_path: Path, redis_port: int, upstream_port: int) -> Iterator[Gateway]:
    """A second sidecar and Envoy on the same Redis as the session's gateway."""
    stack = harness.start_stack(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0")
    try:
        yield Gateway(stack.envoy, upstream_port, stack.sidecar)
    finally:
        stack.stop()


FLAVOURS = ("openai", "azure", "anthropic", "gemini")


@dataclass
class ProviderGateway(Gateway):
    """The gateway in front of one fake upstream per provider flavour."""

    upstreams: dict[str, int] = field(default_factory=dict)

    def seen(self, flavour: str) -> list[dict]:
        return http("GET", f"http://127.0.0.1:{self.upstreams[flavour]}/__fake/requests").json()

    def forget(self) -> None:
        for port in self.upstreams.values():
            http("DELETE", f"http://127.0.0.1:{port}/__fake/requests")

    def base(self, flavour: str) -> str:
        return f"127.0.0.1:{self.upstreams[flavour]}"


@pytest.fixture(scope="session")
def provider_gateway(workdir: Path, redis_port: int) -> Iterator[ProviderGateway]:
    procs = {}
    try:
        for flavour in FLAVOURS:
            procs[flavour] = harness.start_upstream(workdir)
        text = (Path(__file__).parent / "configs" / "providers.yaml").read_text()
        for flavour, (_, port) in procs.items():
            text = text.replace("{" + flavour + "}", f"http://127.0.0.1:{port}")
        config = workdir / "providers.yaml"
        config.write_text(text)
        side = harness.start_sidecar(workdir, config, f"redis://127.0.0.1:{redis_port}/0")
        try:
            proxy = harness.start_envoy(workdir, config, side)
            try:
                yield ProviderGateway(proxy, procs["openai"][1], side, upstreams={f: p for f, (_, p) in procs.items()})
            finally:
                proxy.proc.stop()
        finally:
            side.proc.stop()
    finally:
        for proc, _ in procs.values():
            proc.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for "localhost" only, a client certificate, and a second,
    unrelated CA."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                "-days", "2", "-subj", f"/CN={ca}")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", *(("-extfile", "san.ext") if name == "server" else ()))
    return d


@contextmanager
def example_stack(workdir: Path, upstream_port: int, redis_url: str, name: str, edit: Callable[[dict], None],
                  env: dict[str, str] | None = None) -> Iterator[Gateway]:
    """A stack of its own on examples/config.yaml pointed at the fake upstream, as ``edit``
    changes it (a module's fixture: an alias, JWTs, LiteLLM's settings...)."""
    config = yaml.safe_load(harness.EXAMPLE_CONFIG.read_text().replace("127.0.0.1:8081",
                                                                       f"127.0.0.1:{upstream_port}"))
    edit(config)
    path = workdir / f"config-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    stack = harness.start_stack(workdir, path, redis_url, env)
    try:
        yield Gateway(stack.envoy, upstream_port, stack.sidecar)
    finally:
        stack.stop()
