"""A fake LLM provider for demos and tests: OpenAI, Azure OpenAI, Anthropic, Gemini and Bedrock shapes.

It answers every request with the response shape of the endpoint called (so official
SDKs parse it), plus an ``echo`` field showing what arrived: method, path, host, headers
and the body (JSON parsed; multipart as its fields and file sizes). Each deployment of
the example config carries its own fake credential, so the echo tells which deployment
Envoy routed to and proves the virtual key did not reach the provider.

Bedrock's paths (``/model/{id}/invoke``, ``invoke-with-response-stream``, ``/openai/v1/…``)
check what AWS checks: a SigV4 signature computed here, independently, over the bytes that
arrived (method, path, query, signed headers, body hash), with the fake's one credential
(``FAKE_AWS_ACCESS_KEY_ID`` / ``FAKE_AWS_SECRET_ACCESS_KEY``), for service ``bedrock``, a
timestamp within 5 minutes; anything else is answered 403 as AWS would.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email.parser
import email.policy
import hashlib
import hmac
import json
import os
import re
import signal
import struct
import time
import zlib
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, quote

from aiohttp import web

SEEN: list[dict] = []
SEEN_PATH = "/__fake/requests"


async def seen(request: web.Request) -> web.Response:
    """What arrived so far (GET) or forget it (DELETE); tests use it to prove a deny forwarded nothing."""
    if request.method == "DELETE":
        SEEN.clear()
    return web.json_response(SEEN)


async def read_body(request: web.Request) -> Any:
    raw = await request.read()
    if request.content_type.startswith("multipart/"):
        # Python's email parser, as a provider built on it would read the form.
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + request.headers["Content-Type"].encode("latin-1") + b"\r\n\r\n" + raw)
        fields: dict[str, Any] = {}
        files: dict[str, int] = {}
        for part in message.iter_parts() if message.is_multipart() else ():
            name = part.get_param("name", header="content-disposition") or ""
            data = part.get_payload(decode=True) or b""
            if part.get_filename():
                files[name] = len(data)
            else:
                fields[name] = data.decode("utf-8", "replace")
        return {"fields": fields, "files": files}
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("utf-8", "replace")


def answer(path: str, model: Any, text: str) -> dict[str, Any]:
    """The response body an SDK expects from this endpoint."""
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    if path.endswith(":generateContent") or path.endswith(":streamGenerateContent"):
        return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP",
                                "index": 0}], "modelVersion": model}
    if path.endswith("/messages/count_tokens"):
        return {"input_tokens": 3}
    if path.endswith("/messages"):
        return {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 1}}
    if path.endswith("/embeddings"):
        return {"object": "list", "model": model, "usage": {"prompt_tokens": 1, "total_tokens": 1},
                "data": [{"object": "embedding", "index": 0, "embedding": [0.25, 0.5]}]}
    if path.endswith(("/images/generations", "/images/edits")):
        return {"created": 0, "data": [{"url": "https://images.invalid/fake.png", "revised_prompt": text}]}
    if path.endswith(("/audio/transcriptions", "/audio/translations")):
        return {"text": text}
    if path.endswith("/moderations"):
        return {"id": "modr-fake", "model": model, "results": [{"flagged": False, "categories": {},
                                                                 "category_scores": {}}]}
    if path.endswith("/responses"):
        return {"id": "resp_fake", "object": "response", "created_at": 0, "model": model, "status": "completed",
                "output": [{"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2,
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}}}
    if path.endswith("/completions") and not path.endswith("/chat/completions"):
        return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model, "usage": usage,
                "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}]}
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model, "usage": usage,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}


AWS_KEY_ID = os.environ.get("FAKE_AWS_ACCESS_KEY_ID", "AKIAEXTAUTHZFAKE0001")
AWS_SECRET = os.environ.get("FAKE_AWS_SECRET_ACCESS_KEY", "fake/secret/for/sigv4/tests/0000000000")
BEDROCK_PATH = re.compile(r"^(/model/[^/]+/(invoke|invoke-with-response-stream)|/openai/v1/.+)$")
SIGV4 = re.compile(r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                   r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$")


def _uri_encode(text: str) -> str:
    return quote(text, safe="-_.~")


def sigv4_problem(request: web.Request, raw: bytes) -> str | None:
    """Why AWS would refuse this request's signature, or None (SigV4, as AWS documents it)."""
    match = SIGV4.match(request.headers.get("authorization", ""))
    if match is None:
        return "missing or malformed AWS4-HMAC-SHA256 authorization"
    key_id, day, region, service, signed, signature = match.groups()
    if key_id != AWS_KEY_ID or service != "bedrock":
        return f"unknown credential {key_id} or wrong service {service}"
    stamp = request.headers.get("x-amz-date", "")
    try:
        when = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return "missing x-amz-date"
    if abs(time.time() - when) > 300 or stamp[:8] != day:
        return "signature expired or dated another day"
    body_hash = hashlib.sha256(raw).hexdigest()
    declared = request.headers.get("x-amz-content-sha256")
    if declared is not None and declared != body_hash:
        return "x-amz-content-sha256 does not match the body"
    raw_path, _, query = request.raw_path.partition("?")
    # Every service but S3 encodes each (already encoded) path segment once more.
    canonical_uri = "/".join(_uri_encode(segment) for segment in raw_path.split("/"))
    canonical_query = "&".join(f"{_uri_encode(k)}={_uri_encode(v)}"
                               for k, v in sorted(parse_qsl(query, keep_blank_values=True)))
    names = signed.split(";")
    if "host" not in names or names != sorted(names):
        return "the host header must be signed"
    values = {}
    for name in names:
        got = request.headers.getall(name, None)
        if got is None:
            return f"signed header {name} is missing"
        values[name] = ",".join(" ".join(v.split()) for v in got)
    canonical = "\n".join([request.method, canonical_uri, canonical_query,
                           "".join(f"{n}:{values[n]}\n" for n in names), signed, body_hash])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + AWS_SECRET).encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        return "The request signature we calculated does not match the signature you provided."
    return None


