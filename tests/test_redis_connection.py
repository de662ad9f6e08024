"""Reaching Redis as production runs it: TLS (rediss://, with a CA, hostname verification,
a client certificate), an ACL user whose password comes from the environment or a
mounted file, and a unix socket, each against a real redis-server; settings that could
not do what they say refused at start-up; no password in any log."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import grpc
import pytest

from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from extauthz.records.connection import RedisTarget, UnusableTarget, redacted, target
from tests.harness import MASTER_KEY, Proc, Sidecar, check_request, free_port, http, start_sidecar, wait_until

PASSWORD = "acl-pa55word-not-for-logs"
ROOT = Path(__file__).resolve().parent.parent


def settings(**given: Any) -> SimpleNamespace:
    base = {"redis_url": "redis://127.0.0.1:6379/0", "redis_username": "", "redis_password": "",
            "redis_password_file": "", "redis_tls_ca_file": "", "redis_tls_cert_file": "", "redis_tls_key_file": "",
            "redis_tls_verify_hostname": True, "redis_mode": "standalone", "redis_sentinels": (),
            "redis_sentinel_master": "mymaster", "redis_sentinel_password": "", "redis_cluster_nodes": ()}
    return SimpleNamespace(**{**base, **given})


# -- the target, pure ---------------------------------------------------------------------

def test_credentials_leave_the_url_and_never_reach_the_description(tmp_path: Path) -> None:
    found = target(settings(redis_url=f"rediss://svc:{PASSWORD}@redis.internal:6380/2"))
    assert found.url == "rediss://redis.internal:6380/2"
    assert found.options()["username"] == "svc" and found.options()["password"] == PASSWORD
    assert found.options()["ssl_check_hostname"] is True and found.options()["ssl_cert_reqs"] == "required"
    assert PASSWORD not in found.describe() and PASSWORD not in repr(found)
    assert found.describe() == ("standalone rediss://redis.internal:6380/2; user svc with a password; "
                                "TLS (system CAs, hostname verified)")
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    from_file = target(settings(redis_username="svc", redis_password_file=str(secret)))
    assert from_file.password == PASSWORD and from_file.url == "redis://127.0.0.1:6379/0"
    unix = target(settings(redis_url="unix:///run/redis/redis.sock?db=3"))
    assert unix.url == "unix:///run/redis/redis.sock?db=3" and unix.options() == {}


@pytest.mark.parametrize("given,problem", [
    ({"redis_url": "http://redis:6379"}, "must start with"),
    ({"redis_tls_ca_file": "/etc/hosts"}, "not rediss://"),
    ({"redis_url": "rediss://r:1/0", "redis_tls_cert_file": "/etc/hosts"}, "go together"),
    ({"redis_url": "rediss://r:1/0", "redis_tls_ca_file": "/no/such/ca.pem"}, "cannot be read"),
    ({"redis_url": "redis://:a@r:1/0", "redis_password": "b"}, "more than once"),
    ({"redis_url": "redis://alice@r:1/0", "redis_username": "bob"}, "different users"),
    ({"redis_password_file": "/no/such/secret"}, "cannot be read"),
])
def test_settings_that_could_not_do_what_they_say_are_refused(given: dict, problem: str) -> None:
    with pytest.raises(UnusableTarget, match=problem):
        target(settings(**given))


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(UnusableTarget, match="empty"):
        target(settings(redis_password_file=str(empty)))


# -- against real redis-servers -----------------------------------------------------------

def redis_with(workdir: Path, *args: str) -> Proc:
    data = workdir / f"redis-data-{free_port()}"
    data.mkdir()
    proc = Proc("redis-server", [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--save", "",
                                 "--dir", str(data), *args], data / "redis.log").start()
    return proc


@pytest.fixture(scope="module")
def tls_redis(workdir: Path, pki: Path) -> Iterator[int]:
    """TLS only (no plain port), client certificates required, the default user off and
    one ACL user limited to the sidecar's keys and the invalidation channel."""
    port = free_port()
    proc = redis_with(workdir, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(pki / "server.crt"),
                      "--tls-key-file", str(pki / "server.key"), "--tls-ca-cert-file", str(pki / "ca.crt"),
                      "--tls-auth-clients", "yes", "--user", "default", "off",
                      "--user", "extauthz", "on", f">{PASSWORD}", "~extauthz:*",
                      "&__redis__:invalidate", "+@all")
    proc.wait_ready(lambda: tls_ping(pki, port))
    yield port
    proc.stop()


