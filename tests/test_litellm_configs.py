"""LiteLLM configs as teams bring them: they load, what cannot be routed is reported, not fatal."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from extauthz.check.runtime import Runtime
from extauthz.check.service import AuthorizationService
from extauthz.config import from_dict, load
from extauthz.envoy.render import render_yaml
from extauthz.proto.envoy.service.auth.v3.external_auth_pb2 import CheckResponse
from extauthz.domain.record import KeyRecord
from tests.conftest import Gateway
from tests.harness import BIN, ROOT, check_request, http, start_sidecar, start_stack

MASTER = "sk-litellm-master"


def litellm_config(upstream_port: int) -> dict:
    base = f"http://127.0.0.1:{upstream_port}/v1"
    return {
        "model_list": [
            {"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o", "api_base": base,
                                                       "api_key": "os.environ/LITELLM_TEST_OPENAI_KEY"},
             "tpm": 100000, "rpm": 1000, "model_info": {"mode": "chat", "input_cost_per_token": 0.000005}},
            # the same model group through Bedrock: not routable; the OpenAI one keeps serving
            {"model_name": "gpt-4o", "litellm_params": {"model": "bedrock/converse/anthropic.claude-3-sonnet",
                                                       "aws_region_name": "us-east-1"}},
            {"model_name": "titan", "litellm_params": {"model": "bedrock/amazon.titan-text-express-v1"}},
            {"model_name": "ghost", "litellm_params": {"model": "openai/ghost", "api_base": base,
                                                      "api_key": "os.environ/LITELLM_TEST_UNSET_KEY"}},
        ],
        "litellm_settings": {"success_callback": ["langfuse"], "drop_params": True, "num_retries": 3},
        "router_settings": {"routing_strategy": "usage-based-routing-v2", "enable_pre_call_checks": True},
        "environment_variables": {"LITELLM_TEST_OPENAI_KEY": "sk-upstream-from-config"},
        "general_settings": {"master_key": MASTER, "database_url": "postgresql://user:pw@db/litellm",
                             "enable_jwt_auth": True},
    }


@pytest.fixture(scope="module")
def litellm_gateway(workdir: Path, redis_port: int, upstream_port: int) -> Iterator[Gateway]:
    path = workdir / "litellm-style.yaml"
    path.write_text(yaml.safe_dump(litellm_config(upstream_port), sort_keys=False))
    stack = start_stack(workdir, path, f"redis://127.0.0.1:{redis_port}/9")
    try:
        yield Gateway(stack.envoy, upstream_port, stack.sidecar)
    finally:
        stack.stop()
    log = stack.sidecar.proc.log_text()
    assert "deployment 1:gpt-4o is not routable: Bedrock's Converse API needs format translation" in log
    assert "general_settings.enable_jwt_auth is not enforced" in log and '"level": "error"' in log
    assert "sk-upstream-from-config" not in log


def test_what_cannot_be_routed_is_listed_in_model_info(litellm_gateway: Gateway) -> None:
    r = http("GET", litellm_gateway.envoy.url + "/model/info", headers={"Authorization": f"Bearer {MASTER}"})
    assert r.status == 200
    info = {d["model_info"]["id"]: d["model_info"] for d in r.json()["data"]}
    assert info["0:gpt-4o"]["routable"] is True and "reason" not in info["0:gpt-4o"]
    assert info["1:gpt-4o"]["routable"] is False and "Converse API" in info["1:gpt-4o"]["reason"]
    assert "LITELLM_TEST_UNSET_KEY" in info["3:ghost"]["reason"]


def test_a_model_with_routable_deployments_keeps_serving(litellm_gateway: Gateway) -> None:
    g = litellm_gateway
    key = g.admin("/key/generate", {"models": ["gpt-4o", "titan", "ghost"]}, key=MASTER).json()["key"]
    g.forget_upstream()
    for _ in range(6):  # weights are equal: a pick among all deployments would hit Bedrock
        r = g.chat(key, "gpt-4o")
        assert r.status == 200, r.text
    seen = g.upstream_seen()
    assert len(seen) == 6 and {s["headers"]["authorization"] for s in seen} == {"Bearer sk-upstream-from-config"}


@pytest.mark.parametrize("model,reason", [("titan", "family 'amazon'"), ("ghost", "LITELLM_TEST_UNSET_KEY")])
def test_a_model_with_none_is_a_503_naming_why(litellm_gateway: Gateway, model: str, reason: str) -> None:
    g = litellm_gateway
    key = g.admin("/key/generate", {"models": [model]}, key=MASTER).json()["key"]
    g.forget_upstream()
    r = g.chat(key, model)
    assert r.status == 503 and r.json()["error"]["code"] == "deployment_unavailable"
    assert reason in r.json()["error"]["message"]
    assert g.upstream_seen() == []


def test_the_count_of_unroutable_deployments_is_a_metric(litellm_gateway: Gateway) -> None:
    metrics_port = litellm_gateway.sidecar.metrics_port  # type: ignore[union-attr]
    text = http("GET", f"http://127.0.0.1:{metrics_port}/metrics").text
    assert 'extauthz_deployments{routable="false"} 3.0' in text
    assert 'extauthz_deployments{routable="true"} 1.0' in text


def test_envoy_gets_no_cluster_for_what_cannot_be_routed(litellm_gateway: Gateway) -> None:
    clusters = yaml.safe_load(litellm_gateway.envoy.config.read_text())["static_resources"]["clusters"]
    assert not any("amazonaws" in str(c) or "bedrock" in str(c) for c in clusters)


def test_a_jwt_caller_is_refused_while_enable_jwt_auth_is_not_enforced(litellm_gateway: Gateway) -> None:
    jwt_like = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln"
    r = litellm_gateway.chat(jwt_like, "gpt-4o")
    assert r.status == 401 and r.json()["error"]["code"] == "invalid_api_key"


def check_config(path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extauthz", "check-config", "--config", str(path), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def test_check_config_reports_each_deployment_and_what_is_not_enforced(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(litellm_config(8081)))
    done = check_config(path)
    assert done.returncode == 1, done.stderr             # it prints an error line: a CI job fails on it
    lines = done.stdout.splitlines()
    assert "deployment 0:gpt-4o  provider=openai  upstream=127.0.0.1:8081  routable" in lines
    assert any(line.startswith("deployment 2:titan  provider=bedrock  upstream=-  NOT ROUTABLE: Bedrock model "
                               "family 'amazon'") for line in lines)
    assert any(line.startswith("error: general_settings.enable_jwt_auth is not enforced") for line in lines)
    assert any(line.startswith("warning: model_list[0]: not used by extauthz: rpm, tpm") for line in lines)
    assert lines[-1] == "4 deployments, 3 not routable, 1 settings not enforced"
    assert "sk-upstream-from-config" not in done.stdout + done.stderr
    assert check_config(path, "--strict").returncode == 1
    fine = tmp_path / "fine.yaml"   # warnings only: 0, and 1 with --strict
    fine.write_text(yaml.safe_dump({"model_list": [{"model_name": "m", "litellm_params": {
        "model": "openai/m", "api_key": "x", "rpm": 5}}], "general_settings": {"master_key": "sk-x"}}))
    assert check_config(fine).returncode == 0 and "warning: " in check_config(fine).stdout
    assert check_config(fine, "--strict").returncode == 1


def test_check_config_names_each_litellm_setting_not_applied_and_what_is_lost(tmp_path: Path) -> None:
    # A LiteLLM proxy's usual config: fallbacks, retries, a cache, callbacks, a database,
    # alerts, a routing strategy; key budgets by default, and a self-hosted model unpriced.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "model_list": [{"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o", "api_key": "x"}},
                       {"model_name": "llama", "litellm_params": {"model": "openai/my-llama", "api_key": "x",
                                                                  "api_base": "http://127.0.0.1:8000/v1"}}],
        "litellm_settings": {"fallbacks": [{"gpt-4o": ["llama"]}], "num_retries": 3, "cache": True,
                             "success_callback": ["langfuse"], "default_key_generate_params": {"max_budget": 10}},
        "general_settings": {"master_key": "sk-x", "database_url": "postgresql://u:secret@db/litellm",
                             "store_model_in_db": True, "alerting": ["slack"], "made_up": 1},
        "router_settings": {"routing_strategy": "usage-based-routing-v2"},
        "guardrails": [{"guardrail_name": "g"}]}))
    done = check_config(path)
    lines = done.stdout.splitlines()
    lost = {line.split(": not applied by extauthz: ")[0].removeprefix("warning: "):
            line.split(": not applied by extauthz: ")[1] for line in lines if ": not applied by extauthz: " in line}
    assert lost["litellm_settings.fallbacks"].startswith("a failed call is not retried on another model")
    assert "retry" in lost["litellm_settings.num_retries"]
    assert lost["litellm_settings.cache"].startswith("responses are not cached")
    assert "callbacks" in lost["litellm_settings.success_callback"]
    assert "no database is read" in lost["general_settings.database_url"]
    assert "general_settings.store_model_in_db" not in lost   # read: runtime models (docs/runtime-models.md)
    assert "no alerts" in lost["general_settings.alerting"]
    assert "weight" in lost["router_settings.routing_strategy"]
    assert "guardrails" in lost["guardrails"]
    assert "warning: general_settings.made_up: not read by extauthz" in lines
    assert "secret" not in done.stdout + done.stderr
    # Keys get budgets by default: the unpriced deployment is a warning naming it.
    (unpriced,) = [line for line in lines if "has no price" in line]
    assert unpriced.startswith("warning: deployment 1:llama (openai/my-llama) has no price") \
        and "default_key_generate_params.max_budget" in unpriced and "unpriced_model" in unpriced
    assert done.returncode == 0 and check_config(path, "--strict").returncode == 1
    # Without budgets in the config: a note, not a warning (keys may still get budgets).
    raw = yaml.safe_load(path.read_text())
    raw["litellm_settings"] = {}
    path.write_text(yaml.safe_dump(raw))
    lines = check_config(path).stdout.splitlines()
    assert "note: 1 deployments have no price (1:llama): a key, team or user with a max_budget is refused their " \
           "calls (403 unpriced_model)" in lines


def test_check_config_reports_a_pass_through_it_does_not_serve(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "model_list": [{"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o", "api_key": "x"}}],
        "general_settings": {"master_key": "sk-x", "pass_through_endpoints": [
            {"path": "/raw", "target": "https://api.openai.com/v1/chat/completions"},
            {"path": "/files", "target": "https://api.openai.com/v1/files", "include_subpath": True}]}}))
    done = check_config(path)
    lines = done.stdout.splitlines()
    assert "pass-through /files  target=https://api.openai.com/v1/files  served" in lines
    (raw,) = [line for line in lines if line.startswith("pass-through /raw ")]
    assert "NOT SERVED: " in raw and "a model call at a provider" in raw
    assert lines[-1] == "1 deployments, 0 not routable, 1 pass-through endpoints not served, 0 settings not enforced"
    assert done.returncode == 0 and check_config(path, "--strict").returncode == 1


def test_an_oidc_discovery_url_out_of_reach_says_what_to_set_instead(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "model_list": [{"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o", "api_key": "x"}}],
        "general_settings": {"master_key": "sk-x", "enable_jwt_auth": True, "litellm_jwtauth": {
            "public_key_url": "https://login.idp.invalid/tenant/.well-known/openid-configuration",
            "audience": "api://gateway", "team_id_jwt_field": "team"}}}))
    done = subprocess.run([sys.executable, "-m", "extauthz", "envoy-config", "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert "could not be read" in done.stderr and "jwks_uri" in done.stderr
    assert "set litellm_jwtauth.public_key_url to the jwks_uri itself" in done.stderr
    assert "litellm_jwtauth.issuer to 'https://login.idp.invalid/tenant'" in done.stderr


def test_check_config_exits_2_on_a_config_that_does_not_load(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model_list: [")
    done = check_config(path)
    assert done.returncode == 2 and "not valid YAML" in done.stderr


class OneKeyReader:
    """Every presented key is a key that may call every model."""

    async def get_key(self, token_hash: str) -> KeyRecord:
        return KeyRecord(token_hash, "any", (), None, None, False)

    async def get_team(self, team_id: str) -> None:
        return None


def test_a_restricting_setting_not_enforced_refuses_every_model_request() -> None:
    runtime = Runtime.of(from_dict({"model_list": [{"model_name": "m", "litellm_params": {
        "model": "openai/m", "api_base": "http://upstream:8000/v1"}}],
        "general_settings": {"master_key": "sk-master", "allowed_ips": ["10.0.0.7"]}}))
    service = AuthorizationService(lambda: runtime, OneKeyReader())
    body = json.dumps({"model": "m", "messages": []}).encode()
    try:
        for key in ("sk-any-key", "sk-master"):
            request = check_request({"authorization": f"Bearer {key}", "content-type": "application/json"}, body)
            response = CheckResponse.FromString(asyncio.run(service.Check(request, None)))
            assert response.denied_response.status.code == 403
            error = json.loads(response.denied_response.body)["error"]
            assert error["code"] == "unenforced_setting" and "general_settings.allowed_ips" in error["message"]
    finally:
        service.close()


# --- configs written the way LiteLLM's docs show them --------------------------------------------

LITELLM_CONFIGS = sorted((ROOT / "tests" / "configs" / "litellm").glob("*.yaml"))
ENVIRON = {name: f"value-of-{name.lower()}" for name in (
    "AZURE_API_BASE", "AZURE_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AZURE_API_KEY_EU",
    "AZURE_API_KEY_CA", "GROQ_API_KEY", "LITELLM_MASTER_KEY", "DATABASE_URL", "GEMINI_API_KEY",
    "MISTRAL_API_KEY", "DEEPSEEK_API_KEY", "TOGETHERAI_API_KEY", "FIREWORKS_AI_API_KEY", "OPENROUTER_API_KEY",
    "PERPLEXITYAI_API_KEY", "XAI_API_KEY", "CEREBRAS_API_KEY", "COHERE_API_KEY", "FIREWORKS")}
ENVIRON["AZURE_API_BASE"] = "https://my-endpoint.openai.azure.com"


@pytest.mark.parametrize("path", LITELLM_CONFIGS, ids=[p.stem for p in LITELLM_CONFIGS])
def test_litellm_style_configs_load_and_render_a_config_envoy_accepts(path: Path, tmp_path: Path) -> None:
    assert len(LITELLM_CONFIGS) >= 4
    c = load(str(path), environ=ENVIRON)
    assert c.routable, "every one of these serves something"
    rendered = tmp_path / "envoy.yaml"
    rendered.write_text(render_yaml(c))
    done = subprocess.run([str(BIN / "envoy"), "--mode", "validate", "-c", str(rendered)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "value-of-" not in rendered.read_text().replace("value-of-azure_api_base", "")  # no credential in it


def test_what_those_configs_come_to() -> None:
    by_file = {p.stem: load(str(p), environ=ENVIRON) for p in LITELLM_CONFIGS}
    quick = {d.model_name: d for d in by_file["proxy_quickstart"].deployments}
    assert quick["llama3"].api_base == "http://localhost:11434" and quick["llama3"].routable
    balanced = by_file["load_balancing"]
    assert [d.routable for d in balanced.deployments] == [True, True, True, True, False, False]
    assert balanced.master_key == "value-of-litellm_master_key"
    many = {d.model_name: d for d in by_file["many_providers"].deployments}
    assert not many["command-r"].routable and many["gemini-vertex"].routable
    assert many["gemini-vertex"].api_base == ("https://us-central1-aiplatform.googleapis.com/v1/projects/my-project/"
                                             "locations/us-central1")
    assert many["text-embedding-3-small"].provider == "openai" and many["sonar"].routable
    keys = by_file["virtual_keys_and_passthrough"]
    assert dict(keys.pass_through[0].headers)["authorization"] == "bearer value-of-cohere_api_key"
    # Its proxy-wide budget (litellm_settings.max_budget) is not enforced, so it refuses every
    # request until the budget moves to teams or keys: never a budget silently lifted.
    assert [name for name, _ in keys.unenforced] == ["enable_jwt_auth", "litellm_jwtauth",
                                                     "litellm_settings.max_budget"]
    assert keys.refuses_all == ("litellm_settings.max_budget",)


def test_a_restricting_setting_not_enforced_closes_the_admin_api_too(workdir: Path, redis_port: int) -> None:
    path = workdir / "allowed-ips.yaml"
    path.write_text(yaml.safe_dump({"model_list": [{"model_name": "m", "litellm_params": {
        "model": "openai/m", "api_base": "http://127.0.0.1:9/v1"}}],
        "general_settings": {"master_key": MASTER, "allowed_ips": ["10.9.9.9"]}}))
    side = start_sidecar(workdir, path, f"redis://127.0.0.1:{redis_port}/9")
    try:
        for method, route in (("POST", "/key/generate"), ("GET", "/v1/models"), ("GET", "/model_group/info")):
            r = http(method, side.admin + route, {} if method == "POST" else None,
                     {"Authorization": f"Bearer {MASTER}"})
            assert r.status == 403 and r.json()["error"]["code"] == "unenforced_setting", (route, r.text)
        assert http("GET", side.admin + "/health/liveliness").status == 200
    finally:
        side.proc.stop()
