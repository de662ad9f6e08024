"""A fake LLM provider for demos and tests: OpenAI, Azure OpenAI, Anthropic and Gemini shapes.

It answers every request with the response shape of the endpoint called (so official
SDKs parse it), plus an ``echo`` field showing what arrived: method, path, host, headers
and the body (JSON parsed; multipart as its fields and file sizes). Each deployment of
the example config carries its own fake credential, so the echo tells which deployment
Envoy routed to and proves the virtual key did not reach the provider.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email.parser
import email.policy
import json
import os
import signal
from typing import Any

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


async def echo(request: web.Request) -> web.Response:
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
