"""LiteLLM's ``litellm_settings.default_key_generate_params`` and
``upperbound_key_generate_params``, applied to admin request bodies as LiteLLM applies
them: on /key/generate, a field the request leaves out (or empty: ``models: []``,
``metadata: {}``) takes its default, then a bounded field still missing takes its bound,
and a value over a bound is refused (400); on /key/update and /key/regenerate the values
given are checked against the bounds, nothing is filled. Every caller, the master key
included, as in LiteLLM: a minted key cannot escape the limits an operator put on keys.
"""

from __future__ import annotations

import time
from typing import Any

from extauthz.admin.schema import Invalid, duration_seconds, expires_time
from extauthz.domain.record import parse_time

DURATIONS = ("budget_duration", "duration")
# LiteLLM fills these when empty, not only when absent.
EMPTY_MEANS_DEFAULT: dict[str, Any] = {"models": [], "metadata": {}}


def with_defaults(body: dict[str, Any], defaults: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    out = dict(body)
    for name, value in defaults:
        if out.get(name) is None or (name in EMPTY_MEANS_DEFAULT and out[name] == EMPTY_MEANS_DEFAULT[name]):
            out[name] = value
    return out


def bounded(body: dict[str, Any], upperbounds: tuple[tuple[str, Any], ...], fill: bool) -> dict[str, Any]:
    """``body`` within the bounds (with ``fill``: a bounded field it lacks set to its
    bound); Invalid names the field, the value and the bound."""
    out = dict(body)
    for name, bound in upperbounds:
        value = out.get(name)
        if name == "duration" and value is None and out.get("expires") is not None:
            _expires_within(out["expires"], bound)
            continue
        if value is None and not fill and (name in out or (name == "duration" and "expires" in out)):
            # null given on an update: no limit at all, which is over any bound
            raise Invalid(f"{name} is over max limit set in config - user_value=null (none); max_value={bound} "
                          "(litellm_settings.upperbound_key_generate_params)", name)
        if value is None:
            if fill:
                out[name] = bound
            continue
        if name in DURATIONS:
            over = isinstance(value, str) and duration_seconds(value) > duration_seconds(bound)
        else:
            over = isinstance(value, (int, float)) and not isinstance(value, bool) and value > bound
        if over:
            raise Invalid(f"{name} is over max limit set in config - user_value={value}; max_value={bound} "
                          "(litellm_settings.upperbound_key_generate_params)", name)
    return out


def _expires_within(expires: Any, bound: str) -> None:
    """An ``expires`` time given instead of a duration: no later than the bound from now."""
    if not isinstance(expires, str):
        return  # (the field's own check says what it must be)
    when = parse_time(expires_time(expires))
    if when is not None and when > time.time() + duration_seconds(bound) + 60:
        raise Invalid(f"expires is over max limit set in config - user_value={expires}; max_value=duration {bound} "
                      "(litellm_settings.upperbound_key_generate_params)", "expires")
