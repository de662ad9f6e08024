"""What a call may cost before it is made: the hold that a caller with a budget or a
token window places when it is admitted (usage/counters.py), settled against the usage
its response reports. Pure: the body as parsed, its size, the operation and the route's
price come in; tokens and USD come out.

An upper bound wherever the gateway can know one:

- input tokens: the body's size in bytes. Every tokenizer the providers use turns a
  token into at least one byte of text, and a message's framing tokens (role,
  separators) are fewer than its JSON's framing bytes, so a JSON body's length bounds
  its prompt's tokens. Images, audio and files are the exception: one given by URL
  costs the provider's tokens for it (hundreds to a few thousand), not its bytes; one
  sent inline (base64) costs far fewer tokens than bytes;
  A body that makes the provider read context it stores (the Responses API's
  ``previous_response_id``, ``conversation`` or a stored ``prompt``; Gemini's
  ``cachedContent``) holds the model's input window (``max_input`` in the price table,
  else DEFAULT_MAX_INPUT_TOKENS): what it bills is not in the body;
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
STORED_CONTEXT = ("previous_response_id", "conversation", "cachedContent", "cached_content")
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
    if lenient or not asked or None in asked:
        # another spelling a lenient reader takes, or a limit that does not read as one:
        # the provider is held to nothing the request says
        return None, _times(times)
    return max(asked), _times(times)


def stored_context(doc: Mapping[str, Any]) -> bool:
    """Whether the provider bills context the body only names (a stored response,
    conversation, prompt template or cache)."""
    return any(doc.get(n) not in (None, "") for n in STORED_CONTEXT) or isinstance(doc.get("prompt"), dict)


def estimate(doc: Any, body_bytes: int, operation: str | None, price: Price | None,
             default_max_output: int = DEFAULT_MAX_OUTPUT_TOKENS) -> Estimate:
    """The tokens and the cost (at the route's price) one call may come to."""
    ceiling = (price.max_output if price is not None else None) or default_max_output
    if operation in INPUT_ONLY:
        output = 0
    else:
        asked, times = _requested(doc) if isinstance(doc, dict) else (None, 1)
        output = (asked if asked is not None else ceiling) * times
    if isinstance(doc, dict) and stored_context(doc):
        body_bytes = max(body_bytes, (price.max_input if price is not None else None) or DEFAULT_MAX_INPUT_TOKENS)
    tokens = body_bytes + output
    if price is None:
        return Estimate(tokens, None)
    # Input may be billed as a cache write (Anthropic's, above the input price).
    input_price = max(price.input, price.cache_write or 0.0)
    return Estimate(tokens, body_bytes * input_price + output * price.output)
