"""Azure OpenAI with Entra ID: the sidecar keeps a client-credential token fresh
(azure-identity) and sends it as Authorization: Bearer; a fake Entra token endpoint (over
TLS, as azure-identity requires) checks the client secret, a fake Azure sees the tokens."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import Gateway
from tests.harness import ROOT, Proc, http, ready_file, reported, start_stack, wait_until

MASTER = "sk-entra-master"
TENANT, CLIENT, SECRET = "tenant-extauthz", "app-extauthz", "entra-client-secret-not-real-0001"
LIFETIME_S = 4


def self_signed(workdir: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = workdir / "entra-cert.pem", workdir / "entra-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def entra(workdir: Path, redis_port: int, upstream_port: int) -> Iterator[Gateway]:
    import sys
    cert, key = self_signed(workdir)
    ready = ready_file(workdir, "entra")
    idp = Proc("fake entra", [sys.executable, str(ROOT / "tools" / "fake_upstream.py"), "--port", "0",
                              "--ready-file", str(ready), "--tls-cert", str(cert), "--tls-key", str(key)],
               workdir / f"{ready.stem}.log").start()
    idp_port = reported(idp, ready)["port"]
    register = urllib.request.Request(
        f"https://127.0.0.1:{idp_port}/__fake/entra/clients", method="POST",
        data=json.dumps({"client_id": CLIENT, "client_secret": SECRET, "tenant_id": TENANT,
                         "lifetime": LIFETIME_S}).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(register, context=ssl.create_default_context(cafile=str(cert)), timeout=10) as r:
        assert r.status == 200
    base = f"http://127.0.0.1:{upstream_port}"
    config = {
        "model_list": [
            {"model_name": "gpt-4o-entra", "litellm_params": {
                "model": "azure/gpt-4o-deployment", "api_base": base, "api_version": "2024-10-21",
                "tenant_id": TENANT, "client_id": CLIENT, "client_secret": "os.environ/TEST_ENTRA_SECRET",
                "azure_authority_host": f"https://127.0.0.1:{idp_port}"}},
            {"model_name": "gpt-4o-static-token", "litellm_params": {
                "model": "azure/gpt-4o-deployment", "api_base": base, "api_version": "2024-10-21",
                "azure_ad_token": "os.environ/TEST_ENTRA_STATIC"}},
        ],
        "general_settings": {"master_key": MASTER},
    }
    path = workdir / "entra.yaml"
    path.write_text(yaml.safe_dump(config))
    stack = start_stack(workdir, path, f"redis://127.0.0.1:{redis_port}/12",
                        {"TEST_ENTRA_SECRET": SECRET, "TEST_ENTRA_STATIC": "static-entra-token-0001",
                         "REQUESTS_CA_BUNDLE": str(cert)})
    try:
        yield Gateway(stack.envoy, upstream_port), idp_port  # type: ignore[misc]
    finally:
        stack.stop()
        idp.stop()
    assert SECRET not in stack.sidecar.proc.log_text()


def test_entra_client_credential_tokens_reach_azure_and_are_refreshed(entra) -> None:
    g, idp_port = entra
    key = g.admin("/key/generate", {"models": ["gpt-4o-entra"]}, key=MASTER).json()["key"]
    wait_until(lambda: g.chat(key, "gpt-4o-entra").status == 200, what="a first Entra token")
    g.forget_upstream()
    deadline = time.monotonic() + 2.5 * LIFETIME_S
    while time.monotonic() < deadline:
        assert g.chat(key, "gpt-4o-entra").status == 200
        time.sleep(0.25)
    seen = g.upstream_seen()
    tokens = {s["headers"]["authorization"].removeprefix("Bearer ") for s in seen}
    assert all("api-key" not in s["headers"] for s in seen)
    assert all(s["path"].startswith("/openai/deployments/gpt-4o-deployment/chat/completions") for s in seen)
    assert len(tokens) >= 2 and all(t.startswith("eyJ.entra-fake-") for t in tokens)
    # Each was issued by the token endpoint, for this client, and was valid when used (the
    # refresh runs ahead of expiry): the last one still is.
    last = seen[-1]["headers"]["authorization"].removeprefix("Bearer ")
    check = urllib.request.Request(f"https://127.0.0.1:{idp_port}/__fake/entra/valid?token={last}")
    cert = Path(g.envoy.config).parent / "entra-cert.pem"
    with urllib.request.urlopen(check, context=ssl.create_default_context(cafile=str(cert)), timeout=10) as r:
        assert json.loads(r.read())["valid"] is True


def test_a_static_azure_ad_token_is_sent_as_bearer(entra) -> None:
    g, _ = entra
    key = g.admin("/key/generate", {"models": ["gpt-4o-static-token"]}, key=MASTER).json()["key"]
    g.forget_upstream()
    assert g.chat(key, "gpt-4o-static-token").status == 200
    (seen,) = g.upstream_seen()
    assert seen["headers"]["authorization"] == "Bearer static-entra-token-0001" and "api-key" not in seen["headers"]
