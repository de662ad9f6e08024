"""Models managed at runtime (LiteLLM's /model/new, /model/update, PATCH /model/{id}/update,
/model/delete with store_model_in_db), through real Envoy, two replicas on one real Redis:
a model added on one replica is served by both, its credential reaches the provider and
nowhere else (not Redis in clear, not an answer, not a log, not the audit trail)."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import Gateway
from tests.harness import MASTER_KEY, Stack, http, start_redis, start_stack, start_upstream, wait_until, write_config

SALT = "salt-" + secrets.token_hex(16)
ENV = {"STORE_MODEL_IN_DB": "True", "LITELLM_SALT_KEY": SALT}


@pytest.fixture(scope="module")
def replicas(workdir: Path) -> Iterator[tuple[Gateway, Gateway, int]]:
    """Two sidecars, each behind its own Envoy, on a Redis of this module's."""
    redis_proc, redis_port = start_redis(workdir)
    upstream, upstream_port = start_upstream(workdir)
    config = write_config(workdir, upstream_port)
    stacks: list[Stack] = []
    try:
        for _ in range(2):
            stacks.append(start_stack(workdir, config, f"redis://127.0.0.1:{redis_port}/0", ENV))
        yield (Gateway(stacks[0].envoy, upstream_port, stacks[0].sidecar),
               Gateway(stacks[1].envoy, upstream_port, stacks[1].sidecar), redis_port)
    finally:
        for stack in stacks:
            stack.stop()
        upstream.stop()
        redis_proc.stop()


def new_model(gateway: Gateway, name: str, credential: str, **info: Any) -> dict:
    r = gateway.admin("/model/new", {"model_name": name, "litellm_params": {
        "model": "openai/provider-" + name, "api_base": f"http://127.0.0.1:{gateway.upstream_port}/v1",
        "api_key": credential}, "model_info": info})
    assert r.status == 200, r.text
    return r.json()


def served(gateway: Gateway, key: str, model: str) -> bool:
    return gateway.chat(key, model).status == 200


def redis_dump(redis_port: int) -> str:
    """Every value Redis holds, as text (strings, sets, hashes, the audit stream)."""
    def cli(*args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(redis_port), *args], capture_output=True, text=True,
                              check=True).stdout
    out = []
    for key in cli("--scan").split():
        kind = cli("TYPE", key).strip()
        command = {"string": ["GET"], "set": ["SMEMBERS"], "hash": ["HGETALL"], "zset": ["ZRANGE", "0", "-1"],
                   "stream": ["XRANGE", "-", "+"], "list": ["LRANGE", "0", "-1"]}.get(kind, ["TYPE"])
        out.append(key + " " + cli(command[0], key, *command[1:]))
    return "\n".join(out)


def test_a_model_added_on_one_replica_is_served_by_both_with_its_credential(replicas) -> None:
    one, two, redis_port = replicas
    credential = "sk-runtime-" + secrets.token_hex(20)
    key = one.new_key()
    created = new_model(one, "rt-chat", credential)
    assert created["litellm_params"]["api_key"] == "[redacted]" and credential not in json.dumps(created)
    assert created["model_info"]["db_model"] is True and created["model_info"]["routable"] is True
    for gateway in (one, two):   # the other replica learns it from the invalidation channel
        wait_until(lambda g=gateway: served(g, key, "rt-chat"), what="the runtime model served")
        gateway.forget_upstream()
        assert gateway.chat(key, "rt-chat").status == 200
        (seen,) = gateway.upstream_seen()
        assert seen["headers"]["authorization"] == f"Bearer {credential}"
        assert seen["body"]["model"] == "provider-rt-chat"
    info = one.admin("/model/info", method="GET").json()["data"]
    (listed,) = [m for m in info if m["model_name"] == "rt-chat"]
    assert listed["model_info"]["id"] == created["model_id"] and listed["model_info"]["db_model"] is True
    assert credential not in json.dumps(info)
    assert "rt-chat" in [m["id"] for m in one.admin("/v1/models", method="GET", key=key).json()["data"]]
    # What Redis, the answers, the audit trail and the logs hold: never the credential.
    assert credential not in redis_dump(redis_port)
    assert credential not in json.dumps(one.admin("/audit", method="GET").json())
    for gateway in (one, two):
        assert gateway.sidecar is not None and credential not in gateway.sidecar.proc.log_text()


