"""Offline validation of custom resources against the CRD schemas vendored in tests/crds/
(see tests/crds/README.md), with the API server's structural-schema semantics:

- an object with ``properties`` (or with none, and no ``additionalProperties``) takes no
  other field unless ``x-kubernetes-preserve-unknown-fields`` is set: the API server
  would prune an unknown field (or, with ``kubectl apply``'s server-side field validation,
  refuse it), and here it is refused, so a misspelt or misplaced field is caught;
- ``x-kubernetes-int-or-string`` accepts an integer or a string, ``nullable`` a null;
- ``x-kubernetes-list-type: set`` wants unique items, ``map`` unique keys
  (``x-kubernetes-list-map-keys``);
- ``metadata`` at the top is an object (ObjectMeta is the API server's, not the CRD's),
  ``x-kubernetes-embedded-resource`` objects take apiVersion, kind and metadata.

Not evaluated: the CEL rules (``x-kubernetes-validations``; :func:`cel_rules` lists them),
``format`` (the API server checks a few, such as ``int32``, ``date-time``, ``uri``),
defaulting, and the ratcheting of unchanged fields.
"""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
from jsonschema import validators

CRDS = Path(__file__).resolve().parent / "crds"
# The API groups whose kinds must have a vendored schema.
GROUPS = ("gateway.networking.k8s.io", "gateway.envoyproxy.io", "monitoring.coreos.com", ".istio.io")
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")


class NoSchema(LookupError):
    """No vendored schema for an apiVersion and kind of a group that needs one."""


def governed(api_version: str) -> bool:
    """Whether objects of ``api_version`` are validated against a vendored CRD schema."""
    group = api_version.rpartition("/")[0]
    return group.endswith(GROUPS[-1]) or group in GROUPS[:-1]


def schema_files(api_version: str, kind: str) -> list[Path]:
    """The vendored schemas of one kind at one version: one per Gateway API channel, one
    for the others."""
    group, _, version = api_version.rpartition("/")
    name = f"{kind}-{version}.json"
    found = sorted(p for p in [CRDS / group / name, *(CRDS / group).glob(f"*/{name}")] if p.is_file())
    if not found:
        known = sorted(str(p.relative_to(CRDS)) for p in (CRDS / group).rglob(f"{kind}-*.json")) if group else []
        raise NoSchema(f"no vendored CRD schema for {api_version} {kind} in {CRDS.name}/"
                       f" (vendored versions of {kind}: {known or 'none'}); add it with tools/vendor_crds.py")
    return found


def re2_to_python(pattern: str) -> str:
    """Go's RE2 takes a flag group anywhere (``^(?i)(abort|warn)?$``); Python only first."""
    flag_group = re.compile(r"\(\?([a-z]+)\)")
    flags = "".join(flag_group.findall(pattern))
    return "(?" + flags + ")" + flag_group.sub("", pattern) if flags else pattern


def structural(schema: Any, *, root: bool = True, in_junctor: bool = False) -> Any:
    """A copy of an openAPIV3Schema as a JSON schema (draft 4) with the API server's
    semantics."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "definitions", "patternProperties"):
            out[key] = {k: structural(v, root=False, in_junctor=in_junctor) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = structural(value, root=False, in_junctor=in_junctor)
        elif key in JUNCTORS:
            out[key] = ([structural(v, root=False, in_junctor=True) for v in value] if isinstance(value, list)
                        else structural(value, root=False, in_junctor=True))
        elif key == "pattern" and isinstance(value, str):
            out[key] = re2_to_python(value)
        else:
            out[key] = value
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("allOf", []).append({"type": ["integer", "string"]})
    if out.pop("nullable", False):
        if "type" in out:
            out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if out.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        for field in ("apiVersion", "kind"):
            props.setdefault(field, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    list_type = out.get("x-kubernetes-list-type")
    if list_type == "set":
        out["uniqueItems"] = True
    preserve = out.get("x-kubernetes-preserve-unknown-fields") is True
    is_object = out.get("type") == "object" or "properties" in out
    if is_object and not preserve and not in_junctor and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if root:
        props = out.setdefault("properties", {})
        # ObjectMeta is validated by the API server itself, not by the CRD.
        props["metadata"] = {"type": "object"}
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
    return out


def _unique_map_keys(validator: Any, keys: Any, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen = set()
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"item {i}: duplicate entry for key {dict(zip(keys, key))}")
        seen.add(key)


def _protobuf_oneof(validator: Any, groups: Any, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    """At most one field of a protobuf oneof (the meshConfig schema derived from Istio's
    protos marks them so)."""
    if not isinstance(instance, dict):
        return
    for group in groups:
        given = [name for name in group if name in instance]
        if len(given) > 1:
            yield jsonschema.ValidationError(f"only one of {given} may be set (a protobuf oneof)")


KubernetesValidator = validators.extend(jsonschema.Draft4Validator,
                                        {"x-kubernetes-list-map-keys": _unique_map_keys,
                                         "x-protobuf-oneof": _protobuf_oneof})


@lru_cache(maxsize=None)
def validator_for(path: Path) -> Any:
    schema = structural(json.loads(path.read_text(encoding="utf-8")))
    return KubernetesValidator(schema)


def validator(openapi_schema: dict[str, Any]) -> Any:
    """A validator for an openAPIV3Schema given inline (as a CRD holds it)."""
    return KubernetesValidator(structural(copy.deepcopy(openapi_schema)))


def _where(error: jsonschema.ValidationError) -> str:
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path.lstrip(".") or "<top>"


def problems(doc: dict[str, Any]) -> list[str]:
    """What the API server would refuse in ``doc``, against every vendored schema of its
    apiVersion and kind (for Gateway API: the standard and the experimental channel).
    Raises :class:`NoSchema` for a kind that has none."""
    out = []
    for path in schema_files(doc.get("apiVersion", ""), doc.get("kind", "")):
        label = str(path.relative_to(CRDS))
        for error in sorted(validator_for(path).iter_errors(doc), key=lambda e: list(e.absolute_path)):
            message = error.message if len(error.message) <= 300 else error.message[:300] + "..."
            out.append(f"{_where(error)}: {message} (schema {label})")
    return out


def cel_rules(schema: Any, where: str = "") -> list[tuple[str, str]]:
    """The CEL rules of a schema, which are not evaluated here: (path, rule)."""
    found = []
    if isinstance(schema, dict):
        for rule in schema.get("x-kubernetes-validations", []):
            found.append((where or "<top>", rule["rule"]))
        for key, value in schema.items():
            if key in ("properties", "definitions"):
                for name, sub in value.items():
                    found += cel_rules(sub, f"{where}.{name}".lstrip("."))
            elif key in ("items", "additionalProperties"):
                found += cel_rules(value, f"{where}[]")
            elif key in JUNCTORS and isinstance(value, list):
                for sub in value:
                    found += cel_rules(sub, where)
    return found
