"""Read the top-level "model" of a JSON request body, strictly, and where its bytes are.

The provider must read the model that was checked, and the gateway forwards the
client's bytes (only the model's value may be replaced, see ``splice.lua``). So a body
is accepted only when every reasonable JSON parser reads it the same way (I-JSON,
RFC 7493): no member named twice in one object at any depth (first-wins and last-wins
parsers would disagree), no top-level member that is ``model`` in another letter case
(case-insensitive parsers such as Go's would read it), no ``NaN``/``Infinity`` (not
JSON, nor a decimal that overflows to infinity such as ``1e999``), no unpaired surrogate
escape, UTF-8 only, and nesting at most ``MAX_DEPTH`` deep. Everything else passes
through untouched: big integers and long decimals reach the provider exactly as written
(a parser that cannot represent one refuses the body; none reads another model).

A body is validated by the standard library's C parser, with hooks for what it would
let through. Where the model's bytes are is found only when a rewrite needs them
(``model_span``): most requests name their model as the provider does.
"""

from __future__ import annotations

import json
import re
import unicodedata
from json.decoder import scanstring  # type: ignore[attr-defined]  # (json's own, not in the stubs)
from typing import Any, Callable, NamedTuple

from extauthz.check.facts import ModelSpan, Problem

MAX_DEPTH = 64  # well inside every common parser's own limit (serde_json: 128)
# Counting brackets is cheaper than walking the parsed containers for small bodies.
COUNT_BRACKETS_BELOW = 65536

NOT_JSON = Problem("invalid_request_body", "The request body must be a JSON object.")
NOT_UTF8 = Problem("invalid_request_body", "The request body must be UTF-8 encoded JSON.")
NON_FINITE = Problem("invalid_request_body", "The JSON body contains NaN or Infinity, which JSON does not allow.")
OUT_OF_RANGE = Problem("invalid_request_body", "The JSON body contains a number that overflows a double.")
LONE_SURROGATE = Problem("invalid_request_body",
                         "The JSON body contains an unpaired surrogate escape (\\ud800-\\udfff).")
TOO_DEEP = Problem("invalid_request_body", f"The JSON body nests deeper than {MAX_DEPTH} levels.")


def duplicate(name: str) -> Problem:
    return Problem("invalid_request_body",
                   f"The JSON body names member {name[:64]!r} twice in one object; parsers disagree on which counts.")


def model_variant(name: str) -> Problem:
    return Problem("invalid_model", f"The JSON body has a member {name[:64]!r} besides 'model'; some parsers "
                   "match member names without regard to case. Send 'model' only.", param="model")


ABSENT = object()  # a member the body does not have
STREAM_NAMES = ("stream", "stream_options")


class JsonModel(NamedTuple):
    """A body that every parser reads the same way, and the model it names."""

    model: Any       # the top-level "model" value, as parsed (None when absent)
    present: bool    # whether the body has a top-level "model" member
    body: bytes      # the body as checked: model_span() finds where its model is
    # What a streamed call's usage depends on (routing.usage_edit): the top-level "stream"
    # and "stream_options" values as parsed, and a member a case-insensitive reader would
    # take for either.
    stream: Any = ABSENT
    stream_options: Any = ABSENT
    stream_variant: str | None = None
    # Read from text (request.TextBody): a '!' in the model or in a top-level member's name
    # may stand for bytes that are not UTF-8, which a provider could read otherwise.
    bang: bool = False
    # The parsed body: what a call asks the provider for (max_tokens, n) bounds its hold
    # (usage/estimate.py), read only for callers with a budget or a tpm_limit.
    doc: Any = None


class _Refused(ValueError):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _Refused(duplicate(name))
            seen.add(name)
    return obj


