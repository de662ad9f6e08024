"""An attacker's requests through the real stack (Envoy, the sidecar, Redis, an echoing
upstream): the provider reads exactly the model that was checked, internal and billing
headers never come from a client, pass-through paths cannot be bent to a model call,
and Envoy's own refusals carry the same JSON error as every deny."""

from __future__ import annotations

import base64
import gzip
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests import harness
from tests.conftest import Gateway, ProviderGateway
from tests.harness import MASTER_KEY, Response, http

WILDCARD = ("authorization", "Bearer sk-upstream-openai-wildcard")


def post(gateway: Gateway, key: str | None, raw: bytes, path: str = "/v1/chat/completions",
         headers: dict[str, str] | None = None, timeout: float = 30.0) -> Response:
    all_headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    all_headers.update(headers or {})
    return http("POST", gateway.envoy.url + path, raw=raw, headers=all_headers, timeout=timeout)


def refused(r: Response, status: int, code: str) -> str:
    assert r.status == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    return error["message"]


def received(r: Response) -> tuple[dict[str, Any], bytes]:
    """What the upstream received: the echo and the body's bytes."""
    assert r.status == 200, r.text
    echo = r.json()["echo"]
    return echo, base64.b64decode(echo["raw_body"])


@pytest.fixture
def nothing_forwarded(gateway: Gateway) -> Iterator[None]:
    gateway.forget_upstream()
    yield
    assert gateway.upstream_seen() == []


# -- 1. the body the provider reads is the body that was checked --------------------------

DEEP = b"[" * 150 + b"]" * 150
AMBIGUOUS_BODIES = [
    # (body, code): each was forwarded verbatim by the transform filter, which failed open
    (b'{"model":"gpt-4o","model":"gpt-4","messages":[]}', "invalid_request_body"),
    (b'{"model":"gpt-4","messages":[{"role":"user","content":"a","content":"b"}]}', "invalid_request_body"),
    (b'{"model":"openai/gpt-4","Model":"o1-mini","x":' + DEEP + b"}", "invalid_model"),
    (b'{"model":"openai/gpt-4","MODEL":"o1-mini","messages":[]}', "invalid_model"),
    (b'{"model":"gpt-4","x":' + DEEP + b"}", "invalid_request_body"),
    (b'{"model":"gpt-4","temperature":NaN}', "invalid_request_body"),
    (b'{"model":"gpt-4","temperature":-Infinity}', "invalid_request_body"),
    (b'{"model":"gpt-4","temperature":1e999}', "invalid_request_body"),
    (b'{"model":"gpt-4","messages":[{"role":"user","content":"\\ud800"}]}', "invalid_request_body"),
    (b'{"model":"gpt-4","messages":[]} {"model":"gpt-4o"}', "invalid_request_body"),
    (b'\xef\xbb\xbf{"model":"gpt-4","messages":[]}', "invalid_request_body"),
    (b'{"model":"gpt-4","messages":[],}', "invalid_request_body"),
    (b'{"model":"gpt-4","x":"\xff"}', "invalid_request_body"),
    # member names a lenient reader takes for "model" (a C reader stops at NUL; some trim)
    (b'{"model\\u0000":"gpt-4o","model":"gpt-4"}', "invalid_model"),
    (b'{"model ":"gpt-4o","model":"gpt-4"}', "invalid_model"),
    (b'{"model\\u200b":"gpt-4o","model":"gpt-4"}', "invalid_model"),
    ('{"\uff4d\uff4f\uff44\uff45\uff4c":"gpt-4o","model":"gpt-4"}'.encode(), "invalid_model"),
]


@pytest.mark.parametrize("body, code", AMBIGUOUS_BODIES, ids=range(len(AMBIGUOUS_BODIES)))
def test_bodies_parsers_could_read_differently_are_refused(gateway: Gateway, nothing_forwarded: None,
                                                           body: bytes, code: str) -> None:
    key = gateway.new_key(models=["gpt-4", "default-models"])
    refused(post(gateway, key, body), 400, code)


