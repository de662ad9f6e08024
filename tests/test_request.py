"""CheckRequest -> Facts, without I/O: endpoints, credentials, models from bodies and paths."""

from __future__ import annotations

import pytest

from extauthz.domain.endpoints import (ANTHROPIC, GEMINI, JSON, MULTIPART, OPENAI, Endpoint, PassThrough, classify, model_call_segment, unsafe_path)
from extauthz.check.facts import Facts
from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2
from extauthz.check.request import PassThroughPaths, body_of, facts_from_check, with_body


@pytest.mark.parametrize("path,expected", [
    ("/v1/chat/completions", Endpoint("chat/completions", OPENAI, JSON)),
    ("/chat/completions?x=1", Endpoint("chat/completions", OPENAI, JSON, None, "x=1")),
    ("/v1/messages/count_tokens", Endpoint("messages/count_tokens", ANTHROPIC, JSON)),
    ("/v1/audio/translations", Endpoint("audio/translations", OPENAI, MULTIPART)),
    ("/openai/deployments/my%20dep/chat/completions?api-version=1",
     Endpoint("chat/completions", OPENAI, JSON, "my dep", "api-version=1")),
    ("/openai/deployments/d/audio/transcriptions", Endpoint("audio/transcriptions", OPENAI, MULTIPART, "d")),
    ("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
     Endpoint("streamGenerateContent", GEMINI, JSON, "gemini-2.0-flash", "alt=sse")),
    ("/v1/files", None),
    ("/openai/deployments/d/messages", None),
    ("/v1beta/models/x:countTokens", None),
    ("/", None),
])
def test_classify(path: str, expected: Endpoint | None) -> None:
    assert classify(path) == expected


def read(req: external_auth_pb2.CheckRequest) -> Facts:
    return with_body(facts_from_check(req), body_of(req))


def check(path: str, body: bytes, headers: dict[str, str] | None = None) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.path, http.method, http.raw_body = path, "POST", body
    http.headers.update({"authorization": "Bearer sk-v", **(headers or {})})
    return req


def test_pass_through_paths_take_precedence_and_match_subpaths_only_when_asked() -> None:
    paths = PassThroughPaths((("/v1/rerank", False), ("/files-api", True)))
    assert facts_from_check(check("/v1/rerank?x=1", b""), paths).endpoint == PassThrough(0, "/v1/rerank", "x=1")
    assert facts_from_check(check("/v1/rerank/more", b""), paths).endpoint is None
    assert facts_from_check(check("/files-api/a/b", b""), paths).endpoint == PassThrough(1, "/files-api/a/b", "")


def form(*parts: bytes, boundary: bytes = b"XyZ") -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"


FIELD = b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1'
FILE = b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + bytes(range(256)) * 100


@pytest.mark.parametrize("body,content_type,expected", [
    (form(FILE, FIELD), "multipart/form-data; boundary=XyZ", ("whisper-1", None)),
    (form(FIELD, FIELD), "multipart/form-data; boundary=XyZ", (None, "invalid_model")),
    (form(FILE), "multipart/form-data; boundary=XyZ", (None, "missing_model")),
    (form(FIELD), "application/json", (None, "invalid_request_body")),
    (form(FIELD), "multipart/form-data", (None, "invalid_request_body")),
    (form(FIELD), "multipart/form-data; boundary=\u0100", (None, "invalid_request_body")),
    (b"--XyZ\r\ngarbage without headers end", "multipart/form-data; boundary=XyZ", (None, "invalid_request_body")),
    (b"\x00\xff" * 50, "multipart/form-data; boundary=XyZ", (None, "invalid_request_body")),
    (form(b'Content-Disposition: form-data; name="model"\r\n\r\n' + b"m" * 5000),
     "multipart/form-data; boundary=XyZ", (None, "invalid_model")),
    (form(b'Content-Disposition: form-data; name="model"\r\n\r\n\xff\xfe'),
     "multipart/form-data; boundary=XyZ", (None, "invalid_model")),
])
def test_model_from_multipart(body: bytes, content_type: str, expected: tuple) -> None:
    facts = read(check("/v1/audio/transcriptions", body, {"content-type": content_type}))
    assert (facts.model, facts.body_problem.code if facts.body_problem else None) == expected


