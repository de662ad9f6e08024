"""What the Istio integration ships besides plain manifests, made from the same sources
as the rendered Envoy config so that neither can drift:

- ``splice_envoy_filter``: the byte-exact model splice (``splice.lua``) as an
  EnvoyFilter on the gateway. istio-proxy is built with ``envoy.filters.http.lua`` and
  without the transform filter (istio/proxy, bazel/extension_config/
  extensions_build_config.bzl), and the transform filter would re-serialize bodies and
  fail open anyway (see docs/security.md); the Lua splice replaces the model's bytes only.
- ``merge_providers``: extauthz's extension providers merged, by name, into a mesh config
  that already has others. ``istioctl install -f`` with a partial IstioOperator, or a Helm
  values file, replaces the whole ``extensionProviders`` list; this keeps every other
  provider (an oauth2-proxy, a tracer) and replaces only extauthz's own.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any

from extauthz.domain.envoy_names import CLUSTER_HEADER

LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
SPLICE_NAME = "extauthz.splice"
# On an Istio gateway the filter runs for every request (the rendered config turns it off
# on unchecked routes instead): only a request extauthz allowed carries its cluster header
# (set on every allow, and with it a plan); any other (another host's, the admin API's)
# is left alone.
ONLY_CHECKED = f"""
-- Istio gateway: requests extauthz did not allow are left alone.
local splice_on_request = envoy_on_request
function envoy_on_request(handle)
  if handle:headers():get("{CLUSTER_HEADER}") == nil then
    return
  end
  splice_on_request(handle)
end
"""


def splice_envoy_filter(namespace: str = "istio-system",
                        selector: dict[str, str] | None = None) -> dict[str, Any]:
    """An EnvoyFilter that runs splice.lua on the selected gateway, after Istio's ext_authz
    (inserted before the router, which comes after every authorization filter)."""
    code = resources.files("extauthz.envoy").joinpath("splice.lua").read_text(encoding="utf-8") + ONLY_CHECKED
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": "extauthz-splice", "namespace": namespace},
        "spec": {
            "workloadSelector": {"labels": selector or {"istio": "ingressgateway"}},
            "configPatches": [{
                "applyTo": "HTTP_FILTER",
                "match": {"context": "GATEWAY", "listener": {"filterChain": {"filter": {
                    "name": "envoy.filters.network.http_connection_manager",
                    "subFilter": {"name": "envoy.filters.http.router"}}}}},
                "patch": {"operation": "INSERT_BEFORE", "value": {
                    "name": SPLICE_NAME,
                    "typed_config": {"@type": LUA, "default_source_code": {"inline_string": code}}}},
            }],
        },
    }


FORMATS = ("mesh", "helm", "istiooperator")


def merge_providers(doc: dict[str, Any], providers: list[dict[str, Any]], form: str = "mesh") -> dict[str, Any]:
    """``doc`` with ``providers`` in its ``extensionProviders``: each replaces the one of the
    same name, or is added; every other provider stays, in its place. ``form`` says what
    ``doc`` is: ``mesh``, a mesh config (the istio ConfigMap's ``mesh`` key); ``helm``,
    istiod's Helm values (the list under ``meshConfig``, created if absent: a list at the top
    would be ignored by the chart); ``istiooperator``, an IstioOperator (``spec.meshConfig``)."""
    if not isinstance(doc, dict):
        raise ValueError("the mesh config must be a YAML mapping")
    merged = copy.deepcopy(doc)
    if form == "mesh":
        if {"kind", "meshConfig", "spec", "data"} & set(merged):
            found = merged.get("kind") or next(k for k in ("meshConfig", "spec", "data") if k in merged)
            raise ValueError(f"this is not a mesh config (it has {found!r}): give the istio ConfigMap's data.mesh, "
                             "or say --format helm or istiooperator")
        holder = merged
    elif form == "helm":
        holder = merged.setdefault("meshConfig", {})
    elif form == "istiooperator":
        if merged.get("kind") != "IstioOperator":
            raise ValueError(f"this is a {merged.get('kind') or 'document without a kind'}, not an IstioOperator")
        holder = merged.setdefault("spec", {}).setdefault("meshConfig", {})
    else:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}")
    if not isinstance(holder, dict):
        raise ValueError("meshConfig must be a YAML mapping")
    current = holder.get("extensionProviders") or []
    if not isinstance(current, list) or not all(isinstance(p, dict) and isinstance(p.get("name"), str)
                                                for p in current):
        raise ValueError("extensionProviders must be a list of providers, each with a name")
    ours = {p["name"]: p for p in providers}
    kept = [ours.pop(p["name"]) if p["name"] in ours else p for p in current]
    holder["extensionProviders"] = kept + list(ours.values())
    return merged


def configmap_patch(merged_mesh: str) -> str:
    """A JSON merge patch of the istio ConfigMap that sets only its ``mesh`` key (every
    other key, such as meshNetworks, stays)."""
    return json.dumps({"data": {"mesh": merged_mesh}})
