"""Every endpoint and provider flavour through a real Envoy: what each provider received,
and what is denied. One fake upstream per flavour, so the host proves the routing."""

from __future__ import annotations

import base64
import gzip
import json
import re
import zlib
from collections import Counter

import pytest

from tests.conftest import ProviderGateway
from tests.harness import Response, http, wait_until

VIRTUAL_KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4


def post(gw: ProviderGateway, path: str, key: str | None, body: object = None, headers: dict | None = None,
         raw: bytes | None = None) -> Response:
    all_headers = {"Authorization": f"Bearer {key}"} if key else {}
    all_headers.update(headers or {})
    return http("POST", gw.envoy.url + path, body, all_headers, raw=raw)


def multipart(fields: list[tuple[str, str]], file_name: str = "file") -> tuple[bytes, str]:
    boundary = "----extauthz-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_name}"; filename="a.wav"\r\n'
                 f"Content-Type: audio/wav\r\n\r\n".encode() + WAV + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def reached(r: Response, gw: ProviderGateway, flavour: str, path: str, credential: tuple[str, str],
            key: str) -> dict:
    """The request reached this flavour's upstream at this path with the deployment's
    credential and no trace of the virtual key; returns what the upstream received."""
    assert r.status == 200, r.text
    echo = r.json()["echo"]
    assert echo["host"] == gw.base(flavour), echo["host"]
    assert echo["path"] == path
    name, value = credential
    assert echo["headers"][name] == value
    assert key not in json.dumps(echo)
    assert not [h for h in VIRTUAL_KEY_HEADERS if h != name and h in echo["headers"]]
    assert not any(h.startswith("x-extauthz") for h in echo["headers"])
    return echo


def denied(r: Response, status: int, code: str) -> str:
    assert r.status == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["code"] == code
    return error["message"]


OPENAI = ("authorization", "Bearer sk-prov-openai")

JSON_ENDPOINTS = [
    # (client path, model, flavour, upstream path, credential, provider model)
    ("/v1/chat/completions", "gpt-4o", "openai", "/v1/chat/completions", OPENAI, "gpt-4o"),
    ("/chat/completions", "gpt-4o", "openai", "/v1/chat/completions", OPENAI, "gpt-4o"),
    ("/v1/completions", "instruct", "openai", "/v1/completions", OPENAI, "gpt-3.5-turbo-instruct"),
    ("/completions", "instruct", "openai", "/v1/completions", OPENAI, "gpt-3.5-turbo-instruct"),
    ("/v1/embeddings", "text-embedding-3-small", "openai", "/v1/embeddings", OPENAI, "text-embedding-3-small"),
    ("/embeddings", "text-embedding-3-small", "openai", "/v1/embeddings", OPENAI, "text-embedding-3-small"),
    ("/v1/images/generations", "dall-e-3", "openai", "/v1/images/generations", OPENAI, "dall-e-3"),
    ("/v1/responses", "gpt-4o", "openai", "/v1/responses", OPENAI, "gpt-4o"),
    ("/responses", "gpt-4o", "openai", "/v1/responses", OPENAI, "gpt-4o"),
    ("/v1/moderations", "omni-moderation-latest", "openai", "/v1/moderations", OPENAI, "omni-moderation-latest"),
    ("/v1/chat/completions", "groq-llama", "openai", "/openai/v1/chat/completions",
     ("authorization", "Bearer gsk-prov"), "llama-3.1-8b-instant"),
    ("/v1/chat/completions", "openai/gpt-4o-mini", "openai", "/v1/chat/completions",
     ("authorization", "Bearer sk-prov-wildcard"), "gpt-4o-mini"),
    ("/v1/chat/completions", "azure-gpt-4o", "azure",
     "/openai/deployments/gpt4o-deployment/chat/completions?api-version=2024-10-21", ("api-key", "az-prov"),
     "gpt4o-deployment"),
    ("/v1/embeddings", "azure-gpt-4o", "azure",
     "/openai/deployments/gpt4o-deployment/embeddings?api-version=2024-10-21", ("api-key", "az-prov"),
     "gpt4o-deployment"),
    ("/v1/messages", "claude-sonnet", "anthropic", "/v1/messages", ("x-api-key", "ant-prov"), "claude-sonnet-4-5"),
    ("/messages", "claude-sonnet", "anthropic", "/v1/messages", ("x-api-key", "ant-prov"), "claude-sonnet-4-5"),
    ("/v1/messages/count_tokens", "claude-sonnet", "anthropic", "/v1/messages/count_tokens",
     ("x-api-key", "ant-prov"), "claude-sonnet-4-5"),
]