def event_stream_message(payload: dict[str, Any]) -> bytes:
    """One message of AWS's event stream (application/vnd.amazon.eventstream), as Bedrock
    streams InvokeModelWithResponseStream: a chunk whose bytes are an Anthropic stream event."""
    headers = b""
    for name, value in ((":event-type", "chunk"), (":content-type", "application/json"), (":message-type", "event")):
        headers += bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value)) + value.encode()
    body = json.dumps({"bytes": base64.b64encode(json.dumps(payload).encode()).decode()}).encode()
    total = 12 + len(headers) + len(body) + 4
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + headers + body
    return message + struct.pack(">I", zlib.crc32(message))


async def bedrock(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    problem = sigv4_problem(request, raw)
    arrived = {"method": request.method, "path": request.raw_path, "host": request.host,
               "headers": {k.lower(): v for k, v in request.headers.items()},
               "body": json.loads(raw) if raw else None, "raw_body": base64.b64encode(raw).decode(),
               "signature_ok": problem is None}
    SEEN.append(arrived)
    if problem is not None:
        return web.json_response({"message": problem}, status=403,
                                 headers={"x-amzn-ErrorType": "InvalidSignatureException"})
    body = arrived["body"] if isinstance(arrived["body"], dict) else {}
    if request.path.startswith("/openai/"):
        return web.json_response({**answer("/chat/completions", body.get("model"), "fake bedrock"), "echo": arrived})
    if "model" in body or "stream" in body or not isinstance(body.get("anthropic_version"), str):
        return web.json_response({"message": "Malformed input request: extraneous key [model] or [stream], or "
                                  "anthropic_version missing"}, status=400,
                                 headers={"x-amzn-ErrorType": "ValidationException"})
    model = request.path.split("/")[2]
    message = answer("/messages", model, "fake bedrock")
    if request.path.endswith("/invoke"):
        return web.json_response({**message, "echo": arrived})
    response = web.StreamResponse(headers={"content-type": "application/vnd.amazon.eventstream"})
    await response.prepare(request)
    events = [{"type": "message_start", "message": {**message, "content": []}},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "fake bedrock"}},
              {"type": "content_block_stop", "index": 0},
              {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
               "usage": {"output_tokens": 1}},
              {"type": "message_stop"}]
    for event in events:
        await response.write(event_stream_message(event))
    await response.write_eof()
    return response


async def echo(request: web.Request) -> web.StreamResponse:
    # Bedrock's own paths always; its OpenAI-compatible one when signed (other fakes serve /openai/v1 too).
    if BEDROCK_PATH.match(request.path) and (request.path.startswith("/model/")
                                             or request.headers.get("authorization", "").startswith("AWS4-")):
        return await bedrock(request)
    body = await read_body(request)
    arrived = {
        "method": request.method,
        "path": request.path_qs,
        "host": request.host,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body": body,
        # The bytes as they arrived, so tests can tell what any parser would read of them.
        "raw_body": base64.b64encode(await request.read()).decode(),
    }
    SEEN.append(arrived)
    fields = body.get("fields", body) if isinstance(body, dict) else {}
    model = fields.get("model") if isinstance(fields, dict) else None
    headers = arrived["headers"]
    credential = headers.get("authorization") or headers.get("api-key") or headers.get("x-api-key") \
        or headers.get("x-goog-api-key")
    text = f"fake upstream: {request.method} {request.path} model={model} credential={credential}"
    return web.json_response({**answer(request.path, model, text), "echo": arrived})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081, help="0: any free port (see --ready-file)")
    p.add_argument("--ready-file", help="once serving, write {\"port\": N} there")
    args = p.parse_args()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("GET", SEEN_PATH, seen)
    app.router.add_route("DELETE", SEEN_PATH, seen)
    app.router.add_route("*", "/{tail:.*}", echo)
    asyncio.run(serve(app, args.host, args.port, args.ready_file))


async def serve(app: web.Application, host: str, port: int, ready_file: str | None) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    if ready_file:
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        with open(ready_file + ".tmp", "w") as f:
            json.dump({"port": bound}, f)
        os.replace(ready_file + ".tmp", ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    main()
