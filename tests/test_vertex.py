"""Vertex AI through Envoy: the sidecar keeps a Google OAuth token fresh (google-auth, a
service account) and sends it as the deployment's credential; a fake of Google's token
endpoint checks the service account's RS256 signature, a fake Vertex takes only its tokens."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import anthropic
import openai
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import Gateway
from tests.harness import http, start_stack, wait_until

MASTER = "sk-vertex-master"
PROJECT, LOCATION = "proj-extauthz-test", "us-central1"
LIFETIME_S = 4  # short, so refreshes happen while the tests run


def service_account(upstream_port: int, email: str, register: bool) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    if register:
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        r = http("POST", f"http://127.0.0.1:{upstream_port}/__fake/google/keys",
                 {"client_email": email, "public_key_pem": public, "lifetime": LIFETIME_S})
        assert r.status == 200
    return json.dumps({"type": "service_account", "project_id": PROJECT, "private_key_id": "k1",
                       "private_key": pem, "client_email": email, "client_id": "1",
                       "token_uri": f"http://127.0.0.1:{upstream_port}/__fake/google/token"})


@pytest.fixture(scope="module")
def vertex(workdir: Path, redis_port: int, upstream_port: int) -> Iterator[Gateway]:
    good = service_account(upstream_port, "gateway@proj-extauthz-test.iam.gserviceaccount.com", True)
    unknown = service_account(upstream_port, "stranger@proj-extauthz-test.iam.gserviceaccount.com", False)
    common = {"vertex_project": PROJECT, "vertex_location": LOCATION, "api_base": f"http://127.0.0.1:{upstream_port}"}
    config = {
        "model_list": [
            {"model_name": "gemini-vertex", "litellm_params": {
                "model": "vertex_ai/gemini-1.5-pro", "vertex_credentials": "os.environ/TEST_VERTEX_SA", **common}},
            {"model_name": "claude-vertex", "litellm_params": {
                "model": "vertex_ai/claude-3-5-sonnet@20240620", "vertex_credentials": "os.environ/TEST_VERTEX_SA",
                **common}},
            {"model_name": "gemini-stranger", "litellm_params": {
                "model": "vertex_ai/gemini-1.5-flash", "vertex_credentials": "os.environ/TEST_VERTEX_STRANGER",
                **common}},
        ],
        "general_settings": {"master_key": MASTER},
    }
    path = workdir / "vertex.yaml"
    path.write_text(yaml.safe_dump(config))
    stack = start_stack(workdir, path, f"redis://127.0.0.1:{redis_port}/11",
                        {"TEST_VERTEX_SA": good, "TEST_VERTEX_STRANGER": unknown})
    try:
        yield Gateway(stack.envoy, upstream_port, stack.sidecar)
    finally:
        stack.stop()
    log = stack.sidecar.proc.log_text()
    assert "PRIVATE KEY" not in log and "ya29.fake" not in log
    assert "token refresh failed for google service_account stranger@" in log


def new_key(g: Gateway, models: list[str]) -> str:
    r = g.admin("/key/generate", {"models": models}, key=MASTER)
    assert r.status == 200, r.text
    return r.json()["key"]


def ready(g: Gateway, key: str) -> None:
    """The first token is fetched in the background after start-up."""
    wait_until(lambda: g.chat(key, "gemini-vertex").status == 200, what="a first Vertex token")


def plain_and_streamed(g: Gateway, client: anthropic.Anthropic | anthropic.AnthropicVertex) -> list[dict]:
    """One message asked plainly and one streamed: the answers read, what Vertex received."""
    g.forget_upstream()
    message = client.messages.create(model="claude-vertex", max_tokens=16,
                                     messages=[{"role": "user", "content": "Hello"}])
    assert message.content[0].text == "fake vertex"
    with client.messages.stream(model="claude-vertex", max_tokens=16,
                                messages=[{"role": "user", "content": "Hello"}]) as stream:
        assert "".join(stream.text_stream) == "fake vertex"
    return g.upstream_seen()


def test_openai_clients_reach_gemini_on_vertex_with_the_sidecars_token(vertex: Gateway) -> None:
    key = new_key(vertex, ["gemini-vertex"])
    ready(vertex, key)
    vertex.forget_upstream()
    client = openai.OpenAI(api_key=key, base_url=vertex.envoy.url + "/v1")
    completion = client.chat.completions.create(model="gemini-vertex", messages=[{"role": "user", "content": "Hi"}])
    assert completion.choices[0].message.content == "fake vertex"
    (seen,) = vertex.upstream_seen()
    assert seen["token_ok"] and seen["path"] == f"/v1/projects/{PROJECT}/locations/{LOCATION}/endpoints/openapi/" \
                                               "chat/completions"
    assert seen["body"]["model"] == "google/gemini-1.5-pro"
    assert key not in json.dumps(seen["headers"])


def test_the_anthropic_vertex_client_is_served(vertex: Gateway) -> None:
    key = new_key(vertex, ["claude-vertex", "gemini-vertex"])
    ready(vertex, key)
    client = anthropic.AnthropicVertex(access_token=key, base_url=vertex.envoy.url, project_id="clients-own",
                                       region="europe-west1")
    plain, streamed = plain_and_streamed(vertex, client)
    base = f"/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/anthropic/models/claude-3-5-sonnet@20240620"
    assert (plain["path"], streamed["path"]) == (base + ":rawPredict", base + ":streamRawPredict")
    assert plain["token_ok"] and streamed["token_ok"] and "model" not in plain["body"]


def test_anthropic_messages_become_the_raw_predict_body(vertex: Gateway) -> None:
    key = new_key(vertex, ["claude-vertex", "gemini-vertex"])
    ready(vertex, key)
    plain, streamed = plain_and_streamed(vertex, anthropic.Anthropic(api_key=key, base_url=vertex.envoy.url))
    assert plain["path"].endswith(":rawPredict") and streamed["path"].endswith(":streamRawPredict")
    assert plain["body"]["anthropic_version"] == "vertex-2023-10-16" and "model" not in plain["body"]
    assert streamed["body"]["stream"] is True


def test_tokens_are_refreshed_ahead_of_expiry(vertex: Gateway, upstream_port: int) -> None:
    key = new_key(vertex, ["gemini-vertex"])
    ready(vertex, key)
    issued_before = http("GET", f"http://127.0.0.1:{upstream_port}/__fake/google/token").json()["issued"]
    vertex.forget_upstream()
    deadline = time.monotonic() + 2.5 * LIFETIME_S
    statuses = []
    while time.monotonic() < deadline:
        statuses.append(vertex.chat(key, "gemini-vertex").status)
        time.sleep(0.25)
    assert set(statuses) == {200}, statuses
    seen = vertex.upstream_seen()
    assert all(s["token_ok"] for s in seen)
    assert len({s["headers"]["authorization"] for s in seen}) >= 2  # a new token took over
    issued = http("GET", f"http://127.0.0.1:{upstream_port}/__fake/google/token").json()["issued"]
    assert issued - issued_before >= 2


def test_without_a_valid_token_the_request_is_refused_and_counted(vertex: Gateway) -> None:
    key = new_key(vertex, ["gemini-stranger"])
    vertex.forget_upstream()
    r = vertex.chat(key, "gemini-stranger")
    assert r.status == 503 and r.json()["error"]["code"] == "credential_unavailable"
    assert vertex.upstream_seen() == []
    metrics_port = vertex.sidecar.metrics_port  # type: ignore[union-attr]
    text = http("GET", f"http://127.0.0.1:{metrics_port}/metrics").text
    assert 'extauthz_token_refreshes_total{result="failed"}' in text
