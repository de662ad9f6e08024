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

Vertex AI's paths (``/v1/projects/…/publishers/anthropic/models/{m}:rawPredict``,
``…/endpoints/openapi/chat/completions``) take only a bearer token this fake issued and
that has not expired. It issues them at ``/__fake/google/token`` the way Google's OAuth
endpoint does for a service account: a JWT assertion signed RS256 by a key registered
beforehand (``/__fake/google/keys``), for this audience, unexpired, asking for the
cloud-platform scope. Tests register a key with a short token lifetime to see refreshes.
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
    # The usage as Bedrock reports it: in the Anthropic events, and its own metrics at the end.
    given, taken = (int(n) for n in request.headers.get("x-fake-usage", "10,1").split(","))
    events = [{"type": "message_start", "message": {**message, "content": [],
                                                    "usage": {"input_tokens": given, "output_tokens": 1}}},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "fake bedrock"}},
              {"type": "content_block_stop", "index": 0},
              {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
               "usage": {"output_tokens": taken}},
              {"type": "message_stop", "amazon-bedrock-invocationMetrics": {
                  "inputTokenCount": given, "outputTokenCount": taken, "invocationLatency": 5,
                  "firstByteLatency": 2}}]
    for event in events:
        await response.write(event_stream_message(event))
    await response.write_eof()
    return response


GOOGLE_KEYS: dict[str, dict[str, Any]] = {}   # client_email -> {"pem": ..., "lifetime": s}
GOOGLE_TOKENS: dict[str, float] = {}          # access token -> expiry (epoch)
GOOGLE_TOKEN_REQUESTS: list[dict[str, Any]] = []
VERTEX_PATH = re.compile(r"^/v1/projects/[^/]+/locations/[^/]+/(publishers/anthropic/models/[^/:]+:"
                         r"(rawPredict|streamRawPredict)|endpoints/openapi/chat/completions)$")


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def google_keys(request: web.Request) -> web.Response:
    """Register a service account's public key (test set-up; Google knows its own)."""
    doc = await request.json()
    GOOGLE_KEYS[doc["client_email"]] = {"pem": doc["public_key_pem"], "lifetime": float(doc.get("lifetime", 3600))}
    return web.json_response({"ok": True})


async def google_token(request: web.Request) -> web.Response:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    form = await request.post()
    GOOGLE_TOKEN_REQUESTS.append({"at": time.time(), "grant_type": form.get("grant_type")})

    def refuse(why: str) -> web.Response:
        return web.json_response({"error": "invalid_grant", "error_description": why}, status=400)

    if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
        return refuse("unsupported grant_type")
    try:
        header_b64, claims_b64, signature_b64 = str(form.get("assertion", "")).split(".")
        header, claims = json.loads(_b64url(header_b64)), json.loads(_b64url(claims_b64))
    except ValueError:
        return refuse("malformed assertion")
    key = GOOGLE_KEYS.get(claims.get("iss", ""))
    if header.get("alg") != "RS256" or key is None:
        return refuse("unknown service account or algorithm")
    public = serialization.load_pem_public_key(key["pem"].encode())
    try:
        public.verify(_b64url(signature_b64), f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(),
                      hashes.SHA256())  # type: ignore[union-attr, call-arg]
    except InvalidSignature:
        return refuse("Invalid JWT Signature.")
    now = time.time()
    # Google's own token endpoint is the audience its client libraries sign for, wherever they post.
    if claims.get("aud") not in ("https://oauth2.googleapis.com/token", f"http://{request.host}{request.path}"):
        return refuse(f"wrong audience {claims.get('aud')}")
    if not (claims.get("iat", 0) <= now + 60 and now < claims.get("exp", 0) <= claims.get("iat", 0) + 3600):
        return refuse("Invalid JWT: Token must be a short-lived token and in a reasonable timeframe")
    if "https://www.googleapis.com/auth/cloud-platform" not in str(claims.get("scope", "")).split():
        return refuse("scope cloud-platform not requested")
    token = f"ya29.fake-{len(GOOGLE_TOKENS) + 1}-{os.urandom(6).hex()}"
    GOOGLE_TOKENS[token] = now + key["lifetime"]
    return web.json_response({"access_token": token, "expires_in": int(key["lifetime"]), "token_type": "Bearer"})