def test_the_provider_gets_the_clients_bytes_with_only_the_model_replaced(gateway: Gateway) -> None:
    key = gateway.new_key(models=["default-models"])
    body = ('{ "messages" : [{"role": "user", "content": "caf\u00e9 \\u00e9 \\ud83d\\ude00 \\"model\\": 1"}],\n'
            '  "model":\t"openai/gpt-4o" , "seed": 18446744073709551615, "top_p": 0.1000000000000000055511151231257827,'
            ' "n": 1E2, "tools": [{"type": "function", "function": {"name": "f", "parameters": '
            '{"model": "openai/o1-mini"}}}], "big": ' + "7" * 400 + " }").encode()
    echo, got = received(post(gateway, key, body))
    assert got == body.replace(b'"openai/gpt-4o"', b'"gpt-4o"', 1)
    assert echo["headers"]["authorization"] == WILDCARD[1]
    assert int(echo["headers"]["content-length"]) == len(got)
    assert not any(h.startswith("x-extauthz") for h in echo["headers"])


def test_a_body_whose_model_needs_no_rewrite_is_forwarded_as_sent(gateway: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4"])
    body = b'{"model" : "gpt-4", "messages": [], "seed": 18446744073709551615, "x": 0.10000000000000000555}'
    echo, got = received(post(gateway, key, body))
    assert got == body and echo["headers"]["authorization"] == "Bearer sk-upstream-gpt-4"


def test_an_escaped_model_name_is_checked_decoded_and_replaced_whole(gateway: Gateway) -> None:
    key = gateway.new_key(models=["default-models"])
    body = b'{"messages": [], "model": "openai\\/gpt\\u002d4o"}'
    _, got = received(post(gateway, key, body))
    assert got == b'{"messages": [], "model": "gpt-4o"}'
    refused(post(gateway, key, b'{"messages": [], "model": "openai\\/o1\\u002dmini"}'), 403, "model_not_allowed")


GPT4_TOKEN, GEMINI_TOKEN = b'"gpt-4"', b'"gemini-flash"'


def test_a_client_splice_plan_never_survives(gateway: Gateway, provider_gateway: ProviderGateway) -> None:
    key = gateway.new_key(models=["gpt-4", "default-models"])
    body = b'{"model":"gpt-4","messages":[]}'
    forged = {"x-extauthz-splice": f'{len(body)} 9 16 {GPT4_TOKEN.hex()} "o1-mini"',
              "x-extauthz-model": "o1-mini", "x-extauthz-cluster": "extauthz_admin"}
    echo, got = received(post(gateway, key, body, headers=forged))
    assert got == body and echo["headers"]["authorization"] == "Bearer sk-upstream-gpt-4"
    # On Gemini the path names the model; a body that names it too gets the provider's name,
    # as the sidecar planned it, not as the client did.
    pkey = provider_gateway.new_key(models=["gemini-flash"])
    gbody = b'{"contents":[{"parts":[{"text":"hi"}]}],"model":"gemini-flash"}'
    r = http("POST", provider_gateway.envoy.url + "/v1beta/models/gemini-flash:generateContent", raw=gbody,
             headers={"x-goog-api-key": pkey, "Content-Type": "application/json",
                      "x-extauthz-splice": f'{len(gbody)} 53 67 {GEMINI_TOKEN.hex()} "gemini-ultra"'})
    _, got = received(r)
    assert got == gbody.replace(b'"gemini-flash"', b'"gemini-2.0-flash"')


def test_large_bodies_up_to_the_limit_are_checked_and_rewritten(gateway: Gateway) -> None:
    """Beyond gRPC's 4 MiB default, a check used to fail as an empty 503."""
    key = gateway.new_key(models=["default-models"])
    filler = base64.b64encode(random.randbytes(4_700_000)).decode()  # 6.3 MB that gzip barely shrinks
    body = ('{"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "' + filler + '"}]}').encode()
    _, got = received(post(gateway, key, body))
    assert got == body.replace(b'"openai/gpt-4o"', b'"gpt-4o"', 1)
    inflated = gzip.compress(body)
    _, got = received(post(gateway, key, inflated, headers={"Content-Encoding": "gzip"}))
    assert got == body.replace(b'"openai/gpt-4o"', b'"gpt-4o"', 1)


def test_envoys_own_refusals_are_json_errors(gateway: Gateway, nothing_forwarded: None) -> None:
    key = gateway.new_key(models=["gpt-4"])
    too_big = b'{"model": "gpt-4", "x": "' + b"A" * (10 * 1024 * 1024) + b'"}'
    assert "larger than 10485760 bytes" in refused(post(gateway, key, too_big), 413, "body_too_large")
    r = post(gateway, key, b'{"model": "gpt-4"}', path="/v1/chat%2Fcompletions")
    assert r.status == 400 and r.headers["content-type"].startswith("application/json"), r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_sidecar_failure_is_a_json_503(workdir: Path, config_path: Path, redis_port: int) -> None:
    stack = harness.start_stack(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0")
    try:
        key = http("POST", stack.envoy.url + "/key/generate", {"models": ["gpt-4"]},
                   {"Authorization": f"Bearer {MASTER_KEY}"}).json()["key"]
        stack.sidecar.proc.stop()
        r = http("POST", stack.envoy.url + "/v1/chat/completions", {"model": "gpt-4", "messages": []},
                 {"Authorization": f"Bearer {key}"})
        assert "did not answer" in refused(r, 503, "authz_unavailable")
    finally:
        stack.stop()


# -- 4. multipart bodies another parser could read differently -------------------------------

BOUNDARY = "x-boundary-1"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"


def form(*parts: bytes, close: bytes = b"--x-boundary-1--\r\n") -> bytes:
    return b"".join(b"--" + BOUNDARY.encode() + b"\r\n" + p + b"\r\n" for p in parts) + close


def field(name: str, value: str, extra: str = "") -> bytes:
    return f'Content-Disposition: form-data; name="{name}"{extra}\r\n\r\n{value}'.encode()


AUDIO = b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\nRIFF\x00\x01'
SMUGGLED_FORMS = [
    # a second, forbidden model that Python's email parser, Go's mime/multipart or busboy would read
    form(b'Content-Disposition: form-data; name="model"\r\nContent-Disposition: form-data; name="x"\r\n\r\nmy-whisper',
         field("model", "whisper-1"), AUDIO),
    form(b'Content-Disposition: form-data; name="x"; name="model"\r\n\r\nmy-whisper', field("model", "whisper-1"), AUDIO),
    form(field("model", "whisper-1"), b"Content-Disposition: form-data; name*=UTF-8''model\r\n\r\nmy-whisper", AUDIO),
    form(field("model", "whisper-1"), AUDIO) + b"--x-boundary-1\r\n" + field("model", "my-whisper") + b"\r\n",
    form(field("model", "whisper-1"), AUDIO, close=b""),
    form(b'Content-Disposition: form-data; name="model"\r\nContent-Transfer-Encoding: base64\r\n\r\nd2hpc3Blci0x',
         AUDIO),
    form(field("Model", "my-whisper"), field("model", "whisper-1"), AUDIO),
    form(field("model", "whisper-1"), field("model", "my-whisper"), AUDIO),
    b"preamble\r\n" + form(field("model", "whisper-1"), AUDIO),
]


@pytest.mark.parametrize("body", SMUGGLED_FORMS, ids=range(len(SMUGGLED_FORMS)))
def test_ambiguous_multipart_bodies_are_refused(provider_gateway: ProviderGateway, body: bytes) -> None:
    key = provider_gateway.new_key(models=["whisper-1"])
    provider_gateway.forget()
    r = http("POST", provider_gateway.envoy.url + "/v1/audio/transcriptions", raw=body,
             headers={"Authorization": f"Bearer {key}", "Content-Type": CTYPE})
    assert r.status == 400, r.text
    assert r.json()["error"]["code"] in ("invalid_request_body", "invalid_model")
    assert provider_gateway.seen("openai") == []


def test_conflicting_boundaries_are_refused(provider_gateway: ProviderGateway) -> None:
    key = provider_gateway.new_key(models=["whisper-1"])
    body = form(field("model", "whisper-1"), AUDIO)
    for ctype in (f"{CTYPE}; boundary=other", f'multipart/form-data; boundary*=UTF-8\'\'{BOUNDARY}'):
        r = http("POST", provider_gateway.envoy.url + "/v1/audio/transcriptions", raw=body,
                 headers={"Authorization": f"Bearer {key}", "Content-Type": ctype})
        refused(r, 400, "invalid_request_body")


def test_a_clean_form_reaches_the_provider_with_one_content_type(provider_gateway: ProviderGateway) -> None:
    key = provider_gateway.new_key(models=["whisper-1"])
    body = form(field("model", "whisper-1"), AUDIO)
    r = http("POST", provider_gateway.envoy.url + "/v1/audio/transcriptions", raw=body,
             headers={"Authorization": f"Bearer {key}", "Content-Type": f'multipart/form-data; boundary="{BOUNDARY}"'})
    echo, got = received(r)
    assert got == body
    assert echo["headers"]["content-type"] == CTYPE
    assert echo["body"]["fields"] == {"model": "whisper-1"}


def test_work_on_a_form_is_bounded(provider_gateway: ProviderGateway) -> None:
    key = provider_gateway.new_key(models=["whisper-1"])
    body = form(field("model", "whisper-1"), *([b'Content-Disposition: form-data; name="a"\r\n\r\n'] * 80_000))
    r = http("POST", provider_gateway.envoy.url + "/v1/audio/transcriptions", raw=body,
             headers={"Authorization": f"Bearer {key}", "Content-Type": CTYPE})
    assert "100" in refused(r, 400, "invalid_request_body")


# -- 5, 6. wildcard variants and patterns -----------------------------------------------------

@pytest.mark.parametrize("model", ["openai/O1-mini", "openai/ o1-mini", "openai//o1-mini", "openai/openai/o1-mini",
                                   "OpenAI/o1-mini", "openai/o1-mini ", " openai/o1-mini", "openai/o1-mini/",
                                   "openai/\uff4f1-mini", "openai/\U0001d428\U0001d7cf-mini", "openai/o\u200b1-mini"])
def test_variants_of_a_restricted_name_never_reach_a_wider_pattern(gateway: Gateway, nothing_forwarded: None,
                                                                   model: str) -> None:
    key = gateway.new_key(models=["default-models"])
    r = gateway.chat(key, model)
    assert r.status in (400, 403), r.text
    assert r.json()["error"]["code"] in ("invalid_model", "model_not_allowed")


def test_the_canonical_name_still_works(gateway: Gateway) -> None:
    key = gateway.new_key(models=["default-models"])
    assert gateway.chat(key, "openai/gpt-4").status == 200
    echo, _ = received(gateway.chat(key, "openai/GPT-4o"))
    assert echo["body"]["model"] == "GPT-4o"


def test_a_backtracking_pattern_answers_at_once(gateway: Gateway) -> None:
    """'*-*-*-*-x' against a long run of dashes took seconds as a regex: Envoy timed out (503)."""
    key = gateway.new_key(models=["*-*-*-*-x"])
    refused(gateway.chat(key, "openai/" + "-" * 240), 403, "model_not_allowed")
    r = gateway.admin("/key/generate", {"models": ["*-*-*-*-*-x"]})
    assert r.status == 400 and r.json()["error"]["param"] == "models", r.text


# -- 7, 8. headers ------------------------------------------------------------------------------

UNDERSCORED = {"OpenAI_Organization": "org-attacker", "OpenAI_Project": "p", "x_api_key": "sk-other",
               "proxy_authorization": "x", "x_goog_user_project": "p", "x_litellm_api_key": "q", "x_extauthz_splice": "-"}
CLIENT_ONLY = {"OpenAI-Organization": "org-attacker", "OpenAI-Project": "proj-attacker", "Cookie": "session=1",
               "Proxy-Authorization": "Basic eDp5", "x-litellm-api-key": "sk-other", "x-goog-user-project": "p"}


def test_billing_and_credential_headers_of_the_client_never_reach_the_provider(
        provider_gateway: ProviderGateway) -> None:
    key = provider_gateway.new_key(models=["gpt-4o", "text-embedding-3-small"])
    r = http("POST", provider_gateway.envoy.url + "/v1/chat/completions", {"model": "gpt-4o", "messages": []},
             {"Authorization": f"Bearer {key}", **CLIENT_ONLY})
    echo, _ = received(r)
    assert echo["headers"]["openai-organization"] == "org-operator"  # the deployment's `organization`
    for name in CLIENT_ONLY:
        if name != "OpenAI-Organization":
            assert name.lower() not in echo["headers"], name
    r = http("POST", provider_gateway.envoy.url + "/v1/embeddings", {"model": "text-embedding-3-small", "input": "a"},
             {"Authorization": f"Bearer {key}", **CLIENT_ONLY})
    echo, _ = received(r)
    assert not set(map(str.lower, CLIENT_ONLY)) & set(echo["headers"])
    r = http("POST", provider_gateway.envoy.url + "/v1/rerank", {"query": "q"}, {"Authorization": f"Bearer {key}",
                                                                               **CLIENT_ONLY})
    echo, _ = received(r)
    assert not set(map(str.lower, CLIENT_ONLY)) & set(echo["headers"])


def test_underscore_spellings_of_stripped_headers_never_reach_the_provider(provider_gateway: ProviderGateway) -> None:
    """Servers that map '_' to '-' (CGI, WSGI) would read them as the stripped headers."""
    key = provider_gateway.new_key(models=["gpt-4o"])
    for path, body in (("/v1/chat/completions", {"model": "gpt-4o", "messages": []}), ("/v1/rerank", {"q": 1})):
        echo, _ = received(http("POST", provider_gateway.envoy.url + path, body,
                                {"Authorization": f"Bearer {key}", **UNDERSCORED}))
        assert not {h for h in echo["headers"] if "_" in h}, echo["headers"]


def test_a_billing_project_in_the_query_never_reaches_gemini(provider_gateway: ProviderGateway) -> None:
    key = provider_gateway.new_key(models=["gemini-flash"])
    echo, _ = received(http("POST", provider_gateway.envoy.url
                            + "/v1beta/models/gemini-flash:generateContent?alt=sse&$userProject=p&userProject=q",
                            {"contents": []}, {"x-goog-api-key": key}))
    assert echo["path"] == "/v1beta/models/gemini-2.0-flash:generateContent?alt=sse"


def test_geminis_v1_path_is_a_model_call_not_the_admin_api(provider_gateway: ProviderGateway) -> None:
    key = provider_gateway.new_key(models=["gemini-flash"])
    echo, _ = received(http("POST", provider_gateway.envoy.url + "/v1/models/gemini-flash:generateContent",
                            {"contents": []}, {"x-goog-api-key": key}))
    assert echo["path"] == "/v1beta/models/gemini-2.0-flash:generateContent"
    refused(http("POST", provider_gateway.envoy.url + "/v1/models/gemini-ultra:generateContent", {"contents": []},
                 {"x-goog-api-key": key}), 403, "model_not_allowed")


@pytest.mark.parametrize("path, body, ctype", [
    ("/openai/deployments/gpt-4o/chat/completions", b"", "application/json"),
    ("/openai/deployments/whisper-1/audio/transcriptions", None, CTYPE),
])
def test_a_provider_that_reads_the_model_from_the_body_gets_one(provider_gateway: ProviderGateway, path: str,
                                                                 body: bytes | None, ctype: str) -> None:
    """An Azure-style path names the model; routed to an OpenAI deployment, a body naming
    none would leave the provider to pick its own default model, unchecked."""
    key = provider_gateway.new_key(models=["gpt-4o", "whisper-1"])
    raw = form(AUDIO) if body is None else body
    provider_gateway.forget()
    r = http("POST", provider_gateway.envoy.url + path, raw=raw, headers={"Authorization": f"Bearer {key}",
                                                                          "Content-Type": ctype})
    refused(r, 400, "missing_model")
    assert provider_gateway.seen("openai") == []


def test_internal_headers_never_come_from_the_client(provider_gateway: ProviderGateway) -> None:
    key = provider_gateway.new_key(models=["whisper-1"])
    forged = {"x-extauthz-splice": "5 0 1 7b \"x\"", "x-extauthz-cluster": "extauthz_admin"}
    body = form(field("model", "whisper-1"), AUDIO)
    echo, got = received(http("POST", provider_gateway.envoy.url + "/v1/audio/transcriptions", raw=body,
                              headers={"Authorization": f"Bearer {key}", "Content-Type": CTYPE, **forged}))
    assert got == body and not any(h.startswith("x-extauthz") for h in echo["headers"])
    echo, got = received(http("POST", provider_gateway.envoy.url + "/v1/rerank", raw=b'{"query": "q"}',
                              headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                                       **forged}))
    assert got == b'{"query": "q"}' and not any(h.startswith("x-extauthz") for h in echo["headers"])


# -- 9. pass-through paths ----------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/files-api/..%2Fchat%2Fcompletions", "/files-api/x%5C..%5Cchat", "/files-api/a%00",
                                  "/files-api/%2e%2e/chat/completions", "/files-api/a/%2E%2E/b"])
