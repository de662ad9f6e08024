"""Route permissions, as LiteLLM writes them: a key's ``allowed_routes`` (and the presets
its ``key_type`` stands for), and a JWT's ``team_allowed_routes`` / ``admin_allowed_routes``.

A pattern is a path (that path and, unless they are model calls, the paths under it:
``/chat/completions``, ``/my-pass-through``), a path ending in ``*`` (a prefix), a path
with ``{placeholder}`` segments (one whole segment each), or the name of one of LiteLLM's
route groups (``llm_api_routes``, ``info_routes``...). Pure: a route and the endpoint the
request was classified as come in, a yes or no comes out; matching is linear in the
pattern's and the route's length.
"""

from __future__ import annotations

import re
from functools import lru_cache

from extauthz.domain import providers
from extauthz.domain.endpoints import Endpoint, PassThrough, unsafe_path

# The listing and model-information routes (the admin API or, for JWTs, the check answers them).
LISTING_ROUTES = ("/v1/models", "/models")
MODEL_INFO_ROUTES = ("/model/info", "/v1/model/info", "/model_group/info")
# Reads of the caller's own records (LiteLLM's info_routes, those this gateway serves).
INFO_ROUTES = ("/key/info", "/key/list", "/team/info", "/team/list", "/user/info")
MANAGEMENT_PREFIXES = ("/key/", "/team/", "/user/")

# LiteLLM's route groups this gateway serves something of; a group it serves nothing of
# is accepted (a LiteLLM config names it) and admits nothing here.
GROUPS = frozenset({
    "llm_api_routes", "openai_routes", "anthropic_routes", "google_routes", "mapped_pass_through_routes",
    "info_routes", "management_routes", "public_routes", "model_info_routes",
    "spend_tracking_routes", "global_spend_tracking_routes", "mcp_routes", "agent_routes", "ui_routes",
    "key_management_routes", "self_managed_routes",
})
# key_type -> the allowed_routes LiteLLM stores for it.
KEY_TYPES: dict[str, tuple[str, ...] | None] = {
    "llm_api": ("llm_api_routes",), "management": ("management_routes",), "read_only": ("info_routes",),
    "default": None,
}
_PLACEHOLDER = re.compile(r"\{[^/{}]+\}")


def groups_of(route: str, endpoint: Endpoint | PassThrough | None) -> frozenset[str]:
    """The route groups a request belongs to (``route`` without its query)."""
    if isinstance(endpoint, PassThrough):
        return frozenset({"llm_api_routes", "mapped_pass_through_routes"})
    if endpoint is not None:
        family = {providers.OPENAI: "openai_routes", providers.ANTHROPIC: "anthropic_routes",
                  providers.GEMINI: "google_routes", providers.VERTEX_RAW_PREDICT: "google_routes",
                  providers.BEDROCK_INVOKE: "mapped_pass_through_routes"}[endpoint.api_format]
        return frozenset({"llm_api_routes", family})
    return _admin_groups(route)


@lru_cache(maxsize=256)
def _admin_groups(route: str) -> frozenset[str]:
    if route in LISTING_ROUTES or route.startswith(tuple(r + "/" for r in LISTING_ROUTES)):
        return frozenset({"llm_api_routes", "openai_routes", "info_routes"})
    if route in MODEL_INFO_ROUTES:
        return frozenset({"llm_api_routes", "model_info_routes", "info_routes"})
    if route.startswith("/health/"):
        return frozenset({"public_routes", "info_routes"})
    if route.startswith(MANAGEMENT_PREFIXES):
        groups = {"management_routes"}
        if route in INFO_ROUTES:
            groups.add("info_routes")
        if route.startswith("/key/"):
            groups.update(("key_management_routes", "self_managed_routes"))
        return frozenset(groups)
    return frozenset()


def problem(patterns: object) -> str | None:
    """Why a list of route patterns is unusable, or None."""
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p.strip() for p in patterns):
        return "expected a list of paths, path patterns or route group names"
    unknown = [p for p in patterns if not p.startswith("/") and p not in GROUPS]
    if unknown:
        return f"unknown route group(s) {unknown}; known: {sorted(GROUPS)}, or a path starting with '/'"
    odd = [p for p in patterns if ("{" in p or "}" in p)
           and not all(_PLACEHOLDER.fullmatch(s) or ("{" not in s and "}" not in s) for s in p.split("/"))]
    if odd:
        return f"pattern(s) {odd}: a {{placeholder}} must be a whole path segment, as in /v1/models/{{model}}"
    return None


def permits(patterns: tuple[str, ...], path: str, endpoint: Endpoint | PassThrough | None) -> bool:
    route = path.partition("?")[0]
    if unsafe_path(route):  # "/key/info/../generate": Envoy normalizes first; a path that is not, no pattern admits
        return False
    groups: frozenset[str] | None = None
    for pattern in patterns:
        if pattern.startswith("/"):
            if _path_matches(pattern, route, isinstance(endpoint, Endpoint)):
                return True
        else:
            if groups is None:
                groups = groups_of(route, endpoint)
            if pattern in groups:
                return True
    return False


def _path_matches(pattern: str, route: str, model_call: bool) -> bool:
    if pattern.endswith("*"):
        return route.startswith(pattern[:-1])
    if "{" in pattern:
        wanted, given = pattern.split("/"), route.split("/")
        return len(wanted) == len(given) and all(
            (w.startswith("{") and g != "") if w.startswith("{") else w == g
            for w, g in zip(wanted, given, strict=True))
    if route == pattern:
        return True
    # The paths under a path (LiteLLM's rule: "/v1", a pass-through prefix), but a route of
    # its own does not reach model calls below it: "/v1/models" lists models, and must not
    # admit Gemini's "/v1/models/gemini-2.0-flash:generateContent".
    base = pattern.rstrip("/")
    return route.startswith(base + "/") and not (model_call and _admin_groups(base))
