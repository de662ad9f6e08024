"""The identity provider's keys over time, through real Envoy: a key rotation, the JWKS
endpoint down at start-up, and down later. ``public_key_ttl`` is a few seconds here, so
Envoy fetches the JWKS again within a test; every wait is a poll with a deadline meant for
a loaded machine, not a measurement.

What Envoy 1.40 does (``remote_jwks`` with ``async_fetch``, ``fast_listener: false``,
``retry_policy: {num_retries: 3}``):
- it fetches the JWKS in the background every ``public_key_ttl`` (5 s early past 5 s) and
  every second after a failed fetch; a key set it fetched never expires on its own, so the
  last good one is kept through an outage, however long;
- it does not fetch again for an unknown ``kid``: such a token is refused until the
  background fetch brings the key;
- without any key set (the IdP down since start-up), each JWT request fetches the JWKS
  itself, with the retries, and is refused when that fails.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import Gateway
from tests.harness import Response, http, start_stack, write_config
from tests.test_jwt import AUDIENCE, IdentityProvider

TTL = 2  # public_key_ttl, seconds
DEADLINE = 30.0  # for Envoy to fetch the JWKS again: a bound, not an expectation
REDIS_DB = 14

# jwt_authn's reasons, as the gateway's 401 carries them in its message.
UNKNOWN_KID = "Jwks doesn't have key to match kid or alg from Jwt"
FETCH_FAILED = "Jwks remote fetch is failed"


class SwitchableIdentityProvider(IdentityProvider):
    """An identity provider that goes down and comes back on the same listening socket:
    down, it answers 503 (``"503"``) or closes the connection unanswered (``"close"``).
    It notes each JWKS request and how it was answered."""

    def __init__(self, mode: str = "up") -> None:
        super().__init__()
        self.mode = mode
        self.fetches: list[tuple[float, str]] = []
        provider = self
        serving = self.server.RequestHandlerClass

        class Switchable(serving):  # type: ignore[misc, valid-type]
            def do_GET(self) -> None:  # noqa: N802
                mode = provider.mode
                if self.path == "/keys":
                    provider.fetches.append((time.monotonic(), mode))
                if mode == "503":
                    self.send_error(503)
                elif mode == "close":
                    self.close_connection = True  # nothing answered: the connection is closed
                else:
                    super().do_GET()

        self.server.RequestHandlerClass = Switchable

    def retire(self, kid: str) -> None:
        """The key leaves the JWKS; its private half stays, to sign tokens it no longer verifies."""
        self.jwks = [k for k in self.jwks if k["kid"] != kid]

    def failed_fetches_since(self, start: float) -> int:
        return sum(1 for t, mode in self.fetches if t >= start and mode != "up")

    def fetches_between(self, start: float, end: float) -> int:
        return sum(1 for t, _ in self.fetches if start <= t <= end)


@pytest.fixture
def make_gateway(workdir: Path, upstream_port: int, redis_port: int) -> Iterator[Callable[..., Gateway]]:
    """``make_gateway(idp, team, public_key_url)``: a sidecar and an Envoy of the test's own,
    JWTs from ``idp``, and a team calling gpt-4; stopped after the test, and the IdP with them."""
    stops: list[Callable[[], None]] = []

    def make(idp: IdentityProvider, team: str, public_key_url: Any) -> Gateway:
        stops.append(idp.server.shutdown)
        base = yaml.safe_load(write_config(workdir, upstream_port).read_text())
        base["general_settings"].update({"enable_jwt_auth": True, "litellm_jwtauth": {
            "public_key_url": public_key_url, "audience": AUDIENCE, "team_ids_jwt_field": "groups",
            "public_key_ttl": TTL}})
        path = workdir / f"jwt-keys-{team}.yaml"
        path.write_text(yaml.safe_dump(base))
        stack = start_stack(workdir, path, f"redis://127.0.0.1:{redis_port}/{REDIS_DB}")
        stops.append(stack.stop)
        g = Gateway(stack.envoy, upstream_port, stack.sidecar)
        made = g.admin("/team/new", {"team_id": team, "models": ["gpt-4"]})
        assert made.status == 200, made.text
        return g

    yield make
    for stop in reversed(stops):
        stop()


def chat(gw: Gateway, bearer: str) -> Response:
    # A JWT Envoy has no key set for waits on Envoy's own fetch and its retries: a long timeout.
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello"}]}
    return http("POST", gw.envoy.url + "/v1/chat/completions", body, {"Authorization": f"Bearer {bearer}"},
                timeout=60)


def served(gw: Gateway, bearer: str) -> bool:
    """The call is answered 200 and the provider got it, with the deployment's credential
    in place of the caller's."""
    gw.forget_upstream()
    r = chat(gw, bearer)
    if r.status != 200:
        return False
    (seen,) = gw.upstream_seen()
    assert seen["path"] == "/v1/chat/completions" and seen["body"]["model"] == "gpt-4"
    assert seen["headers"]["authorization"] == "Bearer sk-upstream-gpt-4"
    return True


