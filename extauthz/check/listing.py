"""What a caller may call, as the listing routes answer it: /v1/models (OpenAI's shape),
/v1/models/{id} and /model_group/info (LiteLLM's). The admin API answers them for
virtual keys; the check answers them itself for JWT callers, whose claims only it sees."""

from __future__ import annotations

from typing import Any

from extauthz.check.catalog import Catalog
from extauthz.domain.endpoints import split_query

# model_info fields /model_group/info reports, as LiteLLM names them.
GROUP_INFO_FIELDS = ("mode", "input_cost_per_token", "output_cost_per_token", "max_tokens", "max_input_tokens",
                     "max_output_tokens", "supports_function_calling", "supports_vision",
                     "supports_parallel_function_calling", "supports_reasoning")
LIST_PATHS = ("/v1/models", "/models")
GROUP_INFO_PATH = "/model_group/info"


def model_entry(catalog: Catalog, name: str) -> dict[str, Any]:
    resolution = catalog.resolve(name)
    assert resolution is not None
    return {"id": name, "object": "model", "created": 0, "owned_by": resolution.group.deployments[0].provider}


def models_page(catalog: Catalog, names: list[str]) -> dict[str, Any]:
    return {"object": "list", "data": [model_entry(catalog, n) for n in names]}


def group_info(catalog: Catalog, names: list[str]) -> dict[str, Any]:
    data = []
    for name in names:
        resolution = catalog.resolve(name)
        assert resolution is not None
        group = resolution.group
        entry: dict[str, Any] = {"model_group": name,
                                 "providers": sorted({d.provider for d in group.deployments}),
                                 "access_groups": sorted(group.access_groups),
                                 "routable": bool(group.routable_deployments)}
        for d in group.deployments:
            for key in GROUP_INFO_FIELDS:
                if key in d.info and key not in entry:
                    entry[key] = d.info[key]
        entry.setdefault("mode", "chat")
        data.append(entry)
    return {"data": data}


def listing(path: str) -> tuple[str, str | None] | None:
    """("models", None), ("model", id) or ("groups", None) for a listing path, else None."""
    route, _ = split_query(path)
    if route in LIST_PATHS:
        return "models", None
    if route == GROUP_INFO_PATH:
        return "groups", None
    for prefix in LIST_PATHS:
        if route.startswith(prefix + "/") and len(route) > len(prefix) + 1:
            return "model", route[len(prefix) + 1:]
    return None
