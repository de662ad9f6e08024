"""LiteLLM's own CLI (``lite``, from the litellm package, a test dependency) driven against
the gateway through Envoy, for every command whose routes the gateway serves."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Gateway
from tests.harness import BIN, MASTER_KEY


def lite(gateway: Gateway, *args: str, home: Path, key: str = MASTER_KEY) -> str:
    env = {**os.environ, "HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200",
           "LITELLM_PROXY_URL": gateway.envoy.url, "LITELLM_PROXY_API_KEY": key}
    done = subprocess.run([str(BIN / "lite"), *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, f"lite {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def lite_json(gateway: Gateway, *args: str, home: Path, key: str = MASTER_KEY):
    return json.loads(lite(gateway, *args, "--format", "json", home=home, key=key))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path  # the CLI keeps its own config under $HOME


def test_models_list_and_info(gateway: Gateway, home: Path) -> None:
    listed = lite_json(gateway, "models", "list", home=home)
    assert {"gpt-4", "gpt-3.5-turbo", "azure-gpt-3.5"} <= {m["id"] for m in listed}
    info = lite_json(gateway, "models", "info", home=home)
    by_id = {m["model_info"]["id"]: m for m in info}
    assert by_id["1:gpt-4"]["model_name"] == "gpt-4" and by_id["1:gpt-4"]["model_info"]["routable"] is True
    assert "sk-upstream" not in json.dumps(info)  # provider credentials never leave the gateway


def test_model_groups_list_shows_what_the_key_may_use(gateway: Gateway, home: Path) -> None:
    key = gateway.new_key(models=["beta-models"])
    groups = lite_json(gateway, "model-groups", "list", home=home, key=key)
    assert [g["model_group"] for g in groups] == ["gpt-4", "fireworks-llama-v3-70b-instruct"]
    assert all(g["mode"] == "chat" and "beta-models" in g["access_groups"] for g in groups)
    table = lite(gateway, "model-groups", "list", home=home, key=key)
    assert "gpt-4" in table and "gpt-3.5-turbo" not in table


def test_keys_generate_list_delete(gateway: Gateway, home: Path) -> None:
    made = json.loads(lite(gateway, "keys", "generate", "--models", "gpt-4", "--key-alias", "cli-made", home=home))
    key = made["key"]
    assert gateway.chat(key, "gpt-4").status == 200
    assert gateway.chat(key, "gpt-4o").status == 403
    listed = lite_json(gateway, "keys", "list", "--key-alias", "cli-made", "--return-full-object", home=home)
    assert [k["key_alias"] for k in listed["keys"]] == ["cli-made"]
    lite(gateway, "keys", "delete", "--key-aliases", "cli-made", home=home)
    assert gateway.chat(key, "gpt-4").status == 401


def test_http_request(gateway: Gateway, home: Path) -> None:
    out = lite(gateway, "http", "request", "GET", "/model/info", home=home)
    assert '"model_name": "gpt-4"' in out


def test_a_key_without_the_master_key_is_refused_by_admin_commands(gateway: Gateway, home: Path) -> None:
    key = gateway.new_key(models=["gpt-4"])
    env = {**os.environ, "HOME": str(home), "LITELLM_PROXY_URL": gateway.envoy.url, "LITELLM_PROXY_API_KEY": key}
    done = subprocess.run([str(BIN / "lite"), "keys", "list"], capture_output=True, text=True, env=env, timeout=120)
    # Its owner is no user with a role: a key of no one's has no admin powers (LiteLLM's 401).
    assert done.returncode != 0 and "401 Client Error: Unauthorized" in done.stdout + done.stderr
