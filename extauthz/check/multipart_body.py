"""Read the `model` field of a multipart/form-data body, refusing every body that could be read two ways.

The gateway checks the model read here, then forwards the body unchanged to the provider,
whose own parser (Python's email, Go's mime/multipart, python-multipart, busboy, ...) reads
it again. Multipart parsers disagree wherever the RFCs are loose or broken rules are
"tolerated": duplicate headers and parameters (first or last wins?), RFC 2231 `name*=`,
preambles, epilogues, bare-LF or padded boundary lines, transfer encodings, nested
multiparts, field names that differ only by case or percent-encoding. Each disagreement
lets a client show the gateway one model and the provider another. So this parser accepts
only the strict RFC 2046/7578 subset that every parser reads the same way (which is all that
SDKs, httpx, requests, curl and browsers send) and refuses everything else.

It is also fast: delimiters are found with bytes.find, and only the header blocks (at most
MAX_PARTS of MAX_PART_HEADER_BYTES each) and the model's value are copied into Python.
"""

from __future__ import annotations

import re
import unicodedata
from typing import NamedTuple
from urllib.parse import unquote_plus

from extauthz.check.facts import Problem

MAX_PARTS = 100  # a transcription form has about 10 parts
MAX_PART_HEADER_BYTES = 8192  # the header block of one part, its closing empty line included
_MAX_PART_HEADER_LINES = 16  # clients send 1 to 3; lines cost Python time where bytes cost C time


class FormModel(NamedTuple):
    model: str | None  # the value of the single part named "model"; None when there is none
    content_type: str  # the content type to forward: the one boundary, nothing a parser could read differently
    # What a hold reads (usage/estimate.py): the body's size, and the values of the parts
    # a lenient reader takes for "n" (how many images), as sent.
    size: int = 0
    counts: tuple[str, ...] = ()


NOT_FORM = Problem("invalid_request_body", "This endpoint takes a multipart/form-data body.")
DUPLICATE_MODEL = Problem("invalid_model", "The form names 'model' more than once.", param="model")
MODEL_NOT_UTF8 = Problem("invalid_model", "'model' must be UTF-8 text.", param="model")
TOO_MANY_PARTS = Problem("invalid_request_body", f"The multipart/form-data body has more than {MAX_PARTS} parts.")

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # RFC 9110 token
_TOKEN_RE = re.compile(_TOKEN)
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}")
# A parameter value without quotes: a token without ' or *, which Python's email reads as
# RFC 2231 even where there is no name*= (it reads name=x''model and name=model* as "model").
_BARE_VALUE = r"[!#$%&+\-.^_`|~0-9A-Za-z]+"
_BARE_VALUE_RE = re.compile(_BARE_VALUE)
# `; name=value` or `; name="text"`. The quoted text may hold no backslash (parsers disagree
# on escapes) and no ';' (a parser that splits on ';' before looking at quotes would read
# `filename="x; name=model"` as a second name).
_PARAMETER = re.compile(rf'[ \t]*;[ \t]*({_TOKEN})=(?:({_BARE_VALUE})|"([^"\\;]*)")')
_HEADER_LINE = re.compile(rf"({_TOKEN}):(.*)")
# Controls, and the other characters that str.splitlines() and friends take for line breaks.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# RFC 2046 bchars, without ',' (Envoy joins repeated headers with ','), no space first or last
# (Python's email strips a trailing one; a leading one invites the same), 1 to 70 characters.
_BCHAR = r"0-9A-Za-z'()+_\-./:=?"
_BOUNDARY = re.compile(rf"[{_BCHAR}](?:[{_BCHAR} ]{{0,68}}[{_BCHAR}])?")
_PLAIN_TRANSFER_ENCODINGS = frozenset({"7bit", "8bit", "binary"})
_MODEL_CHARSETS = frozenset({"utf-8", "us-ascii"})


class _Refused(Exception):
    def __init__(self, problem: Problem) -> None:
        self.problem = problem


def _malformed(reason: str) -> _Refused:
    return _Refused(Problem("invalid_request_body", f"The multipart/form-data body is malformed: {reason}."))


def _ambiguous(reason: str) -> _Refused:
    return _Refused(Problem("invalid_request_body", f"The multipart/form-data body is ambiguous: {reason}."))


def form_model(body: bytes, content_type: str) -> FormModel | Problem:
    """The model a multipart/form-data body names, or the Problem that refuses it; never raises."""
    try:
        boundary = _boundary(content_type)
        counts: list[str] = []
        model = _model_part(body, boundary, counts)
    except _Refused as refused:
        return refused.problem
    if _BARE_VALUE_RE.fullmatch(boundary) is None:  # quoted only when it must be
        boundary = f'"{boundary}"'
    return FormModel(model, f"multipart/form-data; boundary={boundary}", len(body), tuple(counts))


