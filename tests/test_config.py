"""config.yaml loading: LiteLLM configs load unchanged; every mistake is named precisely."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from extauthz import config
from extauthz.config import ConfigError
from tests.harness import EXAMPLE_CONFIG, ROOT

MODEL = {"model_name": "gpt-4", "litellm_params": {"model": "openai/gpt-4", "api_key": "os.environ/OPENAI_API_KEY"}}


def write(tmp_path: Path, doc: object) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return str(path)


def test_example_config_loads() -> None:
    c = config.load(str(EXAMPLE_CONFIG))
    assert [d.model_name for d in c.deployments][:2] == ["gpt-3.5-turbo", "gpt-4"]
    assert c.master_key == "sk-1234" and c.warnings == ()
    assert "sk-1234" not in repr(c) and "sk-upstream" not in repr(c)


def test_litellm_config_with_env_values_and_other_sections(tmp_path: Path) -> None:
    doc = {"model_list": [{**MODEL, "litellm_params": {**MODEL["litellm_params"], "rpm": 10}}],
           "litellm_settings": {"drop_params": True}, "router_settings": {"routing_strategy": "simple-shuffle"},
           "general_settings": {"master_key": "os.environ/MASTER"}}
    c = config.load(write(tmp_path, doc), environ={"OPENAI_API_KEY": "sk-prov", "MASTER": "sk-m"})
    d = c.deployments[0]
    assert (d.provider, d.provider_model, d.api_key, d.api_base) == ("openai", "gpt-4", "sk-prov",
                                                                      "https://api.openai.com/v1")
    assert c.master_key == "sk-m"
    assert any("litellm_settings" in w for w in c.warnings) and any("rpm" in w for w in c.warnings)


def test_environment_overrides_settings(tmp_path: Path) -> None:
    doc = {"model_list": [MODEL], "extauthz_settings": {"redis_url": "redis://file:6379/0", "grpc_port": 9100}}
    env = {"OPENAI_API_KEY": "x", "EXTAUTHZ_REDIS_URL": "redis://env:6379/1", "EXTAUTHZ_ADMIN_PORT": "4100"}
    s = config.load(write(tmp_path, doc), environ=env).settings
    assert (s.redis_url, s.grpc_port, s.admin_port) == ("redis://env:6379/1", 9100, 4100)


@pytest.mark.parametrize("doc,yaml_path,problem", [
    ("model_list: [", "", "not valid YAML"),
    ({"model_lists": [MODEL]}, "model_list", "non-empty list"),
    ({"model_list": []}, "model_list", "non-empty list"),
    ({"model_list": [{"litellm_params": MODEL["litellm_params"]}]}, "model_list[0].model_name", "is required"),
    ({"model_list": [{"model_name": "x", "litellm_params": {"model": "os.environ/NOPE"}}]},
     "model_list[0].litellm_params.model", "NOPE is not set"),
    ({"model_list": [{"model_name": "x", "litellm_params": {"model": "openai/x", "weight": "heavy"}}]},
     "model_list[0].litellm_params.weight", "positive number"),
    ({"model_list": [MODEL], "general_settings": {"master_key": "os.environ/NOPE"}}, "general_settings.master_key",
     "NOPE is not set"),
    ({"model_list": [{**MODEL, "model_info": {"access_groups": "beta"}}]}, "model_list[0].model_info.access_groups",
     "list of non-empty strings"),
    ({"model_list": [{"model_name": "x", "litellm_params": {"model": "openai/*"}}]},
     "model_list[0].litellm_params.model", "wildcard"),
    ({"model_list": [MODEL], "extauthz_settings": {"redis_uri": "x"}}, "extauthz_settings.redis_uri",
     "unknown setting"),
    ({"model_list": [MODEL], "extauthz_settings": {"grpc_port": "many"}}, "extauthz_settings.grpc_port",
     "expected int"),
    ({"model_list": [MODEL], "extauthz_settings": {"grpc_port": 70000}}, "extauthz_settings.grpc_port",
     "not a TCP port"),
])
def test_invalid_configs_name_file_path_and_problem(tmp_path: Path, doc: object, yaml_path: str,
                                                   problem: str) -> None:
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as e:
        config.load(path, environ={"OPENAI_API_KEY": "x"})
    assert e.value.file == path and e.value.yaml_path == yaml_path and problem in e.value.problem
    assert path in str(e.value)


def test_serve_refuses_an_invalid_config(tmp_path: Path) -> None:
    path = write(tmp_path, {"model_list": [MODEL], "general_settings": {"master_key": "sk-secret-master"},
                            "extauthz_settings": {"grpc_prot": 1}})
    r = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--config", path], capture_output=True,
                       text=True, cwd=ROOT, env={"OPENAI_API_KEY": "x", "PATH": ""}, timeout=60)
    assert r.returncode == 2
    assert f"{path}: extauthz_settings.grpc_prot: unknown setting" in r.stderr
    assert "Traceback" not in r.stderr and "sk-secret-master" not in r.stderr


def test_envoy_config_needs_no_secrets(tmp_path: Path) -> None:
    path = write(tmp_path, {"model_list": [MODEL]})
    r = subprocess.run([sys.executable, "-m", "extauthz", "envoy-config", "--config", path], capture_output=True,
                       text=True, cwd=ROOT, env={"PATH": ""}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "api.openai.com" in r.stdout


def pass_through(target: str, subpath: bool = False, deployments: list[dict] | None = None) -> dict:
    plain = {"model_name": "gpt-4", "litellm_params": {"model": "openai/gpt-4"}}
    return {"model_list": deployments or [plain], "general_settings": {"pass_through_endpoints": [
        {"path": "/p", "target": target, "include_subpath": subpath}]}}


@pytest.mark.parametrize("target, subpath", [
    ("http://upstream.local/v1", True),                    # /p/chat/completions -> /v1/chat/completions
    ("http://upstream.local", True),
    ("http://upstream.local/openai", True),                # Azure deployments
    ("https://api.openai.com/v1/chat/completions", False),
    ("https://api.openai.com/V1/Chat/Completions", False),
    ("https://api.openai.com/v1/audio/speech", False),     # model calls the gateway does not serve either
    ("https://api.openai.com/v1/realtime", True),
    ("https://api.openai.com/v1/batches", True),
    ("https://api.anthropic.com/v1/messages/batches", True),
    ("https://api.groq.com./openai/v1", True),             # the same host spelled with a trailing dot
    ("https://generativelanguage.googleapis.com/v1beta/models/gemini-pro:generateContent", False),
])
def test_a_pass_through_that_reaches_a_model_call_loads_as_not_served(target: str, subpath: bool) -> None:
    # Served, it would forward model calls unchecked; the rest of the config serves.
    (p,) = config.from_dict(pass_through(target, subpath)).pass_through
    assert not p.routable and "a model call at a provider" in (p.unavailable or "")


@pytest.mark.parametrize("target", ["https://api.openai.com/v1/./chat/completions", "https://h/v1//files",
                                    "https://h/v1/chat%2Fcompletions", "https://h/v1/x/../files", "https://h/v1/a;b"])
def test_a_pass_through_target_must_be_a_plain_path(target: str) -> None:
    with pytest.raises(ConfigError, match="plain path"):
        config.from_dict(pass_through(target))


@pytest.mark.parametrize("target, subpath", [("https://api.openai.com/v1/files", True), ("https://api.cohere.com/v1/rerank",
                                                                                        False)])
def test_pass_throughs_beside_model_calls_load(target: str, subpath: bool) -> None:
    assert config.from_dict(pass_through(target, subpath)).pass_through[0].target == target


def test_two_hosts_that_would_share_an_envoy_cluster_are_refused() -> None:
    deployments = [{"model_name": "a", "litellm_params": {"model": "openai/a", "api_base": "https://llm_a.example.com/v1"}},
                   {"model_name": "b", "litellm_params": {"model": "openai/b", "api_base": "https://llm.a.example.com/v1"}}]
    with pytest.raises(ConfigError, match="one Envoy cluster"):
        config.from_dict({"model_list": deployments})
    deployments[1]["litellm_params"]["api_base"] = "https://llm-a.example.com/v1"  # '-' and '.' stay distinct
    assert len(config.from_dict({"model_list": deployments}).deployments) == 2


def test_settings_are_checked_by_what_each_admits() -> None:
    base = {"model_list": [{"model_name": "a", "litellm_params": {"model": "openai/a"}}]}
    c = config.from_dict({**base, "extauthz_settings": {"metrics_port": 0, "listen_port": 8080}})
    assert c.settings.metrics_port == 0 and c.envoy.listen_port == 8080  # the sidecar's and Envoy's own
    for key, value, problem in (("grpc_port", 0, "must be positive"), ("metrics_port", -1, "(or 0: off)"),
                                ("admin_port", 70000, "not a TCP port"), ("cache_max_entries", -1, "not be negative"),
                                ("log_format", "xml", "must be json or text"), ("authz_timeout_ms", 0, "positive")):
        with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            config.from_dict({**base, "extauthz_settings": {key: value}})


# --- what LiteLLM loads, this loads ------------------------------------------------------------

LITELLM_STYLE = {
    "model_list": [
        {"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o", "api_key": "os.environ/OPENAI_API_KEY"},
         "tpm": 100000, "rpm": 1000, "model_info": {"mode": "chat", "base_model": "gpt-4o", "id": "x"}},
        {"model_name": "llama2", "litellm_params": {"model": "ollama/llama2"}},
        {"model_name": "claude", "litellm_params": {"model": "bedrock/amazon.titan-text-express-v1",
                                                   "aws_region_name": "us-east-1"}},
        {"model_name": "gpt-4o", "litellm_params": {"model": "azure/", "api_base": "https://x.openai.azure.com"}},
        {"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o", "api_key": "os.environ/UNSET_KEY"}},
        {"model_name": "mine", "litellm_params": {"model": "mycloud/mine"}},
        {"model_name": "bad-url", "litellm_params": {"model": "openai/x", "api_base": "ftp://h"}},
        {"model_name": "sonar", "litellm_params": {"model": "perplexity/sonar"}},
        {"model_name": "3.5", "litellm_params": {"model": "gpt-3.5-turbo"}},
    ],
    "litellm_settings": {"success_callback": ["langfuse"], "drop_params": True},
    "router_settings": {"routing_strategy": "usage-based-routing-v2", "redis_host": "x"},
    "environment_variables": {"OPENAI_API_KEY": "sk-from-config"},
    "general_settings": {"master_key": "sk-m", "database_url": "postgres://x", "alerting": ["slack"]},
    "some_future_section": {"a": 1},
}


def test_a_litellm_config_with_what_the_gateway_cannot_route_loads(tmp_path: Path) -> None:
    c = config.load(write(tmp_path, LITELLM_STYLE), environ={"OPENAI_API_KEY": "sk-from-process"})
    by_index = {d.index: d for d in c.deployments}
    # environment_variables are applied before references are read, and win, as in LiteLLM
    assert by_index[0].routable and by_index[0].api_key == "sk-from-config"
    assert by_index[1].routable and by_index[1].api_base == "http://localhost:11434"   # LiteLLM's default
    assert by_index[7].api_base == "https://api.perplexity.ai" and by_index[8].provider == "openai"
    reasons = {i: by_index[i].unavailable for i in (2, 3, 4, 5, 6)}
    assert "family 'amazon'" in reasons[2]
    assert "names no model" in reasons[3]
    assert "UNSET_KEY" in reasons[4] and "UNSET_KEY" not in repr(by_index[4].api_key)
    assert "no default base URL" in reasons[5]
    assert "http(s)" in reasons[6]
    assert all(by_index[i].api_base == "" and by_index[i].api_key is None for i in reasons)
    text = "\n".join(c.warnings)
    for expected in ("rpm, tpm", "some_future_section", "litellm_settings"):
        assert expected in text
    assert c.unenforced == ()


def test_settings_that_decide_access_and_are_not_enforced_are_named(tmp_path: Path) -> None:
    doc = {"model_list": [MODEL], "general_settings": {"enable_jwt_auth": True, "allowed_ips": ["10.0.0.1"],
                                                       "custom_auth": None, "allowed_routes": []}}
    c = config.load(write(tmp_path, doc), environ={"OPENAI_API_KEY": "x"})
    assert [name for name, _ in c.unenforced] == ["enable_jwt_auth", "allowed_ips"]
    assert c.refuses_all == ("allowed_ips",)


def test_a_proxy_wide_budget_is_named_and_refuses_every_request(tmp_path: Path) -> None:
    # LiteLLM's litellm_settings.max_budget caps the whole proxy; ignoring it would lift it.
    from extauthz.check.runtime import Runtime
    doc = {"model_list": [MODEL], "litellm_settings": {"max_budget": 100, "budget_duration": "30d",
                                                       "drop_params": True}}
    c = config.load(write(tmp_path, doc), environ={"OPENAI_API_KEY": "x"})
    assert c.refuses_all == ("litellm_settings.max_budget",)
    refusal = Runtime.of(c).refusal
    assert refusal is not None and "litellm_settings.max_budget" in refusal.message
    ok = {"model_list": [MODEL], "litellm_settings": {"budget_duration": "30d", "max_budget": None},
          "general_settings": {"max_parallel_requests": 100, "global_max_parallel_requests": 1000}}
    c = config.load(write(tmp_path, ok), environ={"OPENAI_API_KEY": "x"})
    assert c.unenforced == ()  # proxy-wide capacity limits decide no access: named, not refused
    assert sum("a proxy-wide limit, not enforced" in w for w in c.warnings) == 2


def test_only_routable_deployments_get_an_envoy_cluster(tmp_path: Path) -> None:
    from extauthz.envoy.render import render
    c = config.load(write(tmp_path, LITELLM_STYLE), environ={})
    clusters = {cl["name"] for cl in render(c)["static_resources"]["clusters"]}
    assert "upstream_http_localhost_11434" in clusters and "upstream_https_api_perplexity_ai_443" in clusters
    assert not any("azure" in name or "amazonaws" in name for name in clusters)


@pytest.mark.parametrize("params,environ,expected", [
    ({"model": "bedrock/anthropic.claude-v2", "aws_region_name": "us-west-2"}, {},
     "https://bedrock-runtime.us-west-2.amazonaws.com"),
    ({"model": "bedrock/invoke/anthropic.claude-v2"}, {"AWS_REGION": "eu-central-1"},
     "https://bedrock-runtime.eu-central-1.amazonaws.com"),
    ({"model": "bedrock/anthropic.claude-v2", "aws_region_name": "us-east-1",
      "aws_bedrock_runtime_endpoint": "https://vpce-1.bedrock-runtime.us-east-1.vpce.amazonaws.com/"}, {},
     "https://vpce-1.bedrock-runtime.us-east-1.vpce.amazonaws.com"),
    ({"model": "bedrock/anthropic.claude-v2"}, {}, "needs litellm_params.aws_region_name"),
    ({"model": "bedrock/anthropic.claude-v2", "aws_region_name": "us-east-1.evil.com"}, {}, "a region name"),
    ({"model": "bedrock/converse/anthropic.claude-v2", "aws_region_name": "us-east-1"}, {}, "Converse"),
    ({"model": "bedrock/meta.llama3-70b-instruct-v1:0", "aws_region_name": "us-east-1"}, {}, "family 'meta'"),
    ({"model": "bedrock/anthropic.claude-v2", "aws_region_name": "us-east-1",
      "aws_access_key_id": "os.environ/AWS_ACCESS_KEY_ID", "aws_secret_access_key": "os.environ/AWS_SECRET_ACCESS_KEY"},
     {}, "https://bedrock-runtime.us-east-1.amazonaws.com"),   # the identity Envoy reads itself
    ({"model": "bedrock/anthropic.claude-v2", "aws_region_name": "us-east-1", "aws_access_key_id": "AKIAOTHER",
      "aws_secret_access_key": "literal-secret"}, {}, "aws_access_key_id, aws_secret_access_key name an AWS identity"),
    ({"model": "bedrock/anthropic.claude-v2", "aws_region_name": "us-east-1",
      "aws_role_name": "arn:aws:iam::222222222222:role/other"}, {}, "aws_role_name name an AWS identity"),
    ({"model": "bedrock/anthropic.claude-v2", "aws_region_name": "us-east-\u0661"}, {}, "a region name"),
])
def test_bedrock_deployments(tmp_path: Path, params: dict, environ: dict, expected: str) -> None:
    c = config.load(write(tmp_path, {"model_list": [{"model_name": "m", "litellm_params": params}]}), environ=environ)
    (d,) = c.deployments
    if expected.startswith("https://"):
        assert d.routable and d.api_base == expected and d.provider_model == "anthropic.claude-v2"
    else:
        assert not d.routable and expected in d.unavailable


def test_a_bedrock_model_id_is_the_model_called(tmp_path: Path) -> None:
    arn = "arn:aws:bedrock:us-east-1:111111111111:provisioned-model/abc"
    c = config.load(write(tmp_path, {"model_list": [{"model_name": "m", "litellm_params": {
        "model": "bedrock/anthropic.claude-instant-v1", "model_id": arn, "aws_region_name": "us-east-1"}}]}),
        environ={})
    (d,) = c.deployments
    assert d.routable and d.provider_model == arn


@pytest.mark.parametrize("api_base,secret", [("https://llm.example.com/v1?api-key=TOPSECRET", "TOPSECRET"),
                                             ("https://user:PASSWORD1@llm.example.com/v1", "PASSWORD1")])
def test_why_a_base_url_is_refused_never_repeats_it(tmp_path: Path, api_base: str, secret: str) -> None:
    c = config.load(write(tmp_path, {"model_list": [{"model_name": "m", "litellm_params": {
        "model": "openai/m", "api_base": api_base}}]}), environ={})
    (d,) = c.deployments
    assert not d.routable and secret not in d.unavailable and secret not in repr(c)


@pytest.mark.parametrize("credentials,routable", [
    ({"type": "service_account", "client_email": "a@b.iam.gserviceaccount.com", "private_key": "x"}, True),
    ('{"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r"}', True),
    ('{"type": "service_account", "private_key": "SECRETKEY",}', False),
    ("/no/such/file.json", False),
])
def test_vertex_credentials_are_checked_at_load_without_quoting_them(tmp_path: Path, credentials: object,
                                                                    routable: bool) -> None:
    c = config.load(write(tmp_path, {"model_list": [{"model_name": "g", "litellm_params": {
        "model": "vertex_ai/gemini-1.5-pro", "vertex_project": "my-project-1", "vertex_credentials": credentials}}]}),
        environ={})
    (d,) = c.deployments
    assert d.routable is routable
    if not routable:
        assert "SECRETKEY" not in d.unavailable and "vertex_credentials is neither" in d.unavailable


def test_numbers_in_environment_variables_are_set_as_litellm_sets_them(tmp_path: Path) -> None:
    raw = {"model_list": [{"model_name": "m", "litellm_params": {
        "model": "openai/m", "api_base": "os.environ/UPSTREAM_BASE", "api_key": "os.environ/UPSTREAM_KEY"}}],
        "environment_variables": {"REDIS_PORT": 6379, "UPSTREAM_BASE": "http://up:8080/v1", "UPSTREAM_KEY": 12345,
                                  "DEBUG": True},
        "general_settings": {"master_key": "sk-m"}}
    c = config.load(write(tmp_path, raw), environ={})
    (d,) = c.deployments
    assert d.routable and d.api_key == "12345" and d.api_base == "http://up:8080/v1"