def test_encoded_pass_through_paths_never_leave_the_pass_through(provider_gateway: ProviderGateway, path: str) -> None:
    """Encoded slashes and backslashes are refused; Envoy decodes encoded dots and resolves
    the dot segments first, and what it resolves to is checked as that path."""
    key = provider_gateway.new_key(models=["gpt-4o"])
    provider_gateway.forget()
    r = http("POST", provider_gateway.envoy.url + path, {"model": "gpt-4o"}, {"Authorization": f"Bearer {key}"})
    if r.status == 200:
        echo = r.json()["echo"]
        assert "%2e" not in path.lower() or ".." not in echo["path"]
        if echo["headers"]["authorization"] == "Bearer files-prov":  # the pass-through's own credential
            assert echo["path"].startswith("/v1/files/") and "%" not in echo["path"], echo["path"]
        else:
            assert echo["path"] == "/v1/chat/completions" and echo["body"] == {"model": "gpt-4o"}
    else:
        assert r.status == 400, r.text
        assert r.headers["content-type"].startswith("application/json") and r.json()["error"]["code"]
        assert provider_gateway.seen("openai") == []


@pytest.mark.parametrize("path", ["/files-api/%252e%252e/chat/completions", "/files-api/%c0%ae%c0%ae/chat/completions",
                                  "/files-api/%u002e%u002e/chat/completions", "/files-api/..%3B/chat/completions",
                                  "/files-api/..;/chat/completions", "/files-api/..%09/x",
                                  "/files-api/%252F..%252Fchat%252Fcompletions"])
