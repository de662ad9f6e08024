"""The official OpenAI and Anthropic SDKs pointed at the Envoy listener: what the user gets
back, and what the fake provider behind Envoy received (its ``echo``)."""

from __future__ import annotations

import json
from typing import Any, Callable

import anthropic
import openai
import pytest

from tests.conftest import ProviderGateway

OPENAI = ("authorization", "Bearer sk-prov-openai")
WILDCARD = ("authorization", "Bearer sk-prov-wildcard")
AZURE = ("api-key", "az-prov")
ANTHROPIC = ("x-api-key", "ant-prov")
VIRTUAL_KEY_HEADERS = ("authorization", "api-key", "x-api-key", "x-goog-api-key")
HELLO = [{"role": "user", "content": "Hello"}]
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4
AUDIO = ("a.wav", WAV, "audio/wav")


@pytest.fixture
def gw(provider_gateway: ProviderGateway) -> ProviderGateway:
    provider_gateway.forget()
    return provider_gateway


def openai_client(gw: ProviderGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.envoy.url}/v1", api_key=key, max_retries=0)


def azure_client(gw: ProviderGateway, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(azure_endpoint=gw.envoy.url, api_key=key, api_version="2024-02-01", max_retries=0)


def anthropic_client(gw: ProviderGateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.envoy.url, api_key=key, max_retries=0)


def echo_of(resp: Any) -> dict:
    """The fake upstream's report, kept by the SDK as an extra field of the parsed response."""
    return resp.to_dict()["echo"]


def upstream_got(resp: Any, gw: ProviderGateway, flavour: str, path: str, credential: tuple[str, str],
                 model: str, key: str) -> dict:
    """This flavour's upstream got the request at ``path`` with the deployment's credential and
    the provider-side ``model``, and no trace of the virtual key; returns what it received."""
    echo = echo_of(resp)
    assert gw.seen(flavour)[-1] == echo
    assert echo["host"] == gw.base(flavour), echo["host"]
    assert echo["path"] == path
    name, value = credential
    assert echo["headers"][name] == value
    assert [h for h in VIRTUAL_KEY_HEADERS if h in echo["headers"]] == [name]
    assert not any(h.startswith("x-extauthz") for h in echo["headers"])
    assert key not in json.dumps(echo)
    body = echo["body"]
    assert body.get("fields", body)["model"] == model
    return echo


def fake_text(path: str, model: str, credential: tuple[str, str]) -> str:
    """The text the fake upstream answers with: what the user reads."""
    return f"fake upstream: POST {path} model={model} credential={credential[1]}"


def nothing_forwarded(gw: ProviderGateway) -> None:
    assert {f: gw.seen(f) for f in gw.upstreams} == {f: [] for f in gw.upstreams}


def error_code(exc: openai.APIStatusError | anthropic.APIStatusError) -> str:
    error = exc.response.json()["error"]
    assert exc.response.headers["content-type"].startswith("application/json")
    return error["code"]


# -- OpenAI SDK, every endpoint ------------------------------------------------------------

def chat(c: openai.OpenAI, model: str) -> tuple[Any, Any]:
    resp = c.chat.completions.create(model=model, messages=HELLO)
    assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
    return resp, resp.choices[0].message.content


def completion(c: openai.OpenAI, model: str) -> tuple[Any, Any]:
    resp = c.completions.create(model=model, prompt="Hello")
    assert resp.object == "text_completion"
    return resp, resp.choices[0].text


def embedding(c: openai.OpenAI, model: str) -> tuple[Any, Any]:
    resp = c.embeddings.create(model=model, input="Hello")
    return resp, resp.data[0].embedding


def image(c: openai.OpenAI, model: str) -> tuple[Any, Any]:
    resp = c.images.generate(model=model, prompt="a cat")
    assert resp.data[0].url == "https://images.invalid/fake.png"
    return resp, resp.data[0].revised_prompt


def moderation(c: openai.OpenAI, model: str) -> tuple[Any, Any]:
    resp = c.moderations.create(model=model, input="Hello")
    return resp, resp.results[0].flagged


def response(c: openai.OpenAI, model: str) -> tuple[Any, Any]:
    resp = c.responses.create(model=model, input="Hello")
    assert resp.status == "completed"
    return resp, resp.output_text


def transcription(c: openai.OpenAI, model: str) -> tuple[Any, Any]:
    resp = c.audio.transcriptions.create(model=model, file=AUDIO)
    return resp, resp.text


def said(path: str, model: str, credential: tuple[str, str] = OPENAI) -> str:
    return fake_text(path, model, credential)


OPENAI_CALLS = [
    # (call, model the user names, key's models, upstream path, credential, provider model, what the user sees)
    (chat, "gpt-4o", ["gpt-4o"], "/v1/chat/completions", OPENAI, "gpt-4o",
     said("/v1/chat/completions", "gpt-4o")),
    (completion, "instruct", ["instruct"], "/v1/completions", OPENAI, "gpt-3.5-turbo-instruct",
     said("/v1/completions", "gpt-3.5-turbo-instruct")),
    (embedding, "text-embedding-3-small", ["text-embedding-3-small"], "/v1/embeddings", OPENAI,
     "text-embedding-3-small", [0.25, 0.5]),
    (image, "dall-e-3", ["dall-e-3"], "/v1/images/generations", OPENAI, "dall-e-3",
     said("/v1/images/generations", "dall-e-3")),
    (moderation, "omni-moderation-latest", ["omni-moderation-latest"], "/v1/moderations", OPENAI,
     "omni-moderation-latest", False),
    (response, "gpt-4o", ["gpt-4o"], "/v1/responses", OPENAI, "gpt-4o", said("/v1/responses", "gpt-4o")),
    (transcription, "whisper-1", ["whisper-1"], "/v1/audio/transcriptions", OPENAI, "whisper-1",
     said("/v1/audio/transcriptions", "whisper-1")),
    (chat, "gpt-4", ["gpt-4", "gpt-4o"], "/v1/chat/completions", OPENAI, "gpt-4o",
     said("/v1/chat/completions", "gpt-4o")),
    (chat, "openai/gpt-4o-mini", ["openai/*"], "/v1/chat/completions", WILDCARD, "gpt-4o-mini",
     said("/v1/chat/completions", "gpt-4o-mini", WILDCARD)),
]


@pytest.mark.parametrize("call,model,models,path,credential,provider_model,seen_by_user", [
    pytest.param(*case, id=f"{case[0].__name__}-{case[1]}") for case in OPENAI_CALLS])
def test_openai_sdk_reaches_the_deployment(gw: ProviderGateway, call: Callable, model: str, models: list[str],
                                           path: str, credential: tuple[str, str], provider_model: str,
                                           seen_by_user: Any) -> None:
    key = gw.new_key(models=models)
    resp, visible = call(openai_client(gw, key), model)
    assert visible == seen_by_user
    upstream_got(resp, gw, "openai", path, credential, provider_model, key)


def test_openai_sdk_request_details_arrive_intact(gw: ProviderGateway) -> None:
    key = gw.new_key(models=["gpt-4o", "whisper-1"])
    client = openai_client(gw, key)
    resp = client.chat.completions.create(model="gpt-4o", messages=HELLO, temperature=0.5, max_tokens=7)
    echo = upstream_got(resp, gw, "openai", "/v1/chat/completions", OPENAI, "gpt-4o", key)
    assert echo["body"] == {"model": "gpt-4o", "messages": HELLO, "temperature": 0.5, "max_tokens": 7}
    assert echo["headers"]["user-agent"].startswith("OpenAI/Python")

    resp = client.audio.transcriptions.create(model="whisper-1", file=AUDIO, language="en")
    echo = upstream_got(resp, gw, "openai", "/v1/audio/transcriptions", OPENAI, "whisper-1", key)
    assert echo["body"] == {"fields": {"model": "whisper-1", "language": "en"}, "files": {"file": len(WAV)}}


def test_openai_sdk_lists_exactly_the_keys_models(gw: ProviderGateway) -> None:
    key = gw.new_key(models=["gpt-4", "gpt-4o", "dall-e-3"])
    models = openai_client(gw, key).models.list()
    assert sorted(m.id for m in models) == ["dall-e-3", "gpt-4", "gpt-4o"]
    assert {m.owned_by for m in models} == {"openai"}
    nothing_forwarded(gw)


# -- denials, as the SDK raises them -------------------------------------------------------

def test_openai_sdk_denied_model_raises_permission_denied(gw: ProviderGateway) -> None:
    client = openai_client(gw, gw.new_key(models=["gpt-4o"]))
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(model="azure-gpt-4o", messages=HELLO)
    assert denied.value.status_code == 403
    assert denied.value.code == "model_not_allowed" and denied.value.body["code"] == "model_not_allowed"
    assert error_code(denied.value) == "model_not_allowed"
    assert "azure-gpt-4o" in denied.value.message
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.embeddings.create(model="text-embedding-3-small", input="Hello")
    assert error_code(denied.value) == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.audio.transcriptions.create(model="whisper-1", file=AUDIO)
    assert error_code(denied.value) == "model_not_allowed"
    nothing_forwarded(gw)


def test_openai_sdk_bogus_key_raises_authentication_error(gw: ProviderGateway) -> None:
    client = openai_client(gw, "sk-bogus")
    with pytest.raises(openai.AuthenticationError) as denied:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
    assert error_code(denied.value) == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    nothing_forwarded(gw)


def test_openai_sdk_cannot_reach_an_anthropic_model(gw: ProviderGateway) -> None:
    client = openai_client(gw, gw.new_key(models=["claude-sonnet"]))
    with pytest.raises(openai.BadRequestError) as denied:
        client.chat.completions.create(model="claude-sonnet", messages=HELLO)
    assert denied.value.status_code == 400 and error_code(denied.value) == "unsupported_route"
    nothing_forwarded(gw)


# -- Azure OpenAI SDK ----------------------------------------------------------------------

def test_azure_sdk_reaches_the_azure_deployment(gw: ProviderGateway) -> None:
    key = gw.new_key(models=["azure-gpt-4o", "azure-whisper"])
    client = azure_client(gw, key)
    path = "/openai/deployments/gpt4o-deployment/chat/completions?api-version=2024-10-21"
    resp = client.chat.completions.create(model="azure-gpt-4o", messages=HELLO)
    assert resp.choices[0].message.content == fake_text(path.split("?")[0], "gpt4o-deployment", AZURE)
    echo = upstream_got(resp, gw, "azure", path, AZURE, "gpt4o-deployment", key)
    assert echo["body"]["messages"] == HELLO

    path = "/openai/deployments/whisper-deployment/audio/transcriptions?api-version=2024-06-01"
    resp = client.audio.transcriptions.create(model="azure-whisper", file=AUDIO)
    assert resp.text.startswith(f"fake upstream: POST {path.split('?')[0]} ")
    # Azure picks the deployment from the path; the multipart model field is forwarded as sent.
    echo = upstream_got(resp, gw, "azure", path, AZURE, "azure-whisper", key)
    assert echo["body"]["files"] == {"file": len(WAV)}

    gw.forget()
    with pytest.raises(openai.PermissionDeniedError) as denied:
        azure_client(gw, gw.new_key(models=["gpt-4o"])).chat.completions.create(model="azure-gpt-4o", messages=HELLO)
    assert error_code(denied.value) == "model_not_allowed"
    nothing_forwarded(gw)


# -- Anthropic SDK -------------------------------------------------------------------------

def test_anthropic_sdk_messages(gw: ProviderGateway) -> None:
    key = gw.new_key(models=["claude-sonnet"])
    raw = anthropic_client(gw, key).messages.with_raw_response.create(
        model="claude-sonnet", max_tokens=16, messages=HELLO)
    message = raw.parse()
    assert message.type == "message" and message.stop_reason == "end_turn"
    assert message.content[0].text == fake_text("/v1/messages", "claude-sonnet-4-5", ANTHROPIC)
    echo = upstream_got(message, gw, "anthropic", "/v1/messages", ANTHROPIC, "claude-sonnet-4-5", key)
    assert echo["body"] == {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": HELLO}
    sent_version = raw.http_request.headers["anthropic-version"]
    assert sent_version and echo["headers"]["anthropic-version"] == sent_version


def test_the_sdks_stream_helpers_read_the_demo_upstream_through_the_gateway(gw: ProviderGateway) -> None:
    # A newcomer's first stream against `make run` must not fail in the SDK's own helper.
    key = gw.new_key(models=["claude-sonnet", "gpt-4o"])
    with anthropic_client(gw, key).messages.stream(model="claude-sonnet", max_tokens=16, messages=HELLO) as events:
        text = "".join(events.text_stream)
        final = events.get_final_message()
    assert text == "fake" and final.content[0].text == "fake" and final.stop_reason == "end_turn"
    with openai_client(gw, key).chat.completions.stream(model="gpt-4o", messages=HELLO) as chunks:
        for _ in chunks:
            pass
        completion = chunks.get_final_completion()
    assert completion.choices[0].message.content == "fake stream"
    assert completion.choices[0].finish_reason == "stop"


def test_anthropic_sdk_count_tokens(gw: ProviderGateway) -> None:
    key = gw.new_key(models=["claude-sonnet"])
    count = anthropic_client(gw, key).messages.count_tokens(model="claude-sonnet", messages=HELLO)
    assert count.input_tokens == 3
    echo = upstream_got(count, gw, "anthropic", "/v1/messages/count_tokens", ANTHROPIC, "claude-sonnet-4-5", key)
    assert "anthropic-version" in echo["headers"]


def test_anthropic_sdk_denials(gw: ProviderGateway) -> None:
    client = anthropic_client(gw, gw.new_key(models=["gpt-4o"]))
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        client.messages.create(model="claude-sonnet", max_tokens=16, messages=HELLO)
    assert denied.value.status_code == 403 and error_code(denied.value) == "model_not_allowed"
    with pytest.raises(anthropic.AuthenticationError) as bogus:
        anthropic_client(gw, "sk-bogus").messages.create(model="claude-sonnet", max_tokens=16, messages=HELLO)
    assert error_code(bogus.value) == "invalid_api_key"
    nothing_forwarded(gw)