def _boundary(content_type: str) -> str:
    if not content_type.isascii() or _CONTROL.search(content_type):
        raise _Refused(NOT_FORM)
    value = content_type.strip(" \t")
    kind = _MEDIA_TYPE.match(value)
    if kind is None or kind.group().lower() != "multipart/form-data":
        raise _Refused(NOT_FORM)
    if "," in value:  # several Content-Type headers, joined by Envoy
        raise _Refused(_content_type_problem("holds a ',' (several Content-Type headers?)"))
    try:
        boundary = _parameters(value, kind.end()).get("boundary")
    except ValueError as error:
        raise _Refused(_content_type_problem(str(error))) from None
    if boundary is None or _BOUNDARY.fullmatch(boundary) is None:
        raise _Refused(_content_type_problem("needs one boundary of 1 to 70 letters, digits or '()+_-./:=? "
                                             "characters, not starting or ending with a space"))
    return boundary


def _content_type_problem(reason: str) -> Problem:
    return Problem("invalid_request_body",
                   f"This endpoint takes a multipart/form-data body; its Content-Type {reason}.")


def _parameters(value: str, at: int) -> dict[str, str]:
    """The `; a=1; b="2"` that follow value[:at], as {lower-case name: value}; ValueError says why not."""
    params: dict[str, str] = {}
    while at < len(value):
        found = _PARAMETER.match(value, at)
        if found is None:
            raise ValueError("has parameters outside the name=token or name=\"text\" form")
        name = found.group(1).lower()
        if "*" in name:  # RFC 2231 (name*=, name*0=): decoded by some parsers, ignored by others
            raise ValueError(f"has the RFC 2231 parameter {_shown(name)}")
        if name in params:  # which one wins differs from parser to parser
            raise ValueError(f"has two {_shown(name)} parameters")
        params[name] = found.group(2) if found.group(2) is not None else found.group(3)
        at = found.end()
    return params


def _parameterized(value: str, kind_pattern: re.Pattern[str], where: str) -> tuple[str, dict[str, str]]:
    """`kind; a=1; b="2"` as (lower-case kind, parameters), by the strict grammar only."""
    kind = kind_pattern.match(value)
    if kind is None:
        raise _malformed(f"{where} does not start with a type")
    try:
        return kind.group().lower(), _parameters(value, kind.end())
    except ValueError as error:
        raise _ambiguous(f"{where} {error}") from None