def test_double_overlong_and_parameter_encodings_are_refused(provider_gateway: ProviderGateway, path: str) -> None:
    """Upstreams that decode twice, or treat '..;' as '..' (Tomcat), would resolve these."""
    key = provider_gateway.new_key(models=["gpt-4o"])
    provider_gateway.forget()
    r = http("GET", provider_gateway.envoy.url + path, headers={"Authorization": f"Bearer {key}"})
    # 400 for the path, or 405 where Envoy's normalization leaves a model call (sent as a GET)
    assert r.status in (400, 405), r.text
    assert r.headers["content-type"].startswith("application/json")
    assert provider_gateway.seen("openai") == []


@pytest.mark.parametrize("subpath", ["/x/chat/completions", "/batches", "/x/audio/speech", "/realtime/sessions",
                                     "/models/gpt-4o:generateContent", "/threads/t/runs", "/x/MESSAGES"])
def test_a_pass_through_subpath_never_reaches_a_model_call(provider_gateway: ProviderGateway, subpath: str) -> None:
    key = provider_gateway.new_key(models=["gpt-4o"])
    provider_gateway.forget()
    r = http("POST", provider_gateway.envoy.url + "/files-api" + subpath, {"model": "gpt-4o"},
             {"Authorization": f"Bearer {key}"})
    refused(r, 403, "pass_through_model_call")
    assert provider_gateway.seen("openai") == []


