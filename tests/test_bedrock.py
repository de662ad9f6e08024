"""AWS Bedrock through Envoy: the sidecar routes, Envoy signs (SigV4) with its own AWS
credentials, a fake Bedrock checks the signature over the exact bytes it received."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Iterator

import anthropic
import openai
import pytest
import yaml

from tests.conftest import Gateway
from tests.harness import http, start_stack
from tests.test_usage import wait_for

MASTER = "sk-bedrock-master"
CLAUDE_ID = "anthropic.claude-3-5-sonnet-20240620-v1:0"
GPT_OSS_ID = "openai.gpt-oss-120b-1:0"
# The fake's credential (tools/fake_upstream.py): Envoy's environment carries it, the sidecar never does.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIAEXTAUTHZFAKE0001", "AWS_SECRET_ACCESS_KEY": "fake/secret/for/sigv4/tests/0000000000"}


@pytest.fixture(scope="module")
def bedrock(workdir: Path, redis_port: int, upstream_port: int) -> Iterator[Gateway]:
    endpoint = f"http://127.0.0.1:{upstream_port}"
    config = {
        "model_list": [
            {"model_name": "claude-bedrock", "litellm_params": {
                "model": f"bedrock/{CLAUDE_ID}", "aws_region_name": "us-east-1",
                "aws_bedrock_runtime_endpoint": endpoint}},
            {"model_name": "gpt-oss", "litellm_params": {
                "model": f"bedrock/{GPT_OSS_ID}", "aws_region_name": "us-east-1",
                "aws_bedrock_runtime_endpoint": endpoint}},
            {"model_name": "titan", "litellm_params": {"model": "bedrock/amazon.titan-text-express-v1",
                                                      "aws_region_name": "us-east-1"}},
            # Same host as Bedrock, not Bedrock: never signed with the AWS identity.
            {"model_name": "same-host-openai", "litellm_params": {"model": "openai/x", "api_base": f"{endpoint}/v1",
                                                                 "api_key": "sk-same-host"}},
        ],
        "general_settings": {"master_key": MASTER, "pass_through_endpoints": [
            {"path": "/bedrock-guardrail", "target": f"{endpoint}/guardrail", "include_subpath": True}]},
    }
    path = workdir / "bedrock.yaml"
    path.write_text(yaml.safe_dump(config))
    stack = start_stack(workdir, path, f"redis://127.0.0.1:{redis_port}/10", envoy_env=AWS_ENV)
    try:
        yield Gateway(stack.envoy, upstream_port)
    finally:
        stack.stop()
    assert AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in stack.sidecar.proc.log_text()


def new_key(g: Gateway, models: list[str]) -> str:
    r = g.admin("/key/generate", {"models": models}, key=MASTER)
    assert r.status == 200, r.text
    return r.json()["key"]


def only_request(g: Gateway) -> dict:
    (seen,) = g.upstream_seen()
    return seen


def test_the_anthropic_bedrock_client_is_served_and_envoy_signs(bedrock: Gateway) -> None:
    key = new_key(bedrock, ["claude-bedrock"])
    client = anthropic.AnthropicBedrock(api_key=key, base_url=bedrock.envoy.url, aws_region="us-east-1")
    bedrock.forget_upstream()
    message = client.messages.create(model="claude-bedrock", max_tokens=16,
                                     messages=[{"role": "user", "content": "Hello"}])
    assert message.content[0].text == "fake bedrock"
    seen = only_request(bedrock)
    assert seen["signature_ok"], seen
    assert seen["path"] == f"/model/{CLAUDE_ID.replace(':', '%3A')}/invoke"
    assert seen["headers"]["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIAEXTAUTHZFAKE0001/")
    assert key not in json.dumps(seen["headers"])
    assert "anthropic_version" in seen["body"] and "model" not in seen["body"]  # as the client sent it


def test_the_anthropic_bedrock_client_streams(bedrock: Gateway) -> None:
    key = new_key(bedrock, ["claude-bedrock"])
    client = anthropic.AnthropicBedrock(api_key=key, base_url=bedrock.envoy.url, aws_region="us-east-1")
    bedrock.forget_upstream()
    with client.messages.stream(model="claude-bedrock", max_tokens=16, extra_headers={"x-fake-usage": "1000,100"},
                                messages=[{"role": "user", "content": "Hello"}]) as stream:
        text = "".join(stream.text_stream)
    assert text == "fake bedrock"
    seen = only_request(bedrock)
    assert seen["signature_ok"] and seen["path"].endswith("/invoke-with-response-stream")
    # Its usage, in the base64 payloads of AWS's event stream, is read and priced (the
    # bundled price of this Claude on Bedrock: 3e-06 in, 1.5e-05 out per token).
    wait_for(lambda: spend(bedrock, key) == pytest.approx(1000 * 3e-06 + 100 * 1.5e-05), "the stream's cost")


def spend(g: Gateway, key: str) -> float:
    return g.admin(f"/key/info?key={key}", method="GET", key=MASTER).json()["info"]["spend"]


def test_an_anthropic_messages_request_becomes_the_invoke_body(bedrock: Gateway) -> None:
    key = new_key(bedrock, ["claude-bedrock"])
    client = anthropic.Anthropic(api_key=key, base_url=bedrock.envoy.url)
    bedrock.forget_upstream()
    raw = (b'{"max_tokens": 16, "model" : "claude-bedrock", "stream": false,\n'
           b' "messages": [{"role": "user", "content": "caf\\u00e9 \xe2\x82\xac"}], "metadata": {"user_id": "u"}}')
    r = http("POST", bedrock.envoy.url + "/v1/messages", raw=raw,
             headers={"x-api-key": key, "content-type": "application/json", "anthropic-version": "2023-06-01"})
    assert r.status == 200, r.text
    seen = only_request(bedrock)
    assert seen["signature_ok"] and seen["path"] == f"/model/{CLAUDE_ID.replace(':', '%3A')}/invoke"
    # The documented rewrite and nothing else: "model" became "anthropic_version", "stream" went.
    assert base64.b64decode(seen["raw_body"]) == (
        b'{"max_tokens": 16, "anthropic_version": "bedrock-2023-05-31", "messages": [{"role": "user", '
        b'"content": "caf\\u00e9 \xe2\x82\xac"}], "metadata": {"user_id": "u"}}')
    message = client.messages.create(model="claude-bedrock", max_tokens=16,
                                     messages=[{"role": "user", "content": "Hello"}])
    assert message.content[0].text == "fake bedrock"


def test_streaming_anthropic_messages_to_bedrock_is_refused_not_mistranslated(bedrock: Gateway) -> None:
    key = new_key(bedrock, ["claude-bedrock"])
    bedrock.forget_upstream()
    body = {"model": "claude-bedrock", "max_tokens": 16, "stream": True, "messages": []}
    r = http("POST", bedrock.envoy.url + "/v1/messages", body, {"x-api-key": key})
    assert r.status == 400 and r.json()["error"]["code"] == "unsupported_route"
    assert bedrock.upstream_seen() == []


def test_openai_clients_reach_bedrock_openai_models(bedrock: Gateway) -> None:
    key = new_key(bedrock, ["gpt-oss"])
    client = openai.OpenAI(api_key=key, base_url=bedrock.envoy.url + "/v1")
    bedrock.forget_upstream()
    completion = client.chat.completions.create(model="gpt-oss", messages=[{"role": "user", "content": "Hi"}])
    assert completion.choices[0].message.content == "fake bedrock"
    seen = only_request(bedrock)
    assert seen["signature_ok"] and seen["path"] == "/openai/v1/chat/completions"
    assert seen["body"]["model"] == GPT_OSS_ID


@pytest.mark.parametrize("model,status,code", [("claude-bedrock", 403, "model_not_allowed"),
                                               ("titan", 503, "deployment_unavailable")])
def test_refusals_reach_no_one(bedrock: Gateway, model: str, status: int, code: str) -> None:
    key = new_key(bedrock, ["gpt-oss", "titan"])
    client = anthropic.AnthropicBedrock(api_key=key, base_url=bedrock.envoy.url, aws_region="us-east-1",
                                        max_retries=0)
    bedrock.forget_upstream()
    with pytest.raises(anthropic.APIStatusError) as e:
        client.messages.create(model=model, max_tokens=16, messages=[{"role": "user", "content": "Hello"}])
    assert e.value.status_code == status and code in str(e.value.body)
    assert bedrock.upstream_seen() == []


def test_an_openai_request_for_an_anthropic_bedrock_model_is_refused(bedrock: Gateway) -> None:
    key = new_key(bedrock, ["claude-bedrock"])
    r = bedrock.chat(key, "claude-bedrock")
    assert r.status == 400 and r.json()["error"]["code"] == "unsupported_route"


def test_nothing_but_a_bedrock_deployment_is_signed_on_bedrocks_host(bedrock: Gateway) -> None:
    key = new_key(bedrock, ["same-host-openai"])
    bedrock.forget_upstream()
    assert bedrock.chat(key, "same-host-openai").status == 200
    r = http("POST", bedrock.envoy.url + "/bedrock-guardrail/g1/version/1/apply", {"content": []},
             {"Authorization": f"Bearer {key}", "X-Amz-Security-Token": "client-chosen"})
    assert r.status == 200
    chat, guard = bedrock.upstream_seen()
    assert chat["headers"]["authorization"] == "Bearer sk-same-host"
    assert "authorization" not in guard["headers"] and "x-amz-security-token" not in guard["headers"]
    assert not any(h.startswith("x-amz-date") for h in guard["headers"])


def test_a_client_cannot_pick_what_the_operators_aws_identity_is_billed_for(bedrock: Gateway) -> None:
    key = new_key(bedrock, ["claude-bedrock"])
    client = anthropic.AnthropicBedrock(api_key=key, base_url=bedrock.envoy.url, aws_region="us-east-1",
                                        default_headers={"X-Amzn-Bedrock-Service-Tier": "priority",
                                                         "X-Amzn-Bedrock-GuardrailIdentifier": "theirs"})
    bedrock.forget_upstream()
    client.messages.create(model="claude-bedrock", max_tokens=16, messages=[{"role": "user", "content": "Hello"}])
    seen = only_request(bedrock)
    assert seen["signature_ok"]
    assert not any(h.startswith("x-amzn-bedrock-") for h in seen["headers"])