async def google_token_log(request: web.Request) -> web.Response:
    return web.json_response({"requests": GOOGLE_TOKEN_REQUESTS, "issued": len(GOOGLE_TOKENS)})


async def vertex(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    auth = request.headers.get("authorization", "")
    token = auth[7:] if auth.startswith("Bearer ") else ""
    expiry = GOOGLE_TOKENS.get(token)
    arrived = {"method": request.method, "path": request.raw_path, "host": request.host,
               "headers": {k.lower(): v for k, v in request.headers.items()},
               "body": json.loads(raw) if raw else None, "raw_body": base64.b64encode(raw).decode(),
               "token_ok": expiry is not None and time.time() < expiry}
    SEEN.append(arrived)
    if not arrived["token_ok"]:
        return web.json_response({"error": {"code": 401, "status": "UNAUTHENTICATED", "message":
                                            "Request had invalid authentication credentials."}}, status=401)
    body = arrived["body"] if isinstance(arrived["body"], dict) else {}
    if request.path.endswith("/chat/completions"):
        return web.json_response({**answer("/chat/completions", body.get("model"), "fake vertex"), "echo": arrived})
    if "model" in body or not isinstance(body.get("anthropic_version"), str):
        return web.json_response({"error": {"code": 400, "message": "anthropic_version is required; model is "
                                            "not allowed in the body"}}, status=400)
    model = request.path.rsplit("/", 1)[1].split(":")[0]
    message = answer("/messages", model, "fake vertex")
    if request.path.endswith(":rawPredict"):
        return web.json_response({**message, "echo": arrived})
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for event in ({"type": "message_start", "message": {**message, "content": []}},
                  {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                  {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "fake vertex"}},
                  {"type": "content_block_stop", "index": 0},
                  {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                   "usage": {"output_tokens": 1}},
                  {"type": "message_stop"}):
        await response.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
    await response.write_eof()
    return response


ENTRA_CLIENTS: dict[str, dict[str, Any]] = {}  # client_id -> {"secret": ..., "tenant": ..., "lifetime": s}
ENTRA_TOKENS: dict[str, float] = {}           # access token -> expiry (epoch)


async def entra_clients(request: web.Request) -> web.Response:
    """Register an app's client credential (test set-up; Entra knows its own)."""
    doc = await request.json()
    ENTRA_CLIENTS[doc["client_id"]] = {"secret": doc["client_secret"], "tenant": doc["tenant_id"],
                                       "lifetime": float(doc.get("lifetime", 3600))}
    return web.json_response({"ok": True})


async def entra_discovery(request: web.Request) -> web.Response:
    tenant = request.match_info["tenant"]
    base = f"{request.scheme}://{request.host}/{tenant}"
    return web.json_response({"token_endpoint": f"{base}/oauth2/v2.0/token",
                              "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                              "issuer": f"{base}/v2.0", "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode"})


async def entra_token(request: web.Request) -> web.Response:
    """Entra ID's token endpoint for the client-credentials grant."""
    form = await request.post()
    client = ENTRA_CLIENTS.get(str(form.get("client_id", "")))
    if form.get("grant_type") != "client_credentials" or client is None \
            or not hmac.compare_digest(str(form.get("client_secret", "")), client["secret"]) \
            or client["tenant"] != request.match_info["tenant"]:
        return web.json_response({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client "
                                  "secret provided."}, status=401)
    if str(form.get("scope", "")) != "https://cognitiveservices.azure.com/.default":
        return web.json_response({"error": "invalid_scope"}, status=400)
    token = f"eyJ.entra-fake-{len(ENTRA_TOKENS) + 1}-{os.urandom(6).hex()}"
    ENTRA_TOKENS[token] = time.time() + client["lifetime"]
    return web.json_response({"token_type": "Bearer", "expires_in": int(client["lifetime"]),
                              "ext_expires_in": int(client["lifetime"]), "access_token": token})


async def entra_valid(request: web.Request) -> web.Response:
    token = request.query.get("token", "")
    return web.json_response({"valid": token in ENTRA_TOKENS and time.time() < ENTRA_TOKENS[token],
                              "issued": len(ENTRA_TOKENS)})


async def echo(request: web.Request) -> web.StreamResponse:
    if VERTEX_PATH.match(request.path):
        return await vertex(request)
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
    reply = answer(request.path, model, text)
    # A test sets the usage the "provider" reports: "x-fake-usage: <input>,<output>", or
    # "none" for a provider that reports none (not even in a stream that asks for it).
    wanted = headers.get("x-fake-usage")
    if wanted == "none":
        reply.pop("usage", None)
        wanted = None
    if wanted and "candidates" in reply:  # Gemini reports usageMetadata
        given, taken = (int(n) for n in wanted.split(","))
        reply["usageMetadata"] = {"promptTokenCount": given, "candidatesTokenCount": taken,
                                  "totalTokenCount": given + taken}
        if request.path.endswith(":streamGenerateContent"):
            # Gemini streams a JSON array of chunks (or events with alt=sse), usage cumulative.
            first = {**reply, "usageMetadata": {"promptTokenCount": given, "candidatesTokenCount": 1}}
            if request.query.get("alt") == "sse":
                events = "".join(f"data: {json.dumps(c)}\r\n\r\n" for c in (first, reply))
                return web.Response(text=events, content_type="text/event-stream")
            delay = float(headers.get("x-fake-delay", "0"))
            if delay:  # the array as it streams: a chunk, a pause, the next
                response = web.StreamResponse(headers={"content-type": "application/json"})
                await response.prepare(request)
                for piece in ("[" + json.dumps(first), ",\r\n" + json.dumps(reply), "]"):
                    await response.write(piece.encode())
                    await asyncio.sleep(delay)
                await response.write_eof()
                return response
            return web.json_response([first, reply])
    if wanted and isinstance(reply.get("usage"), dict):
        given, taken = (int(n) for n in wanted.split(","))
        names = ("input_tokens", "output_tokens") if "input_tokens" in reply["usage"] else \
            ("prompt_tokens", "completion_tokens")
        reply["usage"] = {names[0]: given, names[1]: taken, **({"total_tokens": given + taken}
                                                                if names[0] == "prompt_tokens" else {})}
    if isinstance(fields, dict) and fields.get("stream") is True:
        return await stream(request, reply, fields, float(headers.get("x-fake-delay", "0")))
    delay = float(headers.get("x-fake-delay", "0"))
    if delay:  # a provider taking its time: calls overlap
        await asyncio.sleep(delay)
    if headers.get("x-fake-usage-last"):  # the usage after everything else (the echo is large)
        usage = reply.pop("usage", None)
        return web.json_response({**reply, "echo": arrived, "usage": usage})
    return web.json_response({**reply, "echo": arrived})


async def stream(request: web.Request, reply: dict[str, Any], body: dict[str, Any], delay: float) -> web.StreamResponse:
    """The reply as the provider streams it (server-sent events): OpenAI's chunks (the
    usage in a last chunk, with stream_options.include_usage), or Anthropic's events."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    usage = reply.get("usage") or {}
    if request.path.endswith("/responses"):
        # As OpenAI streams a response: the response object (echoing the request's tools and
        # instructions) in response.created, text deltas, then response.completed with usage.
        echoed = {**reply, "tools": body.get("tools") or [], "instructions": body.get("instructions")}
        events = [{"type": "response.created", "response": {**echoed, "status": "in_progress", "usage": None}},
                  {"type": "response.output_text.delta", "delta": "fake"},
                  {"type": "response.completed", "response": echoed}]
        lines = [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events]
    elif request.path.endswith("/messages"):
        # Every event of Anthropic's stream, so the SDK's messages.stream() helper reads it.
        events = [{"type": "message_start", "message": {**reply, "content": [], "stop_reason": None,
                                                        "usage": {"input_tokens": usage.get("input_tokens", 0),
                                                                  "output_tokens": 1}}},
                  {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                  {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "fake"}},
                  {"type": "content_block_stop", "index": 0},
                  {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                   "usage": {"output_tokens": usage.get("output_tokens", 0)}},
                  {"type": "message_stop"}]
        lines = [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events]
    else:
        chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": reply.get("model")}
        # As OpenAI streams: the role first, the text, then the finish reason (the SDK's
        # chat.completions.stream() helper reads all three).
        deltas = ({"role": "assistant", "content": "fake "}, {"content": "stream"}, {})
        choices = [[{"index": 0, "delta": d, "finish_reason": None if d else "stop"}] for d in deltas]
        # Asked for usage (stream_options.include_usage), OpenAI adds "usage": null to
        # every chunk and a last chunk with no choices and the usage; not asked, neither.
        asked = (body.get("stream_options") or {}).get("include_usage") is True
        lines = [f"data: {json.dumps({**chunk, 'choices': c, **({'usage': None} if asked else {})})}\n\n"
                 for c in choices]
        # Where OpenAI-compatible servers put the counts: a last chunk with no choices
        # (OpenAI's), one without a "choices" member, or the last chunk with choices.
        shape = request.headers.get("x-fake-usage-shape", "openai")
        if shape == "string-event":  # an event whose data is a JSON string, before the chunks
            lines.insert(0, 'data: "no tokens counted here"\n\n')
        if asked and usage and shape == "last-choice":
            lines[-1] = f"data: {json.dumps({**chunk, 'choices': choices[-1], 'usage': usage})}\n\n"
        elif asked and usage:
            last = {**chunk, 'usage': usage} if shape == "no-choices" else {**chunk, 'choices': [], 'usage': usage}
            lines.append(f"data: {json.dumps(last)}\n\n")
        lines.append("data: [DONE]\n\n")
    if request.headers.get("x-fake-crlf"):  # lines ended as the SSE spec also allows
        lines = [line.replace("\n", "\r\n") for line in lines]
    if request.headers.get("x-fake-cr"):    # and this, the third way
        lines = [line.replace("\n", "\r") for line in lines]
    if request.headers.get("x-fake-unended"):  # a server that ends its last event without a newline
        lines[-1] = lines[-1].rstrip("\r\n")
    pieces = int(request.headers.get("x-fake-piece-bytes", "0"))
    if pieces:  # the stream cut anywhere, events split across writes (as a network may)
        whole = "".join(lines).encode()
        for at in range(0, len(whole), pieces):
            await response.write(whole[at:at + pieces])
            await asyncio.sleep(0.002)
        await response.write_eof()
        return response
    for line in lines:
        await response.write(line.encode())
        if delay:
            await asyncio.sleep(delay)
    await response.write_eof()
    return response


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081, help="0: any free port (see --ready-file)")
    p.add_argument("--ready-file", help="once serving, write {\"port\": N} there")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (and --tls-key)")
    p.add_argument("--tls-key")
    args = p.parse_args()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("GET", SEEN_PATH, seen)
    app.router.add_route("DELETE", SEEN_PATH, seen)
    app.router.add_route("POST", "/__fake/google/keys", google_keys)
    app.router.add_route("POST", "/__fake/google/token", google_token)
    app.router.add_route("GET", "/__fake/google/token", google_token_log)
    app.router.add_route("POST", "/__fake/entra/clients", entra_clients)
    app.router.add_route("GET", "/__fake/entra/valid", entra_valid)
    app.router.add_route("GET", "/{tenant}/v2.0/.well-known/openid-configuration", entra_discovery)
    app.router.add_route("POST", "/{tenant}/oauth2/v2.0/token", entra_token)
    app.router.add_route("*", "/{tail:.*}", echo)
    tls = None
    if args.tls_cert:
        import ssl
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    asyncio.run(serve(app, args.host, args.port, args.ready_file, tls))


async def serve(app: web.Application, host: str, port: int, ready_file: str | None, tls: Any = None) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
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