@pytest.mark.parametrize("path,model,flavour,upstream_path,credential,provider_model", JSON_ENDPOINTS)
def test_json_endpoints_reach_their_provider(provider_gateway: ProviderGateway, path: str, model: str,
                                             flavour: str, upstream_path: str, credential: tuple[str, str],
                                             provider_model: str) -> None:
    gw = provider_gateway
    key = gw.new_key(models=[model])
    body = {"model": model, "input": "hi", "messages": [{"role": "user", "content": "hi"}]}
    echo = reached(post(gw, path, key, body), gw, flavour, upstream_path, credential, key)
    assert echo["body"]["model"] == provider_model
    assert echo["body"]["messages"] == [{"role": "user", "content": "hi"}]
    gw.forget()
    other = gw.new_key(models=["gpt-4o" if model != "gpt-4o" else "dall-e-3"])
    denied(post(gw, path, other, body), 403, "model_not_allowed")
    assert all(gw.seen(f) == [] for f in gw.upstreams)


def test_anthropic_version_is_added_or_kept(provider_gateway: ProviderGateway) -> None:
    gw = provider_gateway
    key = gw.new_key(models=["claude-sonnet"])
    body = {"model": "claude-sonnet", "max_tokens": 8, "messages": []}
    echo = reached(post(gw, "/v1/messages", key, body), gw, "anthropic", "/v1/messages", ("x-api-key", "ant-prov"), key)
    assert echo["headers"]["anthropic-version"] == "2023-06-01"
    echo = reached(post(gw, "/v1/messages", None, body, {"x-api-key": key, "anthropic-version": "2024-10-22"}),
                   gw, "anthropic", "/v1/messages", ("x-api-key", "ant-prov"), key)
    assert echo["headers"]["anthropic-version"] == "2024-10-22"


def test_no_format_translation(provider_gateway: ProviderGateway) -> None:
    gw = provider_gateway
    key = gw.new_key(models=["claude-sonnet", "gpt-4o"])
    message = denied(post(gw, "/v1/chat/completions", key, {"model": "claude-sonnet", "messages": []}),
                     400, "unsupported_route")
    assert "translate" in message
    denied(post(gw, "/v1/messages", key, {"model": "gpt-4o", "max_tokens": 8, "messages": []}),
           400, "unsupported_route")


def test_azure_style_paths(provider_gateway: ProviderGateway) -> None:
    gw = provider_gateway
    key = gw.new_key(models=["azure-gpt-4o", "gpt-4o"])
    body = {"messages": [{"role": "user", "content": "hi"}]}
    echo = reached(post(gw, "/openai/deployments/azure-gpt-4o/chat/completions?api-version=2024-02-01", None, body,
                        {"api-key": key}),
                   gw, "azure", "/openai/deployments/gpt4o-deployment/chat/completions?api-version=2024-10-21",
                   ("api-key", "az-prov"), key)
    assert echo["body"] == body  # Azure reads the deployment from the path: the body is left alone
    # An Azure-style path naming an OpenAI deployment goes to OpenAI, without Azure's query;
    # OpenAI reads the model from the body, where it is inserted.
    echo = reached(post(gw, "/openai/deployments/gpt-4o/chat/completions?api-version=2024-02-01", key, body),
                   gw, "openai", "/v1/chat/completions", OPENAI, key)
    assert base64.b64decode(echo["raw_body"]) == b'{"model": "gpt-4o", ' + json.dumps(body).encode()[1:]
    echo = reached(post(gw, "/openai/deployments/gpt-4o/chat/completions", key, raw=b" { } "),
                   gw, "openai", "/v1/chat/completions", OPENAI, key)
    assert base64.b64decode(echo["raw_body"]) == b' {"model": "gpt-4o" } '
    echo = reached(post(gw, "/openai/deployments/azure-gpt-4o/chat/completions", key, {**body, "model": "azure-gpt-4o"}),
                   gw, "azure", "/openai/deployments/gpt4o-deployment/chat/completions?api-version=2024-10-21",
                   ("api-key", "az-prov"), key)
    assert echo["body"]["model"] == "gpt4o-deployment"
    denied(post(gw, "/openai/deployments/azure-gpt-4o/chat/completions", key, {**body, "model": "gpt-4o"}),
           400, "model_mismatch")
    outsider = gw.new_key(models=["gpt-4o"])
    denied(post(gw, "/openai/deployments/azure-gpt-4o/chat/completions", outsider, body), 403, "model_not_allowed")


def test_gemini_model_in_path(provider_gateway: ProviderGateway) -> None:
    gw = provider_gateway
    key = gw.new_key(models=["gemini-flash"])
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    for method in ("generateContent", "streamGenerateContent"):
        echo = reached(post(gw, f"/v1beta/models/gemini-flash:{method}?alt=sse&key={key}", None, body,
                            {"x-goog-api-key": key}),
                       gw, "gemini", f"/v1beta/models/gemini-2.0-flash:{method}?alt=sse", ("x-goog-api-key", "goog-prov"),
                       key)
        assert echo["body"] == body  # Gemini bodies carry no model: nothing is added
    denied(post(gw, "/v1beta/models/gemini-flash:generateContent", key, {**body, "model": "gpt-4o"}),
           400, "model_mismatch")
    denied(post(gw, "/v1beta/models/gpt-4o:generateContent", gw.new_key(models=["gpt-4o"]), body),
           400, "unsupported_route")


