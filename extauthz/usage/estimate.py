"""What a call may cost before it is made: the hold that a caller with a budget or a
token window places when it is admitted (usage/counters.py), settled against the usage
its response reports. Pure: the body as parsed, its size, the operation and the route's
price come in; tokens and USD come out.

An upper bound wherever the gateway can know one:

- input tokens: the body's size in bytes. Every tokenizer the providers use turns a
  token into at least one byte of text, and a message's framing tokens (role,
  separators) are fewer than its JSON's framing bytes, so a JSON body's length bounds
  its prompt's tokens; an image, audio or file sent inline (base64) costs far fewer
  tokens than its bytes;
  A body that makes the provider read input it does not carry (a stored response,
  conversation, prompt or cache; a file, document, image or audio by reference or URL;
  a hosted tool that fetches or runs) holds the model's input window (``max_input`` in
  the price table, else DEFAULT_MAX_INPUT_TOKENS). A form (multipart) body: its size,
  and its ``n`` parts as the count;
- output tokens: what the request asks for (``max_completion_tokens``, ``max_tokens``,
  ``max_output_tokens``; Gemini's ``generationConfig.maxOutputTokens``, Bedrock
  Converse's ``inferenceConfig.maxTokens``), as asked (a table's ceiling may be out of
  date: it never lowers what a call asks for); without one, the ceiling (the
  deployment's ``model_info.max_output_tokens``, else the bundled price table's, else
  ``default_max_output_tokens``), times ``n`` / ``best_of`` / ``candidateCount``.
  Embeddings, moderations and token counts write none.

A member a lenient reader could take for one of these names (``MAX_TOKENS``,
Gemini's snake_case ``generation_config.max_output_tokens``) voids what the request asks
for: the ceiling is held instead. A completion count that does not read as a whole
number (``"n": "8"``, ``8.0``, ``"N": 8``) holds the most any provider allows
(MAX_COMPLETIONS): a server that reads it leniently may make that many.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

from extauthz.usage.prices import Price

# The ceiling of a model neither its deployment nor the table knows (LiteLLM's own
# fallback for its budget reservation).
DEFAULT_MAX_OUTPUT_TOKENS = 16384
# The input window of a model the table does not know, for a call that makes the
# provider read stored context (the largest windows providers sell).
DEFAULT_MAX_INPUT_TOKENS = 1_048_576
OUTPUT_NAMES = ("max_completion_tokens", "max_tokens", "max_output_tokens")
MULTIPLIER_NAMES = ("n", "best_of")
CONFIG_OUTPUT_NAMES = ("maxoutputtokens", "max_output_tokens")      # in generationConfig (folded)
CONFIG_MULTIPLIER_NAMES = ("candidatecount", "candidate_count")
MAX_COMPLETIONS = 128  # OpenAI's most n; Gemini's candidateCount goes to 8
STORED_CONTEXT = ("previous_response_id", "conversation", "cachedContent", "cached_content", "mcp_servers")
# Members of a content part or a tool that make the provider fetch, or loop over, input the
# body does not hold: a file or a document by reference, an image by URL, a hosted tool.
REFERENCE_KEYS = frozenset({"file_id", "file_url", "fileData", "file_data", "fileUri", "file_uri"})
HOSTED_TOOLS = ("web_search", "web_fetch", "file_search", "mcp", "code_interpreter", "code_execution", "computer",
                "image_generation", "url_context", "google_search", "retrieval")
WALK_MAX_NODES = 100_000  # a body with more nodes than this is held as one that references input
INPUT_ONLY = frozenset({"embeddings", "moderations", "messages/count_tokens"})
_FOLDED = frozenset(OUTPUT_NAMES + MULTIPLIER_NAMES)


class Estimate(NamedTuple):
    tokens: int
    cost: float | None  # None: the route has no price


def _whole(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def _times(values: list[Any]) -> int:
    """How many completions: the most any count asks for; a count that is not a whole
    number (or is one under another spelling) the most a provider allows."""
    return max((1 if v is None else _whole(v) or MAX_COMPLETIONS for v in values), default=1)


def _requested(doc: Mapping[str, Any]) -> tuple[int | None, int]:
    """The output tokens a body asks for (None: it names none it could be held to) and
    how many completions it asks for."""
    asked = [_whole(doc.get(n)) for n in OUTPUT_NAMES if n in doc]
    times = [doc.get(n) for n in doc if n.casefold() in MULTIPLIER_NAMES]
    lenient = any(n.casefold() in _FOLDED and n not in _FOLDED for n in doc)
    for name in ("generationConfig", "generation_config"):
        config = doc.get(name)
        if not isinstance(config, dict):
            continue
        for key, value in config.items():
            folded = key.casefold()
            if folded in CONFIG_MULTIPLIER_NAMES:
                times.append(value)
            elif folded in CONFIG_OUTPUT_NAMES:
                if key == "maxOutputTokens":
                    asked.append(_whole(value))
                else:
                    lenient = True
    inference = doc.get("inferenceConfig")
    if isinstance(inference, dict) and "maxTokens" in inference:
        asked.append(_whole(inference.get("maxTokens")))
    limits = [n for n in asked if n is not None]
    if lenient or not asked or len(limits) < len(asked):
        # another spelling a lenient reader takes, or a limit that does not read as one:
        # the provider is held to nothing the request says
        return None, _times(times)
    return max(limits), _times(times)


def _form_count(text: str) -> Any:
    """A form's count as a JSON body's would read: a whole number in plain digits, else unreadable."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 6 else text