def test_update_changes_the_credential_and_delete_ends_the_model_on_both_replicas(replicas) -> None:
    one, two, _ = replicas
    key = one.new_key()
    first, second = "sk-first-" + secrets.token_hex(12), "sk-second-" + secrets.token_hex(12)
    model_id = new_model(one, "rt-updated", first)["model_id"]
    wait_until(lambda: served(two, key, "rt-updated"), what="served on the other replica")
    r = two.admin("/model/update", {"model_info": {"id": model_id}, "litellm_params": {"api_key": second}})
    assert r.status == 200, r.text
    assert second not in r.text

    def uses(gateway: Gateway, credential: str) -> bool:
        gateway.forget_upstream()
        return gateway.chat(key, "rt-updated").status == 200 and \
            gateway.upstream_seen()[-1]["headers"]["authorization"] == f"Bearer {credential}"
    for gateway in (one, two):
        wait_until(lambda g=gateway: uses(g, second), what="the new credential used")
    r = one.admin(f"/model/{model_id}/update", {"litellm_params": {"model": "openai/renamed-provider-model"}},
                  method="PATCH")
    assert r.status == 200, r.text
    wait_until(lambda: uses(two, second) and two.upstream_seen()[-1]["body"]["model"] == "renamed-provider-model",
               what="the patched model used, the credential kept")
    r = one.admin("/model/delete", {"id": model_id})
    assert r.status == 200 and r.json() == {"message": f"Model: {model_id} deleted successfully"}, r.text
    for gateway in (one, two):
        wait_until(lambda g=gateway: g.chat(key, "rt-updated").status in (400, 403, 404),
                   what="the deleted model refused")
    assert one.admin("/model/delete", {"id": model_id}).status == 400


def test_only_admins_change_models(replicas) -> None:
    one, _, _ = replicas
    plain = one.new_key()
    viewer_user = "viewer-" + secrets.token_hex(4)
    assert one.admin("/user/new", {"user_id": viewer_user, "user_role": "proxy_admin_viewer",
                                   "auto_create_key": False}).status == 200
    viewer = one.new_key(user_id=viewer_user)
    body = {"model_name": "rt-refused", "litellm_params": {"model": "openai/x", "api_key": "sk-" + "x" * 20}}
    for key in (plain, viewer):
        r = one.admin("/model/new", body, key=key)
        assert r.status in (401, 403), r.text
    assert all(m["model_name"] != "rt-refused" for m in one.admin("/model/info", method="GET").json()["data"])


def test_a_config_model_keeps_its_name_and_cannot_be_edited(replicas) -> None:
    one, _, _ = replicas
    r = one.admin("/model/new", {"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o"}})
    assert r.status == 400 and "config" in r.json()["error"]["message"]
    config_id = next(m["model_info"]["id"] for m in one.admin("/model/info", method="GET").json()["data"]
                     if m["model_name"] == "gpt-4o")
    r = one.admin("/model/update", {"model_info": {"id": config_id}, "litellm_params": {"api_key": "sk-new"}})
    assert r.status == 400 and "Model in config" in r.json()["error"]["message"]


def test_a_model_that_cannot_be_served_is_stored_and_reported(replicas) -> None:
    one, _, _ = replicas
    r = one.admin("/model/new", {"model_name": "rt-unroutable", "litellm_params": {
        "model": "sagemaker/x", "api_key": "sk-" + secrets.token_hex(12)}})
    assert r.status == 200, r.text
    assert r.json()["model_info"]["routable"] is False and "SageMaker" in r.json()["model_info"]["reason"]
    (listed,) = [m for m in one.admin("/model/info", method="GET").json()["data"] if m["model_name"] == "rt-unroutable"]
    assert listed["model_info"]["routable"] is False
    r = one.admin("/model/new", {"model_name": "rt-bad", "litellm_params": {"model": "openai/x", "weight": -1}})
    assert r.status == 400 and "weight" in r.json()["error"]["message"]