def test_multipart_endpoints(provider_gateway: ProviderGateway) -> None:
    gw = provider_gateway
    key = gw.new_key(models=["whisper-1", "my-whisper", "azure-whisper", "dall-e-3"])
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations", "/audio/transcriptions"):
        raw, content_type = multipart([("model", "whisper-1"), ("language", "en")])
        echo = reached(post(gw, path, key, raw=raw, headers={"Content-Type": content_type}),
                       gw, "openai", "/v1/" + path.rsplit("/", 2)[-2] + "/" + path.rsplit("/", 1)[-1], OPENAI, key)
        assert echo["body"] == {"fields": {"model": "whisper-1", "language": "en"}, "files": {"file": len(WAV)}}
    raw, content_type = multipart([("model", "dall-e-3"), ("prompt", "a cat")], file_name="image")
    reached(post(gw, "/v1/images/edits", key, raw=raw, headers={"Content-Type": content_type}),
            gw, "openai", "/v1/images/edits", OPENAI, key)
    raw, content_type = multipart([("model", "azure-whisper")])
    reached(post(gw, "/v1/audio/transcriptions", key, raw=raw, headers={"Content-Type": content_type}),
            gw, "azure", "/openai/deployments/whisper-deployment/audio/transcriptions?api-version=2024-06-01",
            ("api-key", "az-prov"), key)

    gw.forget()
    cases = [
        ([("model", "my-whisper")], 400, "unsupported_route"),   # provider name differs: cannot rewrite
        ([("language", "en")], 400, "missing_model"),
        ([("model", "whisper-1"), ("model", "gpt-4o")], 400, "invalid_model"),
        ([("model", "gpt-4o")], 403, "model_not_allowed"),
    ]
    for fields, status, code in cases:
        raw, content_type = multipart(fields)
        denied(post(gw, "/v1/audio/transcriptions", key, raw=raw, headers={"Content-Type": content_type}),
               status, code)
    denied(post(gw, "/v1/audio/transcriptions", key, {"model": "whisper-1"}), 400, "invalid_request_body")
    assert all(gw.seen(f) == [] for f in gw.upstreams)


def test_unknown_paths_are_denied_and_pass_through_paths_are_forwarded(provider_gateway: ProviderGateway) -> None:
    gw = provider_gateway
    key = gw.new_key(models=["gpt-4o"])
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/chat/completion", "/admin", "/v1/rerank/extra"):
        assert "is not an LLM endpoint" in denied(post(gw, path, key, {"model": "gpt-4o"}), 404, "unsupported_endpoint")
    denied(post(gw, "/v1/files", None, {}), 401, "missing_api_key")

    echo = reached(post(gw, "/v1/rerank?top_n=2", key, {"query": "q", "documents": ["a"]}), gw, "openai",
                   "/v1/rerank?top_n=2", ("authorization", "Bearer cohere-prov"), key)
    assert echo["body"] == {"query": "q", "documents": ["a"]}
    reached(post(gw, "/files-api/file-abc/content", key, {}), gw, "openai", "/v1/files/file-abc/content",
            ("authorization", "Bearer files-prov"), key)
    denied(post(gw, "/v1/rerank", "sk-bogus", {}), 401, "invalid_api_key")


def test_a_pass_through_reaching_a_model_call_is_not_served_and_the_rest_serves(
        provider_gateway: ProviderGateway) -> None:
    # Loaded as not served, not refused with the whole config: its requests are a 503
    # naming why, never forwarded; the operator sees it in readiness and a metric.
    gw = provider_gateway
    key = gw.new_key(models=["gpt-4o"])
    gw.forget()
    message = denied(post(gw, "/raw-chat", key, {"model": "gpt-4o", "messages": []}), 503, "pass_through_unavailable")
    assert "'/raw-chat' is not served" in message and "reaches a provider's model calls" in message
    assert "127.0.0.1" not in message and "/v1/chat/completions" not in message  # (the target is the operator's)
    assert all(gw.seen(f) == [] for f in gw.upstreams)
    reached(post(gw, "/v1/rerank", key, {"query": "q", "documents": ["a"]}), gw, "openai", "/v1/rerank",
            ("authorization", "Bearer cohere-prov"), key)
    assert gw.sidecar is not None
    ready = http("GET", f"http://127.0.0.1:{gw.sidecar.admin_port}/health/readiness").json()
    assert ready["status"] == "healthy" and ready["config"]["pass_through_not_served"] == 1
    metrics = http("GET", f"http://127.0.0.1:{gw.sidecar.metrics_port}/metrics").text
    assert 'extauthz_pass_through_endpoints{served="false"} 1.0' in metrics
    assert 'extauthz_pass_through_endpoints{served="true"} 2.0' in metrics