def _constant(name: str) -> Any:
    raise _Refused(NON_FINITE)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused(OUT_OF_RANGE)
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant, parse_float=_float)
_scan_value = _DECODER.scan_once  # type: ignore[attr-defined]  # (the scanner json.loads uses)
_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Always a match (the pattern takes the empty string): typed so, without a check per call.
_skip: Callable[[str, int], re.Match[str]] = _WHITESPACE.match  # type: ignore[assignment]
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LOW_SURROGATE_ESCAPE = re.compile(r"\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def read_json_model(body: bytes, as_text: bool = False) -> JsonModel | Problem:
    """The body's top-level ``model``, or why the body is refused. ``as_text``: the proxy
    sent the body as text (JsonModel.bang)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return NOT_UTF8
    try:
        # The C scanner with hooks refusing duplicates, NaN and overflowing decimals.
        doc, end = _scan_value(text, _skip(text, 0).end())
    except _Refused as e:
        return e.problem
    except RecursionError:
        return TOO_DEEP
    except (ValueError, StopIteration):
        return NOT_JSON
    if type(doc) is not dict or _skip(text, end).end() != len(text):
        return NOT_JSON
    for name in doc:
        if len(name) != 5 and name.isascii() and "\0" not in name and name.strip() is name:
            continue  # most names: no lenient reader could take them for "model"
        if name != "model" and _reads_as_model(name):
            return model_variant(name)
    if not (len(text) < COUNT_BRACKETS_BELOW and text.count("[") + text.count("{") <= MAX_DEPTH) \
            and _deeper_than(list(doc.values()), MAX_DEPTH - 1):
        return TOO_DEEP
    if "\\" in text and _has_lone_surrogate(text):
        return LONE_SURROGATE
    variant = next((n for n in doc if len(n) in (6, 14) and n not in STREAM_NAMES and n.casefold() in STREAM_NAMES),
                   None)
    found = JsonModel(doc.get("model"), "model" in doc, body, doc.get("stream", ABSENT),
                      doc.get("stream_options", ABSENT), variant, False, doc)
    if as_text and "!" in text and (isinstance(found.model, str) and "!" in found.model or any("!" in n for n in doc)):
        return found._replace(bang=True)
    return found


def _reads_as_model(name: str) -> bool:
    """Whether a lenient reader could take member ``name`` for "model": Go matches names
    without regard to case, C readers stop at a NUL, some trim spaces or normalize."""
    if name.isascii():
        if len(name) < 5 or "\0" not in name and len(name.strip()) != 5:
            return False  # the common case, decided without building a string
        return name.split("\0", 1)[0].strip().casefold() == "model"
    folded = unicodedata.normalize("NFKC", name.split("\0", 1)[0]).casefold()
    return "".join(c for c in folded if not c.isspace() and unicodedata.category(c) != "Cf") == "model"


def model_span(checked: JsonModel) -> ModelSpan:
    """Where the bytes of the model's value are in a body ``read_json_model`` accepted; for
    a body without a model, the empty span just inside its opening brace."""
    body = checked.body
    text = body.decode("utf-8")
    i = _skip(text, 0).end() + 1  # past "{": the body is known to be one valid object
    if not checked.present:
        return ModelSpan(i, i, b"", len(body), members_after=text[_skip(text, i).end()] != "}")
    while True:  # member by member, to the one named "model" (it is there, and only once)
        i = _skip(text, i).end()
        name, i = scanstring(text, i + 1, True)
        i = _skip(text, _skip(text, i).end() + 1).end()  # past ":"
        _, end = _scan_value(text, i)
        if name == "model":
            break
        i = _skip(text, end).end() + 1  # past ","
    start = i
    if not text.isascii():  # the span is wanted in bytes, the parse counted characters
        start, end = len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))
    return ModelSpan(start, end, body[start:end], len(body))


class Member(NamedTuple):
    """A top-level member of a checked body, in byte offsets."""

    name: str
    start: int        # its name's opening quote
    value_end: int    # just past its value


def members(checked: JsonModel) -> list[Member]:
    """The top-level members of a body ``read_json_model`` accepted, in order."""
    body = checked.body
    text = body.decode("utf-8")
    if text.isascii():
        to_bytes: Callable[[int], int] = int
    else:  # character offsets to byte offsets, counting only what lies past the last one
        at, count = 0, 0

        def to_bytes(i: int) -> int:
            nonlocal at, count
            count += len(text[at:i].encode("utf-8"))
            at = i
            return count
    out = []
    i = _skip(text, _skip(text, 0).end() + 1).end()  # past "{"
    while text[i] != "}":
        start = i
        name, i = scanstring(text, i + 1, True)
        i = _skip(text, _skip(text, i).end() + 1).end()  # past ":"
        _, end = _scan_value(text, i)
        out.append(Member(name, to_bytes(start), to_bytes(end)))
        i = _skip(text, end).end()
        if text[i] == ",":
            i = _skip(text, i + 1).end()
    return out


def removal_span(found: list[Member], index: int) -> tuple[int, int]:
    """The bytes to delete to remove member ``index`` with one of its commas."""
    if index + 1 < len(found):
        return found[index].start, found[index + 1].start
    if index > 0:
        return found[index - 1].value_end, found[index].value_end
    return found[index].start, found[index].value_end


def _deeper_than(values: list[Any], limit: int) -> bool:
    """Whether containers among ``values`` nest more than ``limit`` levels (level by
    level: cheap for the many small containers of a long conversation)."""
    frontier = [v for v in values if type(v) is dict or type(v) is list]
    for _ in range(limit):
        if not frontier:
            return False
        frontier = [v for x in frontier for v in (x.values() if type(x) is dict else x)
                    if type(v) is dict or type(v) is list]
    return bool(frontier)


def _has_lone_surrogate(text: str) -> bool:
    """Whether a ``\\uD800``-``\\uDFFF`` escape lacks its other half. Python's parser keeps
    such a character; others refuse the body or replace it."""
    paired_until = 0
    for m in _SURROGATE_ESCAPE.finditer(text):
        start = m.start()
        if start < paired_until:
            continue  # the low half of a pair already seen
        backslashes = start
        while backslashes > 0 and text[backslashes - 1] == "\\":
            backslashes -= 1
        if (start - backslashes) % 2:
            continue  # "\\ud800": an escaped backslash, then plain text
        if text[start + 3] not in "89abAB":
            return True  # a low half with no high half before it
        if not _LOW_SURROGATE_ESCAPE.match(text, m.end()):
            return True
        paired_until = m.end() + 6
    return False