def tls_ping(pki: Path, port: int) -> bool:
    result = subprocess.run(["redis-cli", "--tls", "--cacert", str(pki / "ca.crt"), "--cert", str(pki / "client.crt"),
                             "--key", str(pki / "client.key"), "-h", "localhost", "-p", str(port), "--user",
                             "extauthz", "--pass", PASSWORD, "--no-auth-warning", "PING"],
                            capture_output=True, text=True)
    return result.stdout.strip() == "PONG"


def tls_env(pki: Path, port: int, host: str = "localhost", **extra: str) -> dict[str, str]:
    return {"EXTAUTHZ_REDIS_URL": f"rediss://{host}:{port}/0", "EXTAUTHZ_REDIS_USERNAME": "extauthz",
            "EXTAUTHZ_REDIS_PASSWORD": "os.environ/REDIS_ACL_PASSWORD", "REDIS_ACL_PASSWORD": PASSWORD,
            "EXTAUTHZ_REDIS_TLS_CA_FILE": str(pki / "ca.crt"), "EXTAUTHZ_REDIS_TLS_CERT_FILE": str(pki / "client.crt"),
            "EXTAUTHZ_REDIS_TLS_KEY_FILE": str(pki / "client.key"), **extra}


def sidecar_with(workdir: Path, config_path: Path, env: dict[str, str]) -> Sidecar:
    # The URL comes from the environment (EXTAUTHZ_REDIS_URL); --redis-url would override it.
    return start_sidecar(workdir, config_path, env["EXTAUTHZ_REDIS_URL"], env)


def admin(side: Sidecar, path: str, body: Any = None, method: str = "POST") -> Any:
    return http(method, side.admin + path, body, {"Authorization": f"Bearer {MASTER_KEY}"})


def checked(side: Sidecar, key: str) -> tuple[int, str]:
    with grpc.insecure_channel(f"127.0.0.1:{side.grpc_port}") as channel:
        response = external_auth_pb2_grpc.AuthorizationStub(channel).Check(check_request(
            {"authorization": f"Bearer {key}", "content-type": "application/json"},
            raw_body=json.dumps({"model": "gpt-4"}).encode()), timeout=10)
    if response.WhichOneof("http_response") == "ok_response":
        return 200, "ok"
    return response.denied_response.status.code, json.loads(response.denied_response.body)["error"]["code"]


def test_tls_with_an_acl_user_serves_and_invalidates(workdir: Path, config_path: Path, pki: Path,
                                                     tls_redis: int) -> None:
    side = sidecar_with(workdir, config_path, tls_env(pki, tls_redis))
    try:
        assert admin(side, "/health/readiness", method="GET").status == 200
        r = admin(side, "/key/generate", {"models": ["gpt-4"]})
        assert r.status == 200, r.text
        key = r.json()["key"]
        assert checked(side, key) == (200, "ok")
        assert admin(side, "/key/block", {"key": key}).status == 200
        # The block reached the cache through tracking on the TLS connection.
        wait_until(lambda: checked(side, key) == (401, "key_blocked"), what="the block seen over TLS")
        log = side.proc.log_text()
        assert "rediss://localhost" in log and "user extauthz with a password" in log and PASSWORD not in log
    finally:
        side.proc.stop()


