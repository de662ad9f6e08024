"""LiteLLM's default and upper-bound key generation parameters, pure (admin/key_params.py)."""

from __future__ import annotations

import time

import pytest

from extauthz.admin import key_params
from extauthz.admin.schema import Invalid
from extauthz.config import from_dict

BOUNDS = (("max_budget", 10), ("rpm_limit", 100), ("duration", "30d"))


def test_defaults_fill_what_is_left_out_or_empty() -> None:
    defaults = (("max_budget", 5), ("models", ["gpt-4"]), ("metadata", {"by": "default"}))
    assert key_params.with_defaults({}, defaults) == {"max_budget": 5, "models": ["gpt-4"], "metadata": {"by": "default"}}
    assert key_params.with_defaults({"models": [], "metadata": {}, "max_budget": None}, defaults)["models"] == ["gpt-4"]
    given = {"max_budget": 1, "models": ["gpt-4o"], "metadata": {"x": 1}}
    assert key_params.with_defaults(given, defaults) == given


def test_bounds_fill_on_generate_and_refuse_what_is_over() -> None:
    assert key_params.bounded({}, BOUNDS, fill=True) == {"max_budget": 10, "rpm_limit": 100, "duration": "30d"}
    assert key_params.bounded({}, BOUNDS, fill=False) == {}
    assert key_params.bounded({"max_budget": 10, "duration": "4w"}, BOUNDS, fill=False)["max_budget"] == 10
    for over in ({"max_budget": 10.01}, {"rpm_limit": 101}, {"duration": "31d"}, {"duration": "2mo"}):
        with pytest.raises(Invalid, match="is over max limit set in config"):
            key_params.bounded(over, BOUNDS, fill=True)
    # An expiry given as a time is held to the same bound.
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 40 * 86400))
    with pytest.raises(Invalid, match="expires is over max limit"):
        key_params.bounded({"expires": later}, BOUNDS, fill=True)


def test_the_config_reads_them_and_refuses_what_cannot_apply() -> None:
    model = {"model_name": "m", "litellm_params": {"model": "openai/gpt-4o", "api_key": "x"}}
    config = from_dict({"model_list": [model], "litellm_settings": {
        "default_key_generate_params": {"max_budget": 5, "team_id": None, "key_type": "x"},
        "upperbound_key_generate_params": {"rpm_limit": 100, "duration": "30d"}, "drop_params": True}})
    assert config.key_defaults == (("max_budget", 5),) and config.key_upperbounds == (("rpm_limit", 100),
                                                                                    ("duration", "30d"))
    assert any("default_key_generate_params.key_type" in w for w in config.warnings)
    assert any(w.startswith("litellm_settings.drop_params: not applied by extauthz: ") for w in config.warnings)
    for bad in ({"upperbound_key_generate_params": {"max_budget": "ten"}},
                {"upperbound_key_generate_params": {"duration": "forever"}},
                {"default_key_generate_params": {"models": "gpt-4"}}):
        with pytest.raises(Exception, match="litellm_settings"):
            from_dict({"model_list": [model], "litellm_settings": bad})
