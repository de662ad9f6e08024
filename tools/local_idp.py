"""A local identity provider for trying JWTs with `make run-jwt`: an RSA key made at start,
its OIDC discovery document and key set, and a token endpoint that signs whatever claims
it is asked for. For a workstation only: it listens on 127.0.0.1 and checks no one.

    GET  /.well-known/openid-configuration   issuer, jwks_uri, token_endpoint
    GET  /keys                               the key set Envoy verifies tokens with
    POST /token                              {"sub": "alice", "groups": ["ml"], "roles": [...],
                                              "scope": "...", "expires_in": 3600} -> access_token

Standard library only (RS256 by hand: `make run` installs the runtime alone), so the
tokens are real RS256 JWTs that Envoy's jwt_authn verifies like any provider's.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

AUDIENCE = "extauthz-local"
# PKCS#1 v1.5's DigestInfo prefix for SHA-256 (RFC 8017, section 9.2, note 1).
SHA256_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")
SMALL_PRIMES = [p for p in range(3, 2000, 2) if all(p % d for d in range(3, int(p ** 0.5) + 1, 2))]


def probably_prime(n: int, rounds: int = 40) -> bool:
    if any(n % p == 0 for p in SMALL_PRIMES):
        return n in SMALL_PRIMES
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(rounds):  # Miller-Rabin
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def prime(bits: int) -> int:
    while True:
        candidate = secrets.randbits(bits) | (1 << (bits - 1)) | (1 << (bits - 2)) | 1
        if probably_prime(candidate):
            return candidate


class RsaKey:
    """RSA-2048 with e = 65537: n, d, and the JWK of its public half."""

    def __init__(self) -> None:
        e = 65537
        while True:
            p, q = prime(1024), prime(1024)
            phi = (p - 1) * (q - 1)
            if p != q and phi % e != 0:
                break
        self.n, self.e, self.d = p * q, e, pow(e, -1, phi)
        self.kid = secrets.token_hex(8)

    def jwk(self) -> dict[str, str]:
        return {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
                "n": b64(self.n.to_bytes(256, "big")), "e": b64(self.e.to_bytes(3, "big"))}

    def sign(self, message: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 with SHA-256."""
        digest = SHA256_PREFIX + hashlib.sha256(message).digest()
        padded = b"\x00\x01" + b"\xff" * (256 - len(digest) - 3) + b"\x00" + digest
        return pow(int.from_bytes(padded, "big"), self.d, self.n).to_bytes(256, "big")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(key: RsaKey, issuer: str, claims: dict[str, Any]) -> str:
    now = int(time.time())
    lifetime = int(claims.pop("expires_in", 3600))
    payload = {"iss": issuer, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + lifetime, **claims}
    header = {"alg": "RS256", "typ": "JWT", "kid": key.kid}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}".encode()
    return f"{signing_input.decode()}.{b64(key.sign(signing_input))}"


def serve(port: int, ready_file: str | None) -> None:
    key = RsaKey()

    class Handler(BaseHTTPRequestHandler):
        def issuer(self) -> str:
            return f"http://127.0.0.1:{self.server.server_address[1]}"

        def answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/.well-known/openid-configuration":
                self.answer(200, {"issuer": self.issuer(), "jwks_uri": f"{self.issuer()}/keys",
                                  "token_endpoint": f"{self.issuer()}/token",
                                  "id_token_signing_alg_values_supported": ["RS256"]})
            elif self.path == "/keys":
                self.answer(200, {"keys": [key.jwk()]})
            else:
                self.answer(404, {"error": "not_found"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/token":
                self.answer(404, {"error": "not_found"})
                return
            try:
                claims = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str):
                    raise ValueError
                lifetime = claims.get("expires_in", 3600)
                if isinstance(lifetime, bool) or not isinstance(lifetime, int) or abs(lifetime) > 10 ** 8:
                    raise ValueError
            except ValueError:
                self.answer(400, {"error": "invalid_request", "error_description": 'send JSON claims with a "sub" '
                                  '(and "expires_in" in seconds, an integer)'})
                return
            self.answer(200, {"access_token": token(key, self.issuer(), claims), "token_type": "Bearer",
                              "expires_in": lifetime})

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    if ready_file:
        with open(ready_file + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"port": server.server_address[1]}, f)
        os.replace(ready_file + ".tmp", ready_file)
    server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0, help="0: any free port (see --ready-file)")
    p.add_argument("--ready-file", help='once serving, write {"port": N} there')
    args = p.parse_args()
    serve(args.port, args.ready_file)


if __name__ == "__main__":
    main()