@pytest.mark.parametrize("change", ["other CA", "no hostname match", "no client certificate", "wrong password"])
def test_a_connection_that_does_not_verify_fails_closed(workdir: Path, config_path: Path, pki: Path,
                                                        tls_redis: int, change: str) -> None:
    env = tls_env(pki, tls_redis)
    if change == "other CA":
        env["EXTAUTHZ_REDIS_TLS_CA_FILE"] = str(pki / "other-ca.crt")
    elif change == "no hostname match":  # the certificate names localhost, not 127.0.0.1
        env = tls_env(pki, tls_redis, host="127.0.0.1")
    elif change == "no client certificate":
        del env["EXTAUTHZ_REDIS_TLS_CERT_FILE"], env["EXTAUTHZ_REDIS_TLS_KEY_FILE"]
    else:
        env["REDIS_ACL_PASSWORD"] = "not-the-password"
    side = sidecar_with(workdir, config_path, env)
    try:
        assert admin(side, "/health/readiness", method="GET").status == 503
        assert checked(side, "sk-any-key-at-all") == (503, "authz_unavailable")
        assert admin(side, "/key/generate", {}).status == 503
        assert PASSWORD not in side.proc.log_text()
    finally:
        side.proc.stop()
    if change == "no hostname match":  # the operator's explicit choice: then it connects
        side = sidecar_with(workdir, config_path, {**env, "EXTAUTHZ_REDIS_TLS_VERIFY_HOSTNAME": "false"})
        try:
            assert admin(side, "/health/readiness", method="GET").status == 200
            assert "hostname NOT verified" in side.proc.log_text()
        finally:
            side.proc.stop()


def test_a_password_from_a_mounted_file_and_a_unix_socket(workdir: Path, config_path: Path) -> None:
    sock = workdir / f"redis-{free_port()}.sock"
    secret = workdir / "redis-password"
    secret.write_text(PASSWORD + "\n")
    proc = redis_with(workdir, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                      "--requirepass", PASSWORD)
    try:
        proc.wait_ready(sock.exists)
        env = {"EXTAUTHZ_REDIS_URL": f"unix://{sock}?db=0", "EXTAUTHZ_REDIS_PASSWORD_FILE": str(secret)}
        side = sidecar_with(workdir, config_path, env)
        try:
            wait_until(lambda: admin(side, "/health/readiness", method="GET").status == 200, what="readiness")
            key = admin(side, "/key/generate", {"models": ["gpt-4"]}).json()["key"]
            assert checked(side, key) == (200, "ok")
            assert PASSWORD not in side.proc.log_text()
        finally:
            side.proc.stop()
    finally:
        proc.stop()


