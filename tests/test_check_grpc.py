"""The Check service over real gRPC: every malformed request is a well-formed deny."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz.proto.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from tests import harness
from tests.harness import MASTER_KEY, Sidecar, check_request, http

HttpRequest = attribute_context_pb2.AttributeContext.HttpRequest


@pytest.fixture(scope="module")
def stub(sidecar: Sidecar) -> Iterator[external_auth_pb2_grpc.AuthorizationStub]:
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
        yield external_auth_pb2_grpc.AuthorizationStub(channel)


@pytest.fixture(scope="module")
def key(sidecar: Sidecar) -> str:
    r = http("POST", sidecar.admin + "/key/generate", {"models": ["gpt-4"]}, {"Authorization": f"Bearer {MASTER_KEY}"})
    return r.json()["key"]


def denied(resp: external_auth_pb2.CheckResponse) -> tuple[int, str]:
    assert resp.WhichOneof("http_response") == "denied_response" and resp.status.code != 0
    headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
    assert headers["content-type"] == "application/json"
    error = json.loads(resp.denied_response.body)["error"]
    return resp.denied_response.status.code, error["code"]


def test_health_is_serving(sidecar: Sidecar) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.auth.v3.Authorization"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


MALFORMED = [
    (b"", 400, "missing_model"),
    (b"not json", 400, "invalid_request_body"),
    (b"[1,2,3]", 400, "invalid_request_body"),
    (b'"a string"', 400, "invalid_request_body"),
    (b"{}", 400, "missing_model"),
    (b'{"model": null}', 400, "missing_model"),
    (b'{"model": 5}', 400, "invalid_model"),
    (b'{"model": ["gpt-4"]}', 400, "invalid_model"),
    (b'{"model": ""}', 400, "invalid_model"),
    (json.dumps({"model": "g" * 10_000}).encode(), 400, "invalid_model"),
    (b'{"model": "gpt-4\\u0000\\n"}', 400, "invalid_model"),
    (b'{"model": "gpt-4", "x": "\xff\xfe"}', 400, "invalid_request_body"),
    (b"[" * 100_000, 400, "invalid_request_body"),
    (b'{"model": "gpt-4o"}', 403, "model_not_allowed"),
]


@pytest.mark.parametrize("raw,status,code", MALFORMED)
def test_malformed_bodies_are_denied(stub, key: str, raw: bytes, status: int, code: str) -> None:
    resp = stub.Check(check_request({"authorization": f"Bearer {key}"}, raw), timeout=5)
    assert denied(resp) == (status, code)


def test_a_body_sent_as_text_is_refused_where_it_may_not_be_the_bytes_forwarded(stub, key: str) -> None:
    """Envoy Gateway sends the body as text, with '!' for every byte that is not UTF-8: a
    multipart upload (binary file parts) and a model naming '!' are refused, never checked
    on a stand-in; the same upload as bytes is read."""
    form = (b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            b'Content-Type: audio/wav\r\n\r\nRIFF!!!!WAVE\r\n--b--\r\n')
    headers = {"authorization": f"Bearer {key}", "content-type": "multipart/form-data; boundary=b"}
    as_text = stub.Check(check_request(headers, body=form.decode(), path="/v1/audio/transcriptions"), timeout=5)
    assert denied(as_text) == (415, "body_not_bytes")
    assert "pack_as_bytes" in json.loads(as_text.denied_response.body)["error"]["message"]
    as_bytes = stub.Check(check_request(headers, form, path="/v1/audio/transcriptions"), timeout=5)
    assert denied(as_bytes)[1] != "body_not_bytes"  # read (this key may not call whisper-1)
    bang = stub.Check(check_request({"authorization": f"Bearer {key}"}, body='{"model": "gpt-4!"}'), timeout=5)
    assert denied(bang) == (400, "body_not_bytes")
    raw_bang = stub.Check(check_request({"authorization": f"Bearer {key}"}, b'{"model": "gpt-4!"}'), timeout=5)
    assert denied(raw_bang)[1] != "body_not_bytes"
    # "mod\xffel" as Envoy writes it in the text field: a provider that drops the byte reads
    # a second "model"; refused. A '!' in the content is just text.
    second = stub.Check(check_request({"authorization": f"Bearer {key}"},
                                      body='{"model": "gpt-4", "mod!el": "gpt-4o"}'), timeout=5)
    assert denied(second) == (400, "body_not_bytes")
    content = stub.Check(check_request({"authorization": f"Bearer {key}"},
                                       body='{"model": "gpt-4", "messages": [{"role": "user", "content": "Hi!"}]}'),
                         timeout=5)
    assert content.status.code == 0


def test_utf8_body_field_is_read_when_raw_body_is_absent(stub, key: str) -> None:
    resp = stub.Check(check_request({"authorization": f"Bearer {key}"}, body='{"model": "gpt-4"}'), timeout=5)
    assert resp.WhichOneof("http_response") == "ok_response" and resp.status.code == 0
    headers = {h.header.key: h for h in resp.ok_response.headers}
    assert headers["authorization"].header.value == "Bearer sk-upstream-gpt-4"
    assert all(h.append.value is False and h.HasField("append") for h in headers.values())
    assert all(h.append_action == h.OVERWRITE_IF_EXISTS_OR_ADD for h in headers.values())
    assert resp.dynamic_metadata.fields["model"].string_value == "gpt-4"
    assert key not in str(resp)


@pytest.mark.parametrize("headers,code", [
    ({"authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key"),
    ({"authorization": "Bearer "}, "missing_api_key"),
    ({"authorization": "Bearer sk-a", "x-api-key": "sk-b"}, "conflicting_api_keys"),
])
def test_credential_problems(stub, headers: dict[str, str], code: str) -> None:
    assert denied(stub.Check(check_request(headers, b'{"model": "gpt-4"}'), timeout=5)) == (401, code)


def test_truncated_body_is_denied(stub, key: str) -> None:
    headers = {"authorization": f"Bearer {key}", "x-envoy-auth-partial-body": "true"}
    assert denied(stub.Check(check_request(headers, b'{"model": "gpt-4"'), timeout=5)) == (413, "body_too_large")


def test_unreachable_redis_fails_closed(workdir: Path, config_path: Path) -> None:
    dead = f"redis://127.0.0.1:{harness.free_port()}/0"
    side = harness.start_sidecar(workdir, config_path, dead)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{side.grpc_port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            resp = stub.Check(check_request({"authorization": "Bearer sk-anything"}, b'{"model": "gpt-4"}'), timeout=5)
            assert denied(resp) == (503, "authz_unavailable")
            # The master key needs no lookup and still works.
            ok = stub.Check(check_request({"authorization": f"Bearer {MASTER_KEY}"}, b'{"model": "gpt-4"}'), timeout=5)
            assert ok.status.code == 0
        r = http("POST", side.admin + "/key/generate", {}, {"Authorization": f"Bearer {MASTER_KEY}"})
        assert r.status == 503 and r.json()["error"]["code"] == "store_unavailable"
        assert http("GET", side.admin + "/health/readiness").status == 503
    finally:
        side.proc.stop()
