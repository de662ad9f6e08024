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
    ({"model_lists": [MODEL]}, "model_lists", "unknown top-level key"),
    ({"model_list": []}, "model_list", "non-empty list"),
    ({"model_list": [{**MODEL, "extra": 1}]}, "model_list[0].extra", "unknown key"),
    ({"model_list": [{"litellm_params": MODEL["litellm_params"]}]}, "model_list[0].model_name", "is required"),
    ({"model_list": [{"model_name": "x", "litellm_params": {"model": "azure/gpt"}}]},
     "model_list[0].litellm_params.api_base", "is required for provider 'azure'"),
    ({"model_list": [{"model_name": "x", "litellm_params": {"model": "openai/x", "api_base": "ftp://h"}}]},
     "model_list[0].litellm_params.api_base", "not an http(s) URL"),
    ({"model_list": [{"model_name": "x", "litellm_params": {"model": "openai/x", "api_key": "os.environ/NOPE"}}]},
     "model_list[0].litellm_params.api_key", "NOPE is not set"),
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
def test_a_pass_through_that_reaches_a_model_call_is_refused(target: str, subpath: bool) -> None:
    with pytest.raises(ConfigError, match="model call"):
        config.from_dict(pass_through(target, subpath))


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