def test_unusable_settings_stop_the_start_and_check_config_says_why(config_path: Path) -> None:
    env = {"EXTAUTHZ_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:1/0", "EXTAUTHZ_REDIS_TLS_CA_FILE": "/etc/hosts",
           "PATH": "/usr/bin:/bin"}
    checked_config = subprocess.run([sys.executable, "-m", "extauthz", "check-config", "--config", str(config_path)],
                                    capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert checked_config.returncode == 1
    assert "error: redis: redis_tls_ca_file set, but redis_url is not rediss://" in checked_config.stdout
    served = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--config", str(config_path)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert served.returncode != 0 and "not rediss://" in served.stderr
    for output in (checked_config.stdout, checked_config.stderr, served.stdout, served.stderr):
        assert PASSWORD not in output


@pytest.mark.parametrize("password", ["ab/cd", "1234/abcd", "/lead", "x?y#z", "p@ss:w/rd?#", "%2Fenc%40oded"])
def test_a_password_pasted_unencoded_is_read_whole_and_never_shown(password: str) -> None:
    """A generated password often holds '/', '?', '#' or '@': the URL's user information
    ends at its last '@', so none of it is taken for a host, a path or a query."""
    url = f"redis://extauthz:{password}@redis.internal:6379/2"
    found = target(settings(redis_url=url))
    from urllib.parse import unquote
    assert found.url == "redis://redis.internal:6379/2" and found.username == "extauthz"
    assert found.password == unquote(password)
    for shown in (found.describe(), found.endpoint, redacted(url), repr(found)):
        assert password not in shown and unquote(password) not in shown


def test_the_target_type_never_shows_its_password() -> None:
    assert PASSWORD not in repr(RedisTarget("redis://r:1/0", "u", PASSWORD))


def metric_value(side: Sidecar, name: str) -> str:
    text = http("GET", f"http://127.0.0.1:{side.metrics_port}/metrics").text
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize("server,warned", [
    (("--maxmemory-policy", "allkeys-lru", "--appendonly", "yes"), ["maxmemory-policy is allkeys-lru"]),
    (("--maxmemory-policy", "noeviction", "--appendonly", "no"), ["persists nothing"]),
    (("--maxmemory-policy", "noeviction", "--appendonly", "yes"), []),
])
def test_settings_of_the_server_that_can_lose_records_are_told(workdir: Path, config_path: Path, server: tuple,
                                                               warned: list[str]) -> None:
    port = free_port()
    proc = redis_with(workdir, "--port", str(port), *server)
    try:
        proc.wait_ready(lambda: subprocess.run(["redis-cli", "-p", str(port), "PING"], capture_output=True,
                                               text=True).stdout.strip() == "PONG")
        side = start_sidecar(workdir, config_path, f"redis://127.0.0.1:{port}/0")
        try:
            def readiness() -> dict:
                return http("GET", side.admin + "/health/readiness").json()
            wait_until(lambda: readiness()["redis_tracking"] is True, what="tracking established")
            wait_until(lambda: len(readiness()["redis_warnings"]) == len(warned), what="the safety check")
            ready = readiness()
            assert ready["redis_mode"] == "standalone" and ready["redis_endpoint"] == f"redis://127.0.0.1:{port}/0"
            for expected, found in zip(warned, ready["redis_warnings"]):
                assert expected in found
            log = side.proc.log_text()
            assert all(expected in log for expected in warned)
            wait_until(lambda: metric_value(side, "extauthz_redis_tracking ") == "extauthz_redis_tracking 1.0",
                       what="the tracking metric")
            assert metric_value(side, "extauthz_redis_unsafe_settings ") == \
                f"extauthz_redis_unsafe_settings {float(len(warned))}"
            assert f'endpoint="redis://127.0.0.1:{port}/0",mode="standalone"' in metric_value(side,
                                                                                              "extauthz_redis_target")
            # Redis gone: tracking is lost, and readiness and the metric say so.
            proc.stop()
            wait_until(lambda: readiness()["redis_tracking"] is False, what="tracking lost")
            assert http("GET", side.admin + "/health/readiness").status == 503
            wait_until(lambda: metric_value(side, "extauthz_redis_tracking ") == "extauthz_redis_tracking 0.0",
                       what="the tracking metric down")
        finally:
            side.proc.stop()
    finally:
        proc.stop()


def test_credentials_in_the_query_leave_the_url_too() -> None:
    """redis-py reads ?password= as well: a URL written that way must not carry it into
    logs, readiness or metric labels."""
    found = target(settings(redis_url=f"redis://redis.internal:6379/0?password={PASSWORD}&socket_keepalive=true"))
    assert found.password == PASSWORD and found.url == "redis://redis.internal:6379/0?socket_keepalive=true"
    assert PASSWORD not in found.describe() and PASSWORD not in found.endpoint
    from extauthz.records.connection import redacted
    assert redacted(f"rediss://u:{PASSWORD}@h:1/0?password={PASSWORD}") == "rediss://h:1/0"
    assert redacted(f"unix://:{PASSWORD}@/run/redis.sock?db=1") == "unix:///run/redis.sock?db=1"