@pytest.mark.parametrize("path,body,headers,model,code", [
    ("/openai/deployments/dep/chat/completions", b'{"messages": []}', {}, "dep", None),
    ("/openai/deployments/dep/chat/completions", b'{"model": "dep"}', {}, "dep", None),
    ("/openai/deployments/dep/chat/completions", b'{"model": "other"}', {}, None, "model_mismatch"),
    ("/openai/deployments/dep/chat/completions", b"", {}, "dep", None),
    ("/v1/chat/completions", b'{"model": "m"}', {"content-encoding": "br"}, None, "unsupported_content_encoding"),
    ("/v1/chat/completions", b'{"model": "m"}', {"content-encoding": "identity"}, "m", None),
    ("/v1/chat/completions", b'{"model": "m"}', {"x-envoy-auth-partial-body": "true"}, None, "body_too_large"),
])
def test_model_from_path_and_body(path: str, body: bytes, headers: dict, model: str | None,
                                  code: str | None) -> None:
    facts = read(check(path, body, headers))
    assert facts.model == model
    assert (facts.body_problem.code if facts.body_problem else None) == code


def test_gemini_key_header_is_a_credential() -> None:
    req = check("/v1beta/models/g:generateContent", b"{}", {"x-goog-api-key": "sk-v"})
    assert facts_from_check(req).token == "sk-v"


def test_the_body_is_not_read_before_the_key_is_known() -> None:
    facts = facts_from_check(check("/v1/chat/completions", b'{"model": "m"}'))
    assert facts.model is None and facts.body_problem is None and facts.json_model is None


@pytest.mark.parametrize("model,code", [
    ("openai/ o1-mini", "invalid_model"), ("openai//o1-mini", "invalid_model"), ("/gpt-4", "invalid_model"),
    ("gpt-4/", "invalid_model"), ("gpt 4", "invalid_model"), ("gpt-4\u00a0", "invalid_model"),
    ("openai/gpt-4", None),
])
def test_names_with_spaces_or_empty_segments_are_refused(model: str, code: str | None) -> None:
    facts = read(check("/v1/chat/completions", b'{"model": "%s"}' % model.encode()))
    assert (facts.body_problem.code if facts.body_problem else None) == code


@pytest.mark.parametrize("path,refused", [
    ("/files-api/a/b", False), ("/files-api/..%2Fchat", True), ("/files-api/%2e%2e/x", True), ("/files-api/a/../b", True),
    ("/files-api/./b", True), ("/files-api/a%5Cb", True), ("/files-api/a//b", True), ("/files-api/a\\b", True),
    ("/files-api/a.b/c..d", False),
])
def test_pass_through_paths_that_an_upstream_could_resolve_elsewhere_are_refused(path: str, refused: bool) -> None:
    paths = PassThroughPaths((("/files-api", True),))
    facts = facts_from_check(check(path, b""), paths)
    assert isinstance(facts.endpoint, PassThrough)
    assert (facts.body_problem is not None) == refused


@pytest.mark.parametrize("path,unsafe", [
    ("/v1/files/file-abc/content", False), ("/v1/files/a%41b", False), ("/a-b_c~d", False),
    ("/x/%2e%2e/y", True), ("/x/%252e%252e/y", True), ("/x/%c0%ae", True), ("/x/%u002e", True), ("/x/..;/y", True),
    ("/x/a%3Bb", True), ("/x/%09", True), ("/x/%", True), ("/x/%4", True), ("/x/./y", True), ("/x//y", True),
    ("/x/a\\b", True),
])
def test_unsafe_path(path: str, unsafe: bool) -> None:
    assert unsafe_path(path) is unsafe


@pytest.mark.parametrize("path,segment", [
    ("/v1/files/x", None), ("/v1/rerank", None), ("/v1/chat/completions", "chat"), ("/v1/Audio/speech", "audio"),
    ("/v1beta/models/g:generateContent", "g:generatecontent"), ("/model/m/invoke", "invoke"),
])
def test_model_call_segment(path: str, segment: str | None) -> None:
    assert model_call_segment(path) == segment