def test_a_request_without_any_key_is_answered_by_envoy_alone(gateway: Gateway) -> None:
    """No body buffered, no check sent: a keyless flood costs the sidecar nothing."""
    def checks() -> int:
        stats = http("GET", f"http://127.0.0.1:{gateway.envoy.admin_port}/stats?filter=ext_authz").text
        return sum(int(line.rsplit(":", 1)[1]) for line in stats.splitlines()
                   if line.startswith("http.extauthz_ingress.ext_authz.") and line.rsplit(".", 1)[1].split(":")[0]
                   in ("ok", "denied", "error"))
    before = checks()
    for path in ("/v1/chat/completions", "/v1/unknown", "/files-api/x"):
        r = post(gateway, None, b'{"model": "gpt-4", "messages": []}', path=path)
        assert "API key" in refused(r, 401, "missing_api_key")
    # A large body is not even read: Envoy answers at once and closes the connection
    # (a client that sends 'Expect: 100-continue', as curl does, reads the 401 first).
    try:
        post(gateway, None, b'{"model": "gpt-4", "x": "' + b"A" * 5_000_000 + b'"}')
    except OSError:
        pass
    assert checks() == before
    refused(post(gateway, "sk-unknown", b'{"model": "gpt-4"}'), 401, "invalid_api_key")
    assert checks() == before + 1


