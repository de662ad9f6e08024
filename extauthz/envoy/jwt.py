"""Envoy's jwt_authn filter for ``enable_jwt_auth``: Envoy verifies the tokens, the sidecar
reads their verified claims from the check's metadata and decides.

Only a bearer that looks like a JWT (``Bearer eyJ…``: a JSON header, base64url) is
required to verify; any other bearer is a virtual key and goes on as before. A JWT that
fails (signature, ``alg: none``, expiry, issuer, audience, unknown ``kid``) is answered 401
by Envoy, and the sidecar never sees it. The claims reach the sidecar only as the
filter's metadata, which a client cannot set.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any, Callable

from extauthz.config import DISCOVERY_SUFFIX, JwtAuth
from extauthz.domain import providers
from extauthz.domain.envoy_names import JWT_FILTER
from extauthz.domain.envoy_names import JWT_PAYLOAD as PAYLOAD_KEY

# A JWT's first segment is base64url JSON: it starts "eyJ" ('{"'). Anything else after
# "Bearer " is a virtual key.
JWT_BEARER = r"^Bearer eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*$"

Fetch = Callable[[str], dict[str, Any]]


def fetch_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (https or loopback, checked at load)
        return json.loads(response.read())


def jwks_sources(jwt: JwtAuth, fetch: Fetch = fetch_json) -> list[tuple[str, str]]:
    """(JWKS URL, issuer) per configured URL: an OIDC discovery document is read once, at
    rendering, for its ``jwks_uri``; its ``issuer`` must be the one its URL implies (OIDC
    Discovery requires it), which is the one the sidecar also checks."""
    out = []
    for url, issuer in zip(jwt.public_key_urls, jwt.issuers, strict=False):
        if url.rstrip("/").endswith(DISCOVERY_SUFFIX):
            try:
                doc = fetch(url)
            except (OSError, ValueError) as e:
                raise ValueError(
                    f"{url} could not be read ({getattr(e, 'reason', None) or e}): rendering reads an OIDC discovery "
                    "document for the key set's address (its jwks_uri). Render where the identity provider is "
                    "reachable, or set litellm_jwtauth.public_key_url to the jwks_uri itself (and "
                    f"litellm_jwtauth.issuer to {issuer!r}), which renders offline") from None
            jwks = doc.get("jwks_uri")
            if not isinstance(jwks, str) or providers.base_problem(jwks):
                raise ValueError(f"{url}: the discovery document names no usable jwks_uri")
            if str(doc.get("issuer", "")).rstrip("/") != issuer:
                raise ValueError(f"{url}: the discovery document's issuer is not {issuer!r}")
            out.append((jwks, str(doc["issuer"])))
        else:
            out.append((url, issuer))
    return out


def cluster_name(url: str) -> str:
    return "jwks_" + providers.upstream(url).cluster.removeprefix("upstream_")


def jwt_filter(jwt: JwtAuth, sources: list[tuple[str, str]]) -> dict[str, Any]:
    names = [f"idp{i}" for i in range(len(sources))]
    idps = {}
    for name, (jwks, issuer) in zip(names, sources, strict=True):
        provider: dict[str, Any] = {
            "remote_jwks": {
                "http_uri": {"uri": jwks, "cluster": cluster_name(jwks), "timeout": "5s"},
                "cache_duration": f"{jwt.public_key_ttl_s:g}s",
                # Keys are fetched at start-up and again every public_key_ttl, not on a
                # request's path. Envoy 1.40 does not fetch again on an unknown kid: a key the
                # IdP publishes is used within public_key_ttl (IdPs publish keys ahead of
                # signing with them).
                "async_fetch": {"fast_listener": False},
                "retry_policy": {"num_retries": 3},
            },
            "require_expiration": True,
            "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
            "forward": True,
            "payload_in_metadata": PAYLOAD_KEY,
            "clock_skew_seconds": jwt.clock_skew_s,
        }
        if issuer:
            provider["issuer"] = issuer
        if jwt.audiences:
            provider["audiences"] = list(jwt.audiences)
        idps[name] = provider
    requires: dict[str, Any] = {"provider_name": names[0]} if len(names) == 1 else {
        "requires_any": {"requirements": [{"provider_name": n} for n in names]}}
    return {"name": JWT_FILTER, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": idps,
        "rules": [{"match": {"prefix": "/", "headers": [{"name": "authorization", "string_match": {
            "safe_regex": {"regex": JWT_BEARER}}}]}, "requires": requires}],
    }}


def jwks_clusters(sources: list[tuple[str, str]],
                  upstream_cluster: Callable[[providers.Upstream], dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for jwks, _ in sources:
        cluster = upstream_cluster(providers.upstream(jwks))
        cluster["name"] = cluster_name(jwks)
        cluster["load_assignment"]["cluster_name"] = cluster["name"]
        seen.setdefault(cluster["name"], cluster)
    return list(seen.values())
