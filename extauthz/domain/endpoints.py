"""Which LLM endpoint a path is, what API format it speaks and where its model is named.

Every path a client can send is classified here; a path that is none of these is an
unsupported endpoint (denied), unless the operator declared it a pass-through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from extauthz.domain.providers import ANTHROPIC, BEDROCK_INVOKE, GEMINI, OPENAI, VERTEX_RAW_PREDICT

JSON, MULTIPART = "json", "multipart"

# operation -> (API format, body kind); the path may come with or without "/v1".
OPERATIONS = {
    "chat/completions": (OPENAI, JSON),
    "completions": (OPENAI, JSON),
    "embeddings": (OPENAI, JSON),
    "images/generations": (OPENAI, JSON),
    "responses": (OPENAI, JSON),
    "moderations": (OPENAI, JSON),
    "audio/transcriptions": (OPENAI, MULTIPART),
    "audio/translations": (OPENAI, MULTIPART),
    "images/edits": (OPENAI, MULTIPART),
    "messages": (ANTHROPIC, JSON),
    "messages/count_tokens": (ANTHROPIC, JSON),
}
AZURE_PATH = re.compile(r"/openai/deployments/([^/]+)/(.+)")
GEMINI_PATH = re.compile(r"/(v1beta|v1)/models/([^/:]+):(generateContent|streamGenerateContent)")
# Bedrock's InvokeModel, as AWS's SDKs (and Anthropic's AnthropicBedrock client) call it.
BEDROCK_PATH = re.compile(r"/model/([^/]+)/(invoke|invoke-with-response-stream)")
# Vertex AI's rawPredict for Anthropic models, as Anthropic's AnthropicVertex client calls it
# (the client's project and location are its own; the deployment's are used upstream).
VERTEX_PATH = re.compile(r"(?:/v1)?/projects/[^/]+/locations/[^/]+/publishers/anthropic/models/([^/:]+)"
                         r":(rawPredict|streamRawPredict)")


@dataclass(frozen=True)
class Endpoint:
    operation: str            # provider-independent: "chat/completions", "generateContent", ...
    api_format: str           # OPENAI | ANTHROPIC | GEMINI | BEDROCK_INVOKE | VERTEX_RAW_PREDICT
    body: str                 # JSON | MULTIPART
    path_model: str | None = None  # a model named by the path (Azure deployment, Gemini model)
    query: str = ""           # the client's query string, without "?"


@dataclass(frozen=True)
class PassThrough:
    """An operator-declared path forwarded with key authentication only."""

    index: int  # which entry of general_settings.pass_through_endpoints
    path: str
    query: str


# Path segments naming an operation that calls a model at some provider: the gateway's
# own endpoints and those it does not serve (speech, realtime, batches, assistants,
# fine-tuning, Azure deployments, Bedrock's invoke/converse, Ollama's generate). Gemini
# and Vertex name their methods in a segment with a ':' (":generateContent", ":predict").
MODEL_CALL_SEGMENTS = frozenset({
    "chat", "completions", "complete", "embeddings", "embed", "images", "audio", "responses", "moderations",
    "messages", "realtime", "batches", "threads", "assistants", "fine_tuning", "fine-tuning", "fine-tunes",
    "deployments", "invoke", "invoke-with-response-stream", "invoke-with-bidirectional-stream", "async-invoke",
    "converse", "converse-stream", "generate", "rawpredict", "streamrawpredict",
})
# Percent-escapes every server decodes to the same plain character: letters, digits, '-', '_', '~'.
_PLAIN_ESCAPES = frozenset(f"%{c:02x}" for c in range(128) if chr(c).isalnum() or chr(c) in "-_~")
_ESCAPE = re.compile(r"%.{0,2}", re.DOTALL)


def model_call_segment(path: str) -> str | None:
    """The segment of ``path`` that names a model call at some provider, or None."""
    for segment in path.lower().split("/"):
        if segment in MODEL_CALL_SEGMENTS or ":" in segment:
            return segment
    return None


def unsafe_path(path: str) -> bool:
    """Whether some server could read ``path`` as another path: a dot or empty segment, a
    backslash or ';' (path parameters: "..;/" is ".." to some), or a percent-escape of
    anything but a letter, digit, '-', '_' or '~' (encoded slashes and dots, double or
    overlong encodings, "%u002e")."""
    if "\\" in path or ";" in path or "//" in path:
        return True
    if any(segment in (".", "..") for segment in path.split("/")):
        return True
    return "%" in path and any(e.lower() not in _PLAIN_ESCAPES for e in _ESCAPE.findall(path))


def split_query(path: str) -> tuple[str, str]:
    route, _, query = path.partition("?")
    return route, query


# The common case, a known path without a query, answered by one dict lookup.
PLAIN = {f"{prefix}/{operation}": Endpoint(operation, api_format, body)
         for operation, (api_format, body) in OPERATIONS.items() for prefix in ("", "/v1")}


def classify(path: str) -> Endpoint | None:
    plain = PLAIN.get(path)
    if plain is not None:
        return plain
    route, query = split_query(path)
    route = route.rstrip("/") or "/"
    azure = AZURE_PATH.fullmatch(route)
    if azure:
        deployment, operation = unquote(azure.group(1)), azure.group(2)
        known = OPERATIONS.get(operation)
        if known is None or known[0] != OPENAI:
            return None
        return Endpoint(operation, OPENAI, known[1], deployment, query)
    gemini = GEMINI_PATH.fullmatch(route)
    if gemini:
        return Endpoint(gemini.group(3), GEMINI, JSON, unquote(gemini.group(2)), query)
    bedrock = BEDROCK_PATH.fullmatch(route)
    if bedrock:
        return Endpoint(bedrock.group(2), BEDROCK_INVOKE, JSON, unquote(bedrock.group(1)), query)
    vertex = VERTEX_PATH.fullmatch(route)
    if vertex:
        return Endpoint(vertex.group(2), VERTEX_RAW_PREDICT, JSON, unquote(vertex.group(1)), query)
    operation = route[4:] if route.startswith("/v1/") else route[1:]
    known = OPERATIONS.get(operation)
    if known is None:
        return None
    return Endpoint(operation, known[0], known[1], None, query)