def test_a_plain_pass_through_subpath_still_works(provider_gateway: ProviderGateway) -> None:
    key = provider_gateway.new_key(models=["gpt-4o"])
    r = http("GET", provider_gateway.envoy.url + "/files-api/file-abc/content", headers={"Authorization": f"Bearer {key}"})
    echo, _ = received(r)
    assert echo["path"] == "/v1/files/file-abc/content"


# -- 10. admin input a careless admin sends ----------------------------------------------------

@pytest.mark.parametrize("fields, param", [({"duration": "99999999999999d"}, "duration"), ({"expires": ""}, "expires"),
                                           ({"duration": "0s"}, "duration")])
def test_absurd_key_lifetimes_are_400(gateway: Gateway, fields: dict[str, str], param: str) -> None:
    r = gateway.admin("/key/generate", {"models": ["gpt-4"], **fields})
    assert r.status == 400 and r.json()["error"]["param"] == param, r.text
    assert "key" not in r.json()


# -- 2. nobody without a key can slow the sidecar down ------------------------------------------

FLOOD_SECONDS = 4.0


def many_parts(count: int = 65_000) -> bytes:
    """About 4 MiB of empty form parts: 1.3 s of parsing each, when bodies were parsed first."""
    return form(*([b'Content-Disposition: form-data; name="a"\r\n\r\n'] * count))