def _model_part(body: bytes, boundary: str, counts: list[str]) -> str | None:
    """Walk the parts; the UTF-8 value of the single part named "model", if any (and into
    ``counts``, the value of each part named like "n")."""
    dash_boundary = b"--" + boundary.encode("ascii")
    if not body.startswith(dash_boundary):
        raise _malformed("it does not start with the boundary (a preamble is not allowed)")
    model_span: tuple[int, int] | None = None
    parts = 0
    delimiter_at = 0  # where the current "--boundary" starts; every one must be a delimiter line
    while True:
        after = delimiter_at + len(dash_boundary)
        if len(body) - after < 2:
            raise _malformed("it ends without a closing boundary")
        if body.startswith(b"--", after):
            trailer = len(body) - (after + 2)
            if trailer and not (trailer == 2 and body.endswith(b"\r\n")):
                raise _ambiguous("data follows the closing boundary")
            if parts == 0:
                raise _malformed("it has no parts")
            break
        if not body.startswith(b"\r\n", after):
            raise _ambiguous(f"the boundary after part {parts} is followed by something other than CRLF or '--'"
                             if parts else "the first boundary is not followed by CRLF")
        parts += 1
        if parts > MAX_PARTS:
            raise _Refused(TOO_MANY_PARTS)
        part_start = after + 2
        delimiter_at = body.find(dash_boundary, part_start)
        if delimiter_at < 0:
            raise _malformed(f"part {parts} has no closing boundary")
        part_end = delimiter_at - 2  # the CRLF before "--boundary" belongs to the delimiter
        if part_end < part_start or not body.startswith(b"\r\n", part_end):
            # "--boundary" inside the data, or after a bare LF: some parsers see a boundary there
            raise _ambiguous(f"part {parts} holds the boundary string outside a delimiter line")
        data_span = _model_data(body, part_start, part_end, parts, counts)
        if data_span is not None:
            if model_span is not None:
                raise _Refused(DUPLICATE_MODEL)
            model_span = data_span
    if model_span is None:
        return None
    try:
        return body[model_span[0]:model_span[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused(MODEL_NOT_UTF8) from None


def _model_data(body: bytes, start: int, end: int, number: int, counts: list[str]) -> tuple[int, int] | None:
    """Check part `number` (body[start:end]); where its data is when it is the model part, else None."""
    headers, data_start = _headers(body, start, end, number)
    if "content-disposition" not in headers:
        raise _malformed(f"part {number} has no Content-Disposition header")
    disposition, params = _parameterized(headers["content-disposition"], _TOKEN_RE,
                                         f"part {number}'s Content-Disposition")
    if disposition != "form-data":
        raise _malformed(f"part {number} is not form-data")
    name = params.get("name")
    if name is None:
        raise _malformed(f"part {number} has no name")
    encoding = headers.get("content-transfer-encoding")
    if encoding is not None and encoding.lower() not in _PLAIN_TRANSFER_ENCODINGS:
        # Go's reader decodes quoted-printable, most others do not: the bytes would read two ways.
        raise _ambiguous(f"part {number} has a Content-Transfer-Encoding other than 7bit, 8bit or binary")
    media_type = headers.get("content-type", "").lower()
    if "multipart" in media_type or media_type.startswith("message/"):
        raise _ambiguous(f"part {number} nests another message, which some parsers read into")
    if name != "model":
        if "=?" in name:  # Python's email decodes RFC 2047 encoded-words, even in quotes
            raise _ambiguous(f"part {number} has a name with an RFC 2047 encoded-word")
        folded = _folded(name)
        if folded == "n":  # a count of outputs, as a lenient parser may read it: what a hold reads
            counts.append(body[data_start:min(end, data_start + 32)].decode("utf-8", "replace"))
        if folded == "model":
            raise _ambiguous(f"part {number} has a name that some parsers read as 'model'")
        if folded == "_charset_":  # HTML's convention: it changes how the other fields decode
            raise _ambiguous(f"part {number} is a _charset_ field")
        return None
    if "filename" in params:  # a file to some parsers, a field to others
        raise _ambiguous("the 'model' part has a filename")
    if "content-type" in headers:
        text, text_params = _parameterized(headers["content-type"], _MEDIA_TYPE, "the 'model' part's Content-Type")
        if (text != "text/plain" or text_params.keys() - {"charset"}
                or text_params.get("charset", "utf-8").lower() not in _MODEL_CHARSETS):
            raise _ambiguous("the 'model' part is not plain UTF-8 text")
    return data_start, end


def _headers(body: bytes, start: int, end: int, number: int) -> tuple[dict[str, str], int]:
    """The header block of the part in body[start:end], as {lower-case name: value}, and where its data starts."""
    if body.startswith(b"\r\n", start, end):
        raise _malformed(f"part {number} has no headers")
    block_end = body.find(b"\r\n\r\n", start, min(end, start + MAX_PART_HEADER_BYTES))
    if block_end < 0:
        if end - start >= MAX_PART_HEADER_BYTES:
            raise _Refused(Problem("invalid_request_body",
                                   f"The multipart/form-data body has a part ({number}) whose headers are longer "
                                   f"than {MAX_PART_HEADER_BYTES} bytes."))
        raise _malformed(f"part {number} has no empty line after its headers")
    if body.count(b"\r\n", start, block_end) >= _MAX_PART_HEADER_LINES:
        raise _Refused(Problem("invalid_request_body", f"The multipart/form-data body has a part ({number}) with "
                                                      f"more than {_MAX_PART_HEADER_LINES} header lines."))
    try:
        block = body[start:block_end].decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(f"part {number} has headers that are not UTF-8") from None
    headers: dict[str, str] = {}
    for line in block.split("\r\n"):
        if line[:1] in (" ", "\t"):  # obsolete folding: joined by some parsers, a new header to others
            raise _ambiguous(f"part {number} has a folded header line")
        if "\r" in line or "\n" in line:  # a line break to some parsers, not to others
            raise _ambiguous(f"part {number} has a bare CR or LF in its headers")
        found = _HEADER_LINE.fullmatch(line)
        if found is None or _CONTROL.search(found.group(2)):
            raise _malformed(f"part {number} has a header line that is not 'Name: value'")
        name = found.group(1).lower()
        if "_" in name:  # Content_Type is Content-Type to parsers that map '_' as CGI does
            raise _ambiguous(f"part {number} has a header name with '_'")
        if name in headers:  # first wins in some parsers, last in others
            raise _ambiguous(f"part {number} has two {_shown(name, title=True)} headers")
        headers[name] = found.group(2).strip(" \t")
    return headers, block_end + 4


def _folded(name: str) -> str:
    """`name` as a lenient parser might read it: percent-decoded, normalized, case-folded, trimmed, no [] suffix."""
    for _ in range(3):  # "%256D" is "%6D" is "m" to a parser that decodes twice
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    name = unicodedata.normalize("NFKC", name).casefold().strip()
    return name.split("[", 1)[0].strip()  # PHP and Rack read "model[]" as "model"


def _shown(name: str, title: bool = False) -> str:
    if len(name) > 40:
        return "long-named"
    return "-".join(word.capitalize() for word in name.split("-")) if title else f"'{name}'"