def test_models_survive_a_restart_of_the_sidecar(replicas, workdir: Path) -> None:
    one, _, redis_port = replicas
    key = one.new_key()
    new_model(one, "rt-durable", "sk-durable-" + secrets.token_hex(12))
    assert one.sidecar is not None
    config = Path(one.sidecar.proc.args[one.sidecar.proc.args.index("--config") + 1])
    fresh = start_stack(workdir, config, f"redis://127.0.0.1:{redis_port}/0", ENV)   # a new process reads them
    try:
        assert served(Gateway(fresh.envoy, one.upstream_port), key, "rt-durable")
    finally:
        fresh.stop()


def test_without_store_model_in_db_the_routes_answer_as_litellm_does(gateway: Gateway) -> None:
    r = gateway.admin("/model/new", {"model_name": "x", "litellm_params": {"model": "openai/x"}})
    assert r.status == 500
    assert "STORE_MODEL_IN_DB" in r.json()["error"]["message"]
    assert http("GET", gateway.envoy.url + "/v2/model/info", headers={"Authorization": f"Bearer {MASTER_KEY}"}
                ).status == 200


def test_a_model_on_a_new_host_is_served_by_every_replica_without_restarting_envoy(replicas, workdir: Path) -> None:
    one, two, _ = replicas
    other, other_port = start_upstream(workdir)   # a host:port no Envoy was rendered with
    try:
        key = one.new_key()
        credential = "sk-elsewhere-" + secrets.token_hex(16)
        r = one.admin("/model/new", {"model_name": "rt-new-host", "litellm_params": {
            "model": "openai/far-model", "api_base": f"http://127.0.0.1:{other_port}/v1", "api_key": credential}})
        assert r.status == 200 and r.json()["model_info"]["routable"] is True, r.text
        for gateway in (one, two):
            wait_until(lambda g=gateway: served(g, key, "rt-new-host"), what="served on the new host")
        seen = http("GET", f"http://127.0.0.1:{other_port}/__fake/requests").json()
        assert seen and all(s["headers"]["authorization"] == f"Bearer {credential}" for s in seen)
        assert {s["body"]["model"] for s in seen} == {"far-model"}
        assert all(s["host"] == f"127.0.0.1:{other_port}" for s in seen)
    finally:
        other.stop()


def test_a_model_on_a_host_that_does_not_answer_gets_a_json_error(replicas) -> None:
    one, _, _ = replicas
    key = one.new_key()
    r = one.admin("/model/new", {"model_name": "rt-nowhere", "litellm_params": {
        "model": "openai/x", "api_base": "http://nowhere.invalid/v1", "api_key": "sk-" + secrets.token_hex(16)}})
    assert r.status == 200, r.text
    wait_until(lambda: one.chat(key, "rt-nowhere").status == 503, what="a 503 for an unresolvable host")
    answer = one.chat(key, "rt-nowhere")
    assert answer.json()["error"]["message"], answer.text


@pytest.mark.parametrize("variable", ["LITELLM_SALT_KEY", "EXTAUTHZ_REDIS_URL", "REDIS_PASSWORD", "HOME"])
def test_a_runtime_model_names_only_variables_the_config_sends_to_that_host(replicas, variable) -> None:
    one, _, _ = replicas
    r = one.admin("/model/new", {"model_name": "rt-exfiltrate-" + secrets.token_hex(3), "litellm_params": {
        "model": "openai/x", "api_base": f"http://127.0.0.1:{one.upstream_port}/v1",
        "api_key": f"os.environ/{variable}"}})
    assert r.status == 400 and variable in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("entry", [
    {"model_name": "os.environ/LITELLM_SALT_KEY", "litellm_params": {"model": "openai/x"}},
    {"model_name": "rt-env-version", "litellm_params": {"model": "openai/x", "api_version": "os.environ/HOME"}},
    {"model_name": "rt-env-model", "litellm_params": {"model": "os.environ/HOME"}},
    {"model_name": "rt-env-info", "litellm_params": {"model": "openai/x"}, "model_info": {"note": "os.environ/HOME"}},
])
def test_the_environment_is_read_for_credentials_only(replicas, entry) -> None:
    one, _, _ = replicas
    r = one.admin("/model/new", entry)
    assert r.status == 400 and "only a credential" in r.json()["error"]["message"], r.text
    listed = json.dumps(one.admin("/model/info", method="GET").json())
    assert SALT not in listed