def refused(gw: Gateway, token: str, reason: str) -> bool:
    """The JWT is refused as Envoy refuses one it cannot verify (401 invalid_jwt, in the
    gateway's JSON error shape, naming ``reason``), and nothing reaches the provider."""
    gw.forget_upstream()
    r = chat(gw, token)
    if r.status == 200:
        return False
    assert r.status == 401, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_jwt" and error["type"] == "authentication_error", r.text
    assert reason in error["message"], r.text
    assert gw.upstream_seen() == []
    return True


def poll(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what} not reached in {timeout} s"
        time.sleep(0.2)


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks_url(idp: IdentityProvider, issuer: str) -> list[dict[str, str]]:
    """The JWKS URL with its issuer (no discovery document to read when the Envoy config is
    rendered). Envoy compares ``iss`` byte for byte, so the issuer reaches it as configured,
    with or without a trailing slash (Auth0's has one)."""
    return [{"url": f"{idp.base}/keys", "issuer": issuer}]


def test_a_rotated_key_is_used_once_envoy_fetches_it_and_a_retired_one_is_refused(
        make_gateway: Callable[..., Gateway]) -> None:
    idp = SwitchableIdentityProvider()
    idp.add_key("old", rsa_key())
    idp.add_key("new", ec.generate_private_key(ec.SECP256R1()), publish=False)
    gw = make_gateway(idp, "keys-rotation", f"{idp.base}/.well-known/openid-configuration")
    old, new = (idp.token(kid=kid, groups=["keys-rotation"]) for kid in ("old", "new"))
    assert served(gw, old)

    # Signed with a key the IdP does not publish yet: refused, and Envoy does not fetch the
    # JWKS for it (a burst of such tokens makes no burst of fetches).
    start = time.monotonic()
    for _ in range(10):
        assert refused(gw, new, UNKNOWN_KID)
    assert idp.fetches_between(start, time.monotonic()) < 5

    # Published beside the old key: used once Envoy fetches the JWKS again; the old key
    # keeps verifying while it is published.
    idp.add_key("new", idp.keys["new"])
    poll(lambda: served(gw, new), "a token of the newly published key accepted")
    assert served(gw, old)

    # Retired: its tokens are refused once Envoy fetches the JWKS again, even unexpired ones
    # it accepted before; the new key goes on.
    idp.retire("old")
    poll(lambda: refused(gw, old, UNKNOWN_KID), "a token of the retired key refused")
    assert refused(gw, idp.token(kid="old", groups=["keys-rotation"]), UNKNOWN_KID)
    assert served(gw, new)


@pytest.mark.parametrize("down", ["503", "close"])
def test_with_the_jwks_down_at_start_up_tokens_are_refused_until_it_answers(
        make_gateway: Callable[..., Gateway], down: str) -> None:
    idp = SwitchableIdentityProvider(mode=down)
    idp.add_key("k1", rsa_key())
    team = f"keys-down-at-start-{down}"
    # Envoy comes up (ready, its listener serving) with no key set.
    gw = make_gateway(idp, team, jwks_url(idp, idp.base))
    assert idp.failed_fetches_since(0) >= 1 and all(mode == down for _, mode in idp.fetches)
    token = idp.token(kid="k1", iss=idp.base, groups=[team])
    key = gw.new_key(models=["gpt-4"])

    # Each JWT request has Envoy fetch the JWKS itself, and is refused when that fails.
    assert refused(gw, token, FETCH_FAILED)
    # A virtual key does not depend on the IdP.
    assert served(gw, key)

    idp.mode = "up"
    poll(lambda: served(gw, token), "a token accepted once the JWKS answers")
    assert served(gw, key)


def test_the_last_good_key_set_outlives_a_jwks_outage(make_gateway: Callable[..., Gateway]) -> None:
    idp = SwitchableIdentityProvider()
    idp.add_key("k1", rsa_key())
    idp.add_key("k2", rsa_key(), publish=False)
    team = "keys-down-later"
    gw = make_gateway(idp, team, jwks_url(idp, idp.issuer))  # "http://127.0.0.1:port/": a trailing slash
    token, later = (idp.token(kid=kid, groups=[team]) for kid in ("k1", "k2"))
    key = gw.new_key(models=["gpt-4"])
    assert served(gw, token)

    down = time.monotonic()
    idp.mode = "close"
    # Well past the cache duration, Envoy's fetches failing: the keys it had still verify.
    poll(lambda: idp.failed_fetches_since(down) >= 3 and time.monotonic() - down > 3 * TTL,
         "three failed fetches, past three times public_key_ttl")
    assert served(gw, token)
    assert served(gw, key)

    # A key published while the IdP is unreachable is not known yet; once the IdP answers
    # again, Envoy fetches again and uses it, and the old key goes on.
    idp.add_key("k2", idp.keys["k2"])
    assert refused(gw, later, UNKNOWN_KID)
    idp.mode = "up"
    poll(lambda: served(gw, later), "a token of the key published during the outage accepted")
    assert served(gw, token)
