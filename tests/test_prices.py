"""Prices: the deployment's own, else the bundled table generated from LiteLLM's map."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from extauthz.usage.prices import Price, bundled, cost, price_of, tokens_of

ROOT = Path(__file__).resolve().parent.parent


def test_the_bundled_table_says_where_it_comes_from() -> None:
    table = bundled()
    assert table["source"].startswith("litellm ") and table["generated"] and table["unit"] == "USD per token"
    assert len(table["models"]) > 500


@pytest.mark.parametrize("provider, model, expected", [
    # max_output, max_input: its output limit and its input window
    ("openai", "gpt-4o", Price(2.5e-06, 1e-05, 1.25e-06, None, 16384, 128000)),
    ("azure", "gpt-4o", Price(2.5e-06, 1e-05, 1.25e-06, None, 16384, 128000)),   # "azure/gpt-4o"
    ("openai", "text-embedding-3-small", Price(2e-08, 0.0, None, None, None, 8191)),
    ("hosted_vllm", "my-own-llama", None),                               # unpriced
])
def test_table_prices(provider: str, model: str, expected: Price | None) -> None:
    assert price_of(provider, model, {}) == expected


def test_the_deployments_own_price_wins() -> None:
    own = {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}
    # (its output limit is the model's still: a price of its own does not change what it may answer)
    assert price_of("openai", "gpt-4o", own) == Price(1e-06, 2e-06, max_output=16384, max_input=128000)
    # Half a price, or a careless one, is no price of its own.
    assert price_of("openai", "gpt-4o", {"input_cost_per_token": 1e-06}) == price_of("openai", "gpt-4o", {})
    assert price_of("hosted_vllm", "x", {"input_cost_per_token": "1", "output_cost_per_token": 2}) is None


def test_cost() -> None:
    price = Price(1e-06, 2e-06, 1e-07, 1.25e-06)
    assert cost(price, tokens_of({"prompt_tokens": 1000, "completion_tokens": 500})) == pytest.approx(0.002)
    anthropic = {"input_tokens": 100, "output_tokens": 10, "cache_read_input_tokens": 1000,
                 "cache_creation_input_tokens": 200}
    assert cost(price, tokens_of(anthropic)) == pytest.approx(100e-06 + 20e-06 + 100e-06 + 250e-06)
    assert cost(Price(1e-06, 2e-06), tokens_of({"cache_read_input_tokens": 10})) == pytest.approx(10e-06)
    gemini = {"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 5}
    assert cost(Price(1e-06, 2e-06), tokens_of(gemini)) == pytest.approx(30e-06)
    # No usage, or counts that are not counts: nothing to price.
    assert tokens_of({}) is None and tokens_of({"prompt_tokens": -1, "output_tokens": True}) is None


def test_the_script_regenerates_the_table(tmp_path: Path) -> None:
    source = tmp_path / "map.json"
    source.write_text(json.dumps({
        "sample_spec": {"input_cost_per_token": 0},
        "gpt-x": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1e-06,
                  "output_cost_per_token": 2e-06},
        "dall-e-x": {"litellm_provider": "openai", "mode": "image_generation", "input_cost_per_token": 1},
        "other/x": {"litellm_provider": "some_cloud", "mode": "chat", "input_cost_per_token": 1e-06,
                    "output_cost_per_token": 1e-06}}))
    out = tmp_path / "prices.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "update-prices"), str(source), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    assert written["models"] == {"gpt-x": {"input": 1e-06, "output": 2e-06}}
    assert written["source"] == str(source)


def test_the_committed_table_is_what_the_script_makes_of_the_pinned_map(tmp_path: Path) -> None:
    out = tmp_path / "prices.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "update-prices"), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["models"] == bundled()["models"]


def test_litellm_params_prices_are_read_and_win() -> None:
    from extauthz.config import from_dict
    from extauthz.usage.prices import price_of
    config = from_dict({"model_list": [{
        "model_name": "mine", "model_info": {"input_cost_per_token": 9e-06, "output_cost_per_token": 9e-06},
        "litellm_params": {"model": "openai/gpt-4o", "api_key": "x", "input_cost_per_token": 1e-06,
                           "output_cost_per_token": 2e-06}}]})
    (deployment,) = config.deployments
    assert price_of(deployment.provider, deployment.provider_model, deployment.info) == \
        Price(1e-06, 2e-06, max_output=16384, max_input=128000)
    assert not any("input_cost_per_token" in w for w in config.warnings)  # read, so not "not used"
