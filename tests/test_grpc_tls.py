"""Check over mutual TLS, for the standalone mode where proxies reach extauthz over the
network (an allow carries the provider credentials): a real Envoy rendered with
authz_tls_* calls a sidecar serving grpc_tls_*; a client without a certificate, or with
one from another CA, gets no answer; gRPC health stays plaintext on its own port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from tests.harness import MASTER_KEY, ROOT, Sidecar, check_request, free_port, http, start_envoy, start_sidecar


@pytest.fixture(scope="module")
def stranger(pki: Path) -> Path:
    """A client certificate signed by another CA."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "stranger.key", "-out", "stranger.csr", "-subj",
            "/CN=stranger")
    openssl("x509", "-req", "-in", "stranger.csr", "-CA", "other-ca.crt", "-CAkey", "other-ca.key",
            "-CAcreateserial", "-out", "stranger.crt", "-days", "2")
    return pki


@pytest.fixture(scope="module")
def tls_sidecar(workdir: Path, config_path: Path, redis_port: int, pki: Path) -> Iterator[tuple[Sidecar, int]]:
    health = free_port()
    side = start_sidecar(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0", {
        "EXTAUTHZ_GRPC_TLS_CERT_FILE": str(pki / "server.crt"), "EXTAUTHZ_GRPC_TLS_KEY_FILE": str(pki / "server.key"),
        "EXTAUTHZ_GRPC_TLS_CLIENT_CA_FILE": str(pki / "ca.crt"), "EXTAUTHZ_HEALTH_PORT": str(health)})
    yield side, health
    side.proc.stop()


def check_over(channel: grpc.Channel) -> None:
    external_auth_pb2_grpc.AuthorizationStub(channel).Check(
        check_request({"authorization": "Bearer sk-none"}, b'{"model": "gpt-4"}'), timeout=5)


def test_envoy_checks_over_mutual_tls(workdir: Path, config_path: Path, pki: Path,
                                      tls_sidecar: tuple[Sidecar, int]) -> None:
    side, _ = tls_sidecar
    config = yaml.safe_load(config_path.read_text())
    config.setdefault("extauthz_settings", {}).update(
        authz_tls_ca_file=str(pki / "ca.crt"), authz_tls_server_name="localhost",
        authz_tls_cert_file=str(pki / "client.crt"), authz_tls_key_file=str(pki / "client.key"))
    with_tls = workdir / "config-authz-tls.yaml"
    with_tls.write_text(yaml.safe_dump(config))
    envoy = start_envoy(workdir, with_tls, side)
    try:
        key = http("POST", side.admin + "/key/generate", {"models": ["gpt-4"]},
                   {"Authorization": f"Bearer {MASTER_KEY}"}).json()["key"]
        r = http("POST", envoy.url + "/v1/chat/completions", {"model": "gpt-4", "messages": []},
                 {"Authorization": f"Bearer {key}"})
        assert r.status == 200, r.text
        denied = http("POST", envoy.url + "/v1/chat/completions", {"model": "gpt-4o", "messages": []},
                      {"Authorization": f"Bearer {key}"})
        assert denied.status == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    finally:
        envoy.proc.stop()


def test_no_answer_without_a_certificate_the_ca_signed(pki: Path, stranger: Path,
                                                       tls_sidecar: tuple[Sidecar, int]) -> None:
    side, _ = tls_sidecar
    address = f"localhost:{side.grpc_port}"
    ca = (pki / "ca.crt").read_bytes()
    attempts = {
        "plaintext": grpc.insecure_channel(address),
        "no client certificate": grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)),
        "another CA's certificate": grpc.secure_channel(address, grpc.ssl_channel_credentials(
            ca, (stranger / "stranger.key").read_bytes(), (stranger / "stranger.crt").read_bytes())),
    }
    for what, channel in attempts.items():
        with channel, pytest.raises(grpc.RpcError) as refused:
            check_over(channel)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, what
    signed = grpc.ssl_channel_credentials(ca, (pki / "client.key").read_bytes(), (pki / "client.crt").read_bytes())
    with grpc.secure_channel(address, signed) as channel:
        check_over(channel)  # answered (a deny for an unknown key), not refused


def test_health_stays_plaintext_on_its_own_port(tls_sidecar: tuple[Sidecar, int]) -> None:
    _, health = tls_sidecar
    with grpc.insecure_channel(f"127.0.0.1:{health}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_settings_that_cannot_work_stop_the_start(workdir: Path, config_path: Path, pki: Path) -> None:
    for env in ({"EXTAUTHZ_GRPC_TLS_CERT_FILE": str(pki / "server.crt")},
                {"EXTAUTHZ_GRPC_TLS_CLIENT_CA_FILE": str(pki / "ca.crt")},
                {"EXTAUTHZ_GRPC_TLS_CERT_FILE": str(pki / "server.crt"), "EXTAUTHZ_GRPC_TLS_KEY_FILE": "/nonexistent"}):
        served = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--config", str(config_path),
                                 "--grpc-port", "0", "--admin-port", "0"],
                                capture_output=True, text=True, cwd=ROOT, timeout=60,
                                env={"PATH": "/usr/bin:/bin", "EXTAUTHZ_METRICS_PORT": "0", "MASTER_KEY": "sk-1234",
                                     **env})
        assert served.returncode == 1 and "grpc_tls" in served.stderr + served.stdout, served
        assert "Traceback" not in served.stderr