@pytest.mark.parametrize("name", ["openai/gpt-4o-mini", "openai/gpt-4*", "openai/*", "gpt-4"])
def test_a_runtime_model_cannot_take_calls_the_config_serves(replicas, name) -> None:
    """The example config serves openai/* (a pattern) and gpt-4 (a name): a runtime model
    named inside either would take its callers' prompts elsewhere."""
    one, _, _ = replicas
    r = one.admin("/model/new", {"model_name": name, "litellm_params": {
        "model": "openai/x", "api_base": f"http://127.0.0.1:{one.upstream_port}/v1", "api_key": "sk-" + "a" * 24}})
    assert r.status == 400 and "config" in r.json()["error"]["message"], r.text


def test_a_stored_credential_does_not_follow_the_model_to_another_host(replicas, workdir: Path) -> None:
    one, _, _ = replicas
    model_id = new_model(one, "rt-kept-credential", "sk-kept-" + secrets.token_hex(12))["model_id"]
    other, other_port = start_upstream(workdir)
    try:
        r = one.admin(f"/model/{model_id}/update", {"litellm_params": {
            "api_base": f"http://127.0.0.1:{other_port}/v1"}}, method="PATCH")
        assert r.status == 400 and "credential again" in r.json()["error"]["message"], r.text
        r = one.admin(f"/model/{model_id}/update", {"litellm_params": {
            "api_base": f"http://127.0.0.1:{other_port}/v1", "api_key": "sk-new-" + secrets.token_hex(12)}},
            method="PATCH")
        assert r.status == 200, r.text
    finally:
        other.stop()


@pytest.mark.parametrize("params,why", [
    ({"model": "vertex_ai/gemini-1.5-pro", "vertex_project": "my-project-123", "vertex_location": "us-central1"},
     "identity"),
    ({"model": "openai/x", "api_base": "http://169.254.169.254/v1", "api_key": "sk-" + "b" * 24}, "link-local"),
    ({"model": "openai/x", "api_key": {"private_key": "-----BEGIN PRIVATE KEY-----"}}, "string"),
    ({"model": "bedrock/anthropic.claude-3-haiku-20240307-v1:0", "aws_region_name": "ap-south-2"}, "regions"),
])
def test_what_a_runtime_model_may_not_reach(replicas, params, why) -> None:
    one, _, _ = replicas
    r = one.admin("/model/new", {"model_name": "rt-reach-" + secrets.token_hex(3), "litellm_params": params})
    assert r.status == 400 and why in r.json()["error"]["message"], r.text


def test_a_document_written_by_hand_does_not_stop_the_others(replicas) -> None:
    one, two, redis_port = replicas
    key = one.new_key()
    subprocess.run(["redis-cli", "-p", str(redis_port), "SET", "extauthz:model:by-hand", '{"litellm_params":"oops"}'],
                   check=True, capture_output=True)
    subprocess.run(["redis-cli", "-p", str(redis_port), "SADD", "extauthz:models", "by-hand", "not-json"],
                   check=True, capture_output=True)
    subprocess.run(["redis-cli", "-p", str(redis_port), "SET", "extauthz:model:not-json", "{nope"],
                   check=True, capture_output=True)
    try:
        new_model(one, "rt-after-bad", "sk-after-" + secrets.token_hex(12))
        for gateway in (one, two):
            wait_until(lambda g=gateway: served(g, key, "rt-after-bad"), what="served beside a bad document")
        listed = {m["model_info"]["id"]: m for m in one.admin("/model/info", method="GET").json()["data"]}
        assert listed["by-hand"]["model_info"]["routable"] is False
    finally:
        subprocess.run(["redis-cli", "-p", str(redis_port), "DEL", "extauthz:model:by-hand", "extauthz:model:not-json"],
                       check=True, capture_output=True)
        subprocess.run(["redis-cli", "-p", str(redis_port), "SREM", "extauthz:models", "by-hand", "not-json"],
                       check=True, capture_output=True)


