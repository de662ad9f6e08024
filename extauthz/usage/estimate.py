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
- output tokens: what the request asks for (``max_completion_tokens``, ``max_tokens``,
  ``max_output_tokens``; Gemini's ``generationConfig.maxOutputTokens``, Bedrock
  Converse's ``inferenceConfig.maxTokens``), at most the model's ceiling; without one,
  the ceiling (the deployment's ``model_info.max_output_tokens``, else the bundled price
  table's, else ``default_max_output_tokens``), times ``n`` / ``best_of`` /
  ``candidateCount``. Embeddings, moderations and token counts write none.

A member a case-insensitive reader could take for one of these names (``MAX_TOKENS``)
voids what the request asks for: the ceiling is held instead.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

from extauthz.usage.prices import Price

# The ceiling of a model neither its deployment nor the table knows (LiteLLM's own
# fallback for its budget reservation).
DEFAULT_MAX_OUTPUT_TOKENS = 16384
OUTPUT_NAMES = ("max_completion_tokens", "max_tokens", "max_output_tokens")
MULTIPLIER_NAMES = ("n", "best_of")
INPUT_ONLY = frozenset({"embeddings", "moderations", "messages/count_tokens"})
_FOLDED = frozenset(OUTPUT_NAMES + MULTIPLIER_NAMES)


class Estimate(NamedTuple):
    tokens: int
    cost: float | None  # None: the route has no price


def _whole(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def _requested(doc: Mapping[str, Any]) -> tuple[int | None, int]:
    """The output tokens a body asks for (None: it names none it could be held to) and
    how many completions it asks for."""
    asked = [_whole(doc.get(n)) for n in OUTPUT_NAMES if n in doc]
    times = [doc.get(n) for n in MULTIPLIER_NAMES if n in doc]
    config = doc.get("generationConfig")
    if isinstance(config, dict):
        asked.append(_whole(config.get("maxOutputTokens")) if "maxOutputTokens" in config else None)
        times.append(config.get("candidateCount", 1))
    inference = doc.get("inferenceConfig")
    if isinstance(inference, dict) and "maxTokens" in inference:
        asked.append(_whole(inference.get("maxTokens")))
    if any(n.casefold() in _FOLDED and n not in _FOLDED for n in doc):
        return None, max((_whole(t) or 1 for t in times), default=1)  # a lenient reader's other value
    if not asked or None in asked:  # a limit that does not read as one holds the provider to nothing
        return None, max((_whole(t) or 1 for t in times), default=1)
    return max(asked), max((_whole(t) or 1 for t in times), default=1)


def estimate(doc: Any, body_bytes: int, operation: str | None, price: Price | None,
             default_max_output: int = DEFAULT_MAX_OUTPUT_TOKENS) -> Estimate:
    """The tokens and the cost (at the route's price) one call may come to."""
    ceiling = (price.max_output if price is not None else None) or default_max_output
    if operation in INPUT_ONLY:
        output = 0
    else:
        asked, times = _requested(doc) if isinstance(doc, dict) else (None, 1)
        output = (min(asked, ceiling) if asked is not None else ceiling) * times
    tokens = body_bytes + output
    if price is None:
        return Estimate(tokens, None)
    # Input may be billed as a cache write (Anthropic's, above the input price).
    input_price = max(price.input, price.cache_write or 0.0)
    return Estimate(tokens, body_bytes * input_price + output * price.output)