def test_gzip_bodies_are_checked_decompressed(provider_gateway: ProviderGateway) -> None:
    gw = provider_gateway
    key = gw.new_key(models=["openai/*"])
    body = json.dumps({"model": "openai/gpt-4o", "messages": []}).encode()
    echo = reached(post(gw, "/v1/chat/completions", key, raw=gzip.compress(body),
                        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}),
                   gw, "openai", "/v1/chat/completions", ("authorization", "Bearer sk-prov-wildcard"), key)
    assert echo["body"]["model"] == "gpt-4o" and "content-encoding" not in echo["headers"]
    denied(post(gw, "/v1/chat/completions", gw.new_key(models=["gpt-4o"]), raw=gzip.compress(body),
                headers={"Content-Encoding": "gzip"}), 403, "model_not_allowed")
    message = denied(post(gw, "/v1/chat/completions", key, raw=zlib.compress(body),
                          headers={"Content-Encoding": "deflate"}), 415, "unsupported_content_encoding")
    assert "gzip" in message


def test_aliases_never_widen_a_key(provider_gateway: ProviderGateway) -> None:
    gw = provider_gateway
    both = gw.new_key(models=["gpt-4", "gpt-4o"])
    echo = reached(post(gw, "/v1/chat/completions", both, {"model": "gpt-4", "messages": []}), gw, "openai",
                   "/v1/chat/completions", OPENAI, both)
    assert echo["body"]["model"] == "gpt-4o"
    only_alias = gw.new_key(models=["gpt-4"])
    denied(post(gw, "/v1/chat/completions", only_alias, {"model": "gpt-4", "messages": []}), 403, "model_not_allowed")
    only_target = gw.new_key(models=["gpt-4o"])
    denied(post(gw, "/v1/chat/completions", only_target, {"model": "gpt-4", "messages": []}), 403,
           "model_not_allowed")

    everything = gw.new_key(models=["*"])
    listed = [m["id"] for m in gw.admin("/v1/models", method="GET", key=everything).json()["data"]]
    assert "gpt-4" in listed and "secret-claude" not in listed
    assert post(gw, "/v1/messages", everything, {"model": "secret-claude", "max_tokens": 8,
                                                  "messages": []}).status == 200
    assert [m["id"] for m in gw.admin("/v1/models", method="GET", key=both).json()["data"]] == ["gpt-4o", "gpt-4"]


def test_weighted_choice_over_1000_requests(provider_gateway: ProviderGateway) -> None:
    """Weights 3:1; the choice is visible in Envoy's access log through dynamic metadata."""
    gw = provider_gateway
    key = gw.new_key(models=["llama"])
    credentials: Counter[str] = Counter()
    for _ in range(1000):
        r = post(gw, "/v1/chat/completions", key, {"model": "llama", "messages": []})
        assert r.status == 200
        echo = r.json()["echo"]
        assert echo["body"]["model"] == "meta-llama/Llama-3-8B"
        credentials[echo["headers"]["authorization"]] += 1
    # Binomial(1000, 0.75): sd = 13.7; 5 sd either way fails about once in 3.5 million runs.
    assert 681 <= credentials["Bearer vllm-a"] <= 819, credentials
    assert credentials["Bearer vllm-a"] + credentials["Bearer vllm-b"] == 1000
    expected = {"12:llama": credentials["Bearer vllm-a"], "13:llama": credentials["Bearer vllm-b"]}
    # Envoy flushes its access log on its own schedule: poll, bounded.
    wait_until(lambda: logged_deployments(gw, "llama") == expected, 20, "the access log's deployments")


def logged_deployments(gw: ProviderGateway, model: str) -> Counter[str]:
    """Envoy's access log lines (JSON) carry the sidecar's dynamic metadata."""
    lines = [json.loads(line) for line in gw.envoy.proc.log.read_text().splitlines() if line.startswith("{")]
    return Counter(entry["deployment"] for entry in lines if entry.get("model") == model)


def test_path_model_and_body_model_must_agree_before_any_lookup(provider_gateway: ProviderGateway) -> None:
    gw = provider_gateway
    key = gw.new_key(models=["*"])
    for path in ("/openai/deployments/gpt-4o/embeddings", "/v1beta/models/gemini-flash:generateContent"):
        assert re.search("different models", denied(post(gw, path, key, {"model": "text-embedding-3-small"}),
                                                     400, "model_mismatch"))
