"""Route permissions (allowed_routes, key_type presets, team/admin_allowed_routes): pure."""

from __future__ import annotations

import pytest

from extauthz.domain import route_access
from extauthz.domain.endpoints import PassThrough, classify


def permits(patterns: list[str], path: str) -> bool:
    return route_access.permits(tuple(patterns), path, classify(path))


@pytest.mark.parametrize("path, groups", [
    ("/v1/chat/completions", {"llm_api_routes", "openai_routes"}),
    ("/chat/completions?x=1", {"llm_api_routes", "openai_routes"}),
    ("/v1/messages", {"llm_api_routes", "anthropic_routes"}),
    ("/v1beta/models/gemini-2.0-flash:generateContent", {"llm_api_routes", "google_routes"}),
    ("/model/anthropic.claude-3/invoke", {"llm_api_routes", "mapped_pass_through_routes"}),
    ("/v1/models", {"llm_api_routes", "openai_routes", "info_routes"}),
    ("/v1/models/gpt-4o", {"llm_api_routes", "openai_routes", "info_routes"}),
    ("/model_group/info", {"llm_api_routes", "model_info_routes", "info_routes"}),
    ("/key/info", {"management_routes", "info_routes", "key_management_routes", "self_managed_routes"}),
    ("/key/generate", {"management_routes", "key_management_routes", "self_managed_routes"}),
    ("/team/new", {"management_routes"}),
    ("/user/info", {"management_routes", "info_routes"}),
    ("/health/readiness", {"public_routes", "info_routes"}),
    ("/anything/else", set()),
])
def test_groups_of_a_route(path: str, groups: set[str]) -> None:
    route = path.partition("?")[0]
    assert route_access.groups_of(route, classify(path)) == groups


def test_pass_through_routes_are_llm_api_routes() -> None:
    assert route_access.groups_of("/langfuse/x", PassThrough(0, "/langfuse/x", "")) == {
        "llm_api_routes", "mapped_pass_through_routes"}


@pytest.mark.parametrize("patterns, path, allowed", [
    (["/chat/completions"], "/chat/completions", True),
    (["/chat/completions"], "/v1/chat/completions", False),       # exact or below, not a suffix
    (["/chat/completions"], "/chat/completionsX", False),         # no loose prefix
    (["/v1"], "/v1/chat/completions", True),                      # a path covers the paths below it
    (["/v1/chat/*"], "/v1/chat/completions", True),
    (["/v1/chat/*"], "/v1/embeddings", False),
    (["/v1/models/{model}"], "/v1/models/gpt-4o", True),
    (["/v1/models/{model}"], "/v1/models/a/b", False),            # a placeholder is one segment
    (["/v1/models/{model}"], "/v1/models/", False),
    (["llm_api_routes"], "/v1/embeddings", True),
    (["llm_api_routes"], "/key/generate", False),
    (["info_routes"], "/key/list", True),
    (["info_routes"], "/key/generate", False),
    (["info_routes"], "/v1/chat/completions", False),
    (["management_routes"], "/team/member_add", True),
    (["management_routes"], "/v1/chat/completions", False),
    (["spend_tracking_routes"], "/v1/chat/completions", False),   # a group served nowhere here
    (["openai_routes"], "/v1/messages", False),
    (["anthropic_routes"], "/v1/messages", True),
    (["/chat/completions"], "/chat/completions?x=/key/generate", True),  # the query is not the path
    (["/key/info"], "/key/info/../generate", False),
    (["/v1/models"], "/v1/models/gemini-2.0-flash:generateContent", False),  # not a model call below a path
    (["/v1/models"], "/v1/models/gpt-4o", True),                               # a listing below it is
    (["/v1/*"], "/v1/models/gemini-2.0-flash:generateContent", True),        # an explicit star is
    (["/v1/models/{m}"], "/v1/models/gemini-2.0-flash:generateContent", True),
    (["/openai/deployments/{d}/chat/completions"], "/openai/deployments/gpt-4o/chat/completions", True),
    (["/openai"], "/openai/deployments/gpt-4o/chat/completions", True),      # a prefix that is no route of its own
])
def test_patterns(patterns: list[str], path: str, allowed: bool) -> None:
    assert permits(patterns, path) is allowed


@pytest.mark.parametrize("patterns, ok", [
    (["llm_api_routes", "/v1/chat/completions", "/x/*", "/m/{id}"], True),
    (["llm_api_route"], False), ([""], False), (["  "], False), ("info_routes", False), ([1], False),
    (["/{a}{b}x"], False), (["/x{a}"], False), (["/{a}/{b}"], True), (["/a}"], False),
])
def test_problem(patterns: object, ok: bool) -> None:
    assert (route_access.problem(patterns) is None) is ok


def test_key_types_are_litellms_presets() -> None:
    assert route_access.KEY_TYPES == {"llm_api": ("llm_api_routes",), "management": ("management_routes",),
                                "read_only": ("info_routes",), "default": None}


def test_many_placeholders_match_segment_by_segment() -> None:
    # Adjacent placeholders are refused at input (a regex of them backtracks for seconds);
    # whole-segment ones match segment by segment.
    pattern = ("/" + "/".join("{p%d}" % i for i in range(200)),)
    assert route_access.permits(pattern, "/" + "/".join("a" * 50 for _ in range(200)), None)
    assert not route_access.permits(pattern, "/" + "/".join("a" * 50 for _ in range(199)), None)
    assert not route_access.permits(pattern, "/" + "/".join("a" * 50 for _ in range(199)) + "/", None)
