"""A runtime model on an HTTPS host no rendered config names, through Envoy's dynamic
forward proxy: the provider's certificate is checked against the configured CAs and the
host's name (a certificate for another name: refused, nothing sent), and the host's name is
sent as SNI. The CA is a private one, given to Envoy with extauthz_settings.upstream_ca_file."""

from __future__ import annotations

import datetime
import json
import secrets
import ssl
import sys
import urllib.request
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import Gateway
from tests.harness import (
    ROOT,
    Proc,
    ready_file,
    reported,
    start_redis,
    start_stack,
    start_upstream,
    wait_until,
    write_config,
)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def pki(workdir: Path) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """A private CA, and certificates it signed for localhost and for another name."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("extauthz test CA")).issuer_name(_name("extauthz test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), True).sign(ca_key, hashes.SHA256()))
    ca_path = workdir / f"private-ca-{secrets.token_hex(3)}.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    issued = {}
    for host in ("localhost", "elsewhere.test"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(host)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), False).sign(ca_key, hashes.SHA256()))
        cert_path, key_path = ca_path.with_name(f"{ca_path.stem}-{host}.crt"), ca_path.with_name(f"{ca_path.stem}-{host}.key")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        issued[host] = (cert_path, key_path)
    return ca_path, issued


def seen_by(port: int, ca: Path) -> list[dict]:
    """What the HTTPS fake upstream received (read over TLS, trusting the private CA; the
    test reads the wrong-name server too, so not by its name)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    with urllib.request.urlopen(f"https://localhost:{port}/__fake/requests", context=context, timeout=10) as r:
        return json.loads(r.read())


def https_upstream(workdir: Path, cert: Path, key: Path) -> tuple[Proc, int]:
    ready = ready_file(workdir, "https-upstream")
    proc = Proc("https upstream", [sys.executable, str(ROOT / "tools" / "fake_upstream.py"), "--port", "0",
                                   "--ready-file", str(ready), "--tls-cert", str(cert), "--tls-key", str(key)],
                workdir / f"{ready.stem}.log").start()
    return proc, reported(proc, ready)["port"]


def test_a_new_https_host_is_reached_with_its_name_checked(workdir: Path) -> None:
    ca, issued = pki(workdir)
    redis_proc, redis_port = start_redis(workdir)
    upstream, upstream_port = start_upstream(workdir)
    good, good_port = https_upstream(workdir, *issued["localhost"])
    wrong, wrong_port = https_upstream(workdir, *issued["elsewhere.test"])
    config = write_config(workdir, upstream_port)
    doc = yaml.safe_load(config.read_text())
    doc.setdefault("general_settings", {})["store_model_in_db"] = True
    doc.setdefault("extauthz_settings", {})["upstream_ca_file"] = str(ca)
    config.write_text(yaml.safe_dump(doc))
    stack = start_stack(workdir, config, f"redis://127.0.0.1:{redis_port}/0")
    try:
        gateway = Gateway(stack.envoy, upstream_port, stack.sidecar)
        key = gateway.new_key()
        credential = "sk-tls-" + secrets.token_hex(16)
        for name, port in (("rt-tls", good_port), ("rt-tls-wrong-name", wrong_port)):
            r = gateway.admin("/model/new", {"model_name": name, "litellm_params": {
                "model": "openai/tls-model", "api_base": f"https://localhost:{port}/v1", "api_key": credential}})
            assert r.status == 200 and r.json()["model_info"]["routable"] is True, r.text
        wait_until(lambda: gateway.chat(key, "rt-tls").status == 200, what="served over TLS")
        (seen,) = seen_by(good_port, ca)[-1:]
        assert seen["headers"]["authorization"] == f"Bearer {credential}"
        answer = gateway.chat(key, "rt-tls-wrong-name")
        assert answer.status == 503 and answer.json()["error"]["message"], answer.text
        assert seen_by(wrong_port, ca) == []
    finally:
        stack.stop()
        for proc in (wrong, good, upstream, redis_proc):
            proc.stop()