def keyed_success_during(flood: Callable[[], int], gateway: Gateway, key: str,
                         model: str) -> tuple[int, int, set[int]]:
    """Runs ``flood`` (one request, returning its status) on three threads while one client
    calls ``model`` with ``key``; returns that client's (successes, attempts) and the
    statuses the flood got."""
    stop = threading.Event()
    flood_statuses: set[int] = set()

    def flooder() -> None:
        while not stop.is_set():
            try:
                flood_statuses.add(flood())
            except OSError:
                pass

    threads = [threading.Thread(target=flooder, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    ok = attempts = 0
    deadline = time.monotonic() + FLOOD_SECONDS
    try:
        while time.monotonic() < deadline:
            attempts += 1
            try:
                ok += gateway.chat(key, model).status == 200
            except OSError:
                pass
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    return ok, attempts, flood_statuses


def test_a_flood_without_a_key_does_not_starve_keyed_callers(provider_gateway: ProviderGateway) -> None:
    gw = provider_gateway
    key = gw.new_key(models=["gpt-4o"])
    body = many_parts()
    assert 3_500_000 < len(body) < 4 * 1024 * 1024  # parsed before the fix, not refused by gRPC's limit
    turns = iter(range(10**9))

    def unauthenticated() -> int:
        headers = {"Content-Type": CTYPE}
        if next(turns) % 2:  # half with a key nobody issued
            headers["Authorization"] = f"Bearer sk-forged-{next(turns)}"
        return http("POST", gw.envoy.url + "/v1/audio/transcriptions", raw=body, headers=headers, timeout=30).status

    ok, attempts, flood_statuses = keyed_success_during(unauthenticated, gw, key, "gpt-4o")
    assert attempts >= 10 and ok >= 0.95 * attempts, (ok, attempts)
    assert flood_statuses == {401}


def test_costly_bodies_from_a_keyed_caller_do_not_starve_the_others(provider_gateway: ProviderGateway) -> None:
    """The parts limit cuts a form short; a large JSON body is parsed off the event loop
    (the costly requests themselves may time out: they queue for the body thread)."""
    gw = provider_gateway
    key = gw.new_key(models=["gpt-4o", "whisper-1"])
    # Both under gRPC's old 4 MiB limit, so that they were parsed (inline) before the fix.
    form_body = form(field("model", "whisper-1"), *([b'Content-Disposition: form-data; name="a"\r\n\r\n'] * 60_000))
    json_body = b'{"model": "gpt-4o", "x": [' + b",".join([b"{}"] * 1_600_000) + b"]}"
    turns = iter(range(10**9))

    def costly() -> int:
        if next(turns) % 2:
            return http("POST", gw.envoy.url + "/v1/audio/transcriptions", raw=form_body, timeout=30,
                        headers={"Content-Type": CTYPE, "Authorization": f"Bearer {key}"}).status
        return http("POST", gw.envoy.url + "/v1/embeddings", raw=json_body, timeout=30,
                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"}).status

    ok, attempts, flood_statuses = keyed_success_during(costly, gw, key, "gpt-4o")
    assert attempts >= 10 and ok >= 0.95 * attempts, (ok, attempts)
    assert flood_statuses <= {200, 400, 403, 503}, flood_statuses


@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE", "PATCH"])
def test_a_model_call_is_a_post(gateway: Gateway, method: str) -> None:
    key = gateway.new_key(models=["gpt-4"])
    gateway.forget_upstream()
    r = http(method, gateway.envoy.url + "/v1/chat/completions", {"model": "gpt-4", "messages": []},
             {"Authorization": f"Bearer {key}"})
    assert r.status == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert gateway.upstream_seen() == []
