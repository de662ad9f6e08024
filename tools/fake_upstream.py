"""A fake OpenAI-compatible upstream for demos and tests.

It answers every request with a chat-completion-shaped JSON body whose ``echo`` field
shows what arrived: method, path, host, headers and the parsed body. Each deployment
of the example config carries its own fake credential, so the echo tells which
deployment Envoy routed to and proves the virtual key did not reach the provider.
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web


SEEN: list[dict] = []
SEEN_PATH = "/__fake/requests"


async def seen(request: web.Request) -> web.Response:
    """What arrived so far (GET) or forget it (DELETE); tests use it to prove a deny forwarded nothing."""
    if request.method == "DELETE":
        SEEN.clear()
    return web.json_response(SEEN)


async def echo(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode("utf-8", "replace")
    arrived = {
        "method": request.method,
        "path": request.path_qs,
        "host": request.host,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body": body,
    }
    SEEN.append(arrived)
    model = body.get("model") if isinstance(body, dict) else None
    headers = arrived["headers"]
    credential = headers.get("authorization") or headers.get("api-key") or headers.get("x-api-key")
    return web.json_response({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant",
            "content": f"fake upstream: {request.method} {request.path_qs} model={model} credential={credential}"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        "echo": arrived,
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    args = p.parse_args()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("GET", SEEN_PATH, seen)
    app.router.add_route("DELETE", SEEN_PATH, seen)
    app.router.add_route("*", "/{tail:.*}", echo)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