def stored_context(doc: Mapping[str, Any]) -> bool:
    """Whether the provider bills input the body only names: a stored response,
    conversation, prompt template or cache; a file, document or image by reference; a
    hosted tool that fetches (or loops over) more."""
    if any(doc.get(n) not in (None, "") for n in STORED_CONTEXT) or isinstance(doc.get("prompt"), dict):
        return True
    stack: list[Any] = [doc]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > WALK_MAX_NODES:
            return True
        if isinstance(node, dict):
            if REFERENCE_KEYS.intersection(node) or _fetched(node):
                return True
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    return False


def _fetched(node: Mapping[str, Any]) -> bool:
    """A part or tool that has the provider fetch or run something: an image or document by
    URL, a source of type url/file, a hosted tool."""
    kind = node.get("type")
    if isinstance(kind, str) and kind.startswith(HOSTED_TOOLS):
        return True
    for name in ("image_url", "url", "source", "document", "audio_url", "video_url", "input_image"):
        value = node.get(name)
        if isinstance(value, dict):
            if value.get("type") in ("url", "file") or _remote(value.get("url")):
                return True
        elif name != "url" and _remote(value):
            return True
    return kind in ("image", "document", "input_image", "input_file") and _remote(node.get("url"))


def _remote(value: Any) -> bool:
    return isinstance(value, str) and value[:8].lower().startswith(("http://", "https://", "gs://", "s3://"))


def estimate(doc: Any, body_bytes: int, operation: str | None, price: Price | None,
             default_max_output: int = DEFAULT_MAX_OUTPUT_TOKENS, form_counts: tuple[str, ...] = ()) -> Estimate:
    """The tokens and the cost (at the route's price) one call may come to. A form body
    (``doc`` None) brings the values of its parts named like "n" in ``form_counts``."""
    ceiling = (price.max_output if price is not None else None) or default_max_output
    if operation in INPUT_ONLY:
        output = 0
    else:
        asked, times = _requested(doc) if isinstance(doc, dict) else (None, _times([_form_count(c)
                                                                                  for c in form_counts]))
        output = (asked if asked is not None else ceiling) * times
    if isinstance(doc, dict) and stored_context(doc):
        body_bytes = max(body_bytes, (price.max_input if price is not None else None) or DEFAULT_MAX_INPUT_TOKENS)
    tokens = body_bytes + output
    if price is None:
        return Estimate(tokens, None)
    # Input may be billed as a cache write (Anthropic's, above the input price).
    input_price = max(price.input, price.cache_write or 0.0)
    return Estimate(tokens, body_bytes * input_price + output * price.output)