def test_a_reload_that_adds_a_host_is_served_without_restarting_envoy(workdir: Path) -> None:
    redis_proc, redis_port = start_redis(workdir)
    upstream, upstream_port = start_upstream(workdir)
    added, added_port = start_upstream(workdir)
    config = write_config(workdir, upstream_port)
    stack = start_stack(workdir, config, f"redis://127.0.0.1:{redis_port}/0")
    try:
        gateway = Gateway(stack.envoy, upstream_port, stack.sidecar)
        key = gateway.new_key()
        assert gateway.chat(key, "reloaded-model").status != 200
        config.write_text(config.read_text().replace("model_list:\n", f"""model_list:
  - model_name: reloaded-model
    litellm_params:
      model: openai/reloaded-provider-model
      api_base: http://127.0.0.1:{added_port}/v1
      api_key: sk-reloaded-{secrets.token_hex(8)}
""", 1))
        stack.sidecar.proc.popen.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_until(lambda: served(gateway, key, "reloaded-model"), what="the reloaded model served")
        (seen,) = http("GET", f"http://127.0.0.1:{added_port}/__fake/requests").json()[-1:]
        assert seen["body"]["model"] == "reloaded-provider-model"
    finally:
        stack.stop()
        added.stop()
        upstream.stop()
        redis_proc.stop()


def test_access_groups_of_a_runtime_model_admit_as_in_the_config(replicas) -> None:
    one, _, _ = replicas
    new_model(one, "rt-grouped", "sk-grouped-" + secrets.token_hex(12), access_groups=["rt-group"])
    grouped = one.new_key(models=["rt-group"])   # (a key names groups that exist)
    other = one.new_key(models=["gpt-4o"])
    wait_until(lambda: served(one, grouped, "rt-grouped"), what="the group's key served")
    answer = one.chat(other, "rt-grouped")
    assert answer.status == 403 and answer.json()["error"]["code"] == "model_not_allowed", answer.text


def test_team_models_are_refused_rather_than_opened_to_everyone(replicas) -> None:
    one, _, _ = replicas
    r = one.admin("/model/new", {"model_name": "rt-team-only", "litellm_params": {
        "model": "openai/x", "api_base": f"http://127.0.0.1:{one.upstream_port}/v1", "api_key": "sk-" + "c" * 24},
        "model_info": {"team_id": "some-team"}})
    assert r.status == 400 and "team_id" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("given", [{"api_key": None}, {"aws_session_token": "x" * 24}])
def test_a_stored_credential_does_not_follow_by_naming_another_or_none(replicas, workdir: Path, given) -> None:
    """Moving a model to another host takes its credentials given anew: a credential given
    as null, or another credential parameter, does not let the stored one come along."""
    one, _, _ = replicas
    stored = "sk-stays-" + secrets.token_hex(12)
    model_id = new_model(one, "rt-stays-" + secrets.token_hex(3), stored)["model_id"]
    other, other_port = start_upstream(workdir)
    key = one.new_key()
    try:
        r = one.admin(f"/model/{model_id}/update", {"litellm_params": {
            "api_base": f"http://127.0.0.1:{other_port}/v1", **given}}, method="PATCH")
        if r.status == 200:
            name = r.json()["model_name"]
            wait_until(lambda: one.chat(key, name).status in (200, 400, 401, 403, 503), what="an answer")
            one.chat(key, name)
            seen = http("GET", f"http://127.0.0.1:{other_port}/__fake/requests").json()
            assert all(stored not in json.dumps(s["headers"]) for s in seen), seen
        else:
            assert r.status == 400, r.text
    finally:
        other.stop()


@pytest.mark.parametrize("part", ["litellm_params", "model_info"])
def test_a_model_entry_is_bounded_in_size(replicas, part) -> None:
    one, _, _ = replicas
    params = {"model": "openai/x", "api_base": f"http://127.0.0.1:{one.upstream_port}/v1", "api_key": "sk-" + "d" * 24}
    big = {"padding": "p" * 20_000}
    r = one.admin("/model/new", {"model_name": "rt-big-" + secrets.token_hex(3),
                                 "litellm_params": {**params, **(big if part == "litellm_params" else {})},
                                 "model_info": big if part == "model_info" else {}})
    assert r.status == 400 and "16384 bytes" in r.json()["error"]["message"], r.text
