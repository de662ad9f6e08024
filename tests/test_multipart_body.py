"""extauthz.check.multipart_body: what it accepts, what it refuses, and that other parsers agree with what it accepts."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extauthz.check.facts import Problem
from extauthz.check.multipart_body import (
    _MAX_PART_HEADER_LINES,
    MAX_PART_HEADER_BYTES,
    MAX_PARTS,
    FormModel,
    form_model,
)
from tests.form_readers import email_reading, python_multipart_reading
from tests.lanes import examples

BOUNDARY = "6435993f0447af850676c6e3d1e0f797"  # httpx: os.urandom(16).hex()
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"
AUDIO = b"RIFF\x24\x08\x00\x00WAVEfmt \x10\x00\r\n--\r\n\n--" + BOUNDARY[:-1].encode() + bytes(range(256)) + b"\r\n"


def part(headers: str | bytes, data: bytes) -> bytes:
    """One part, without its delimiter: header lines (CRLF-separated), the empty line, the data."""
    raw = headers.encode() if isinstance(headers, str) else headers
    return raw + b"\r\n\r\n" + data


def form(*parts: bytes, boundary: str = BOUNDARY, end: bytes = b"--\r\n") -> bytes:
    dash = b"--" + boundary.encode()
    return b"".join(dash + b"\r\n" + p + b"\r\n" for p in parts) + dash + end


def field(name: str, value: bytes, extra: str = "") -> bytes:
    return part(f'Content-Disposition: form-data; name="{name}"' + extra, value)


MODEL = field("model", b"whisper-1")
FILE = part('Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav', AUDIO)


# --- accepted ------------------------------------------------------------------------------------

def test_httpx_and_openai_sdk_body() -> None:
    # httpx (which the openai SDK uses): data fields first, then files, closing CRLF.
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="response_format"\r\n\r\njson\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            f'Content-Type: audio/wav\r\n\r\n').encode() + AUDIO + f"\r\n--{BOUNDARY}--\r\n".encode()
    assert form_model(body, CTYPE)[:2] == ("whisper-1", CTYPE)


def test_body_built_by_httpx_itself() -> None:
    request = httpx.Request("POST", "http://gateway/v1/images/edits", data={"prompt": "a cat", "model": "gpt-image-1"},
                            files={"image": ("cat.png", b"\x89PNG\r\n\x1a\n--" + bytes(200), "image/png")})
    result = form_model(request.read(), request.headers["content-type"])
    assert result[:2] == ("gpt-image-1", request.headers["content-type"])


def test_curl_body() -> None:
    boundary = "------------------------d74496d66958873e"
    body = form(FILE.replace(b"audio/wav", b"application/octet-stream"), MODEL, field("language", b"en"),
                boundary=boundary)
    assert form_model(body, f"multipart/form-data; boundary={boundary}") == \
        FormModel("whisper-1", f"multipart/form-data; boundary={boundary}", len(body))


def test_a_form_tells_its_size_and_counts_for_a_hold() -> None:
    body = form(MODEL, field("n", b"4"), field("N", b"8.0"))
    found = form_model(body, CTYPE)
    assert isinstance(found, FormModel) and found.size == len(body) and found.counts == ("4", "8.0")


def test_browser_body_with_utf8_filename_and_model() -> None:
    boundary = "----WebKitFormBoundary7MA4YWxkTrZu0gW"
    body = form(part('Content-Disposition: form-data; name="image"; filename="chat été.png"\r\n'
                     'Content-Type: image/png', b"\x89PNG\r\n"), field("model", "modèle-ü".encode()),
                boundary=boundary)
    assert form_model(body, f"multipart/form-data; boundary={boundary}").model == "modèle-ü"


def test_no_model_part() -> None:
    assert form_model(form(FILE, field("language", b"en")), CTYPE)[:2] == (None, CTYPE)


def test_binary_data_with_line_breaks_and_dashes() -> None:
    data = b"\r\n--\r\n--" + BOUNDARY[:-1].encode() + b"\r\n\r\n-- " + BOUNDARY.encode()[::-1] + bytes(range(256)) * 64
    assert form_model(form(part('Content-Disposition: form-data; name="file"; filename="x"', data), MODEL),
                      CTYPE).model == "whisper-1"


@pytest.mark.parametrize("content_type,canonical", [
    ('multipart/form-data; boundary="abc"', "multipart/form-data; boundary=abc"),
    ("Multipart/Form-Data;BOUNDARY=abc", "multipart/form-data; boundary=abc"),
    ("multipart/form-data ; charset=utf-8;\tboundary=abc ", "multipart/form-data; boundary=abc"),
    ('multipart/form-data; boundary="a b:c=d?"', 'multipart/form-data; boundary="a b:c=d?"'),
    # Quoted when forwarded: Python's email reads a bare a'b as RFC 2231.
    ('multipart/form-data; boundary="a\'b"', 'multipart/form-data; boundary="a\'b"'),
    ("multipart/form-data; boundary=" + "x" * 70, "multipart/form-data; boundary=" + "x" * 70),
])
def test_boundary_forms(content_type: str, canonical: str) -> None:
    boundary = canonical.split("boundary=")[1].strip('"')
    assert form_model(form(MODEL, boundary=boundary), content_type)[:2] == ("whisper-1", canonical)


@pytest.mark.parametrize("end", [b"--", b"--\r\n"])
def test_close_with_or_without_crlf(end: bytes) -> None:
    assert form_model(form(MODEL, end=end), CTYPE).model == "whisper-1"


@pytest.mark.parametrize("extra", [
    "\r\nContent-Type: text/plain", "\r\nContent-Type: text/plain; charset=UTF-8",
    '\r\ncontent-type: TEXT/PLAIN; charset="us-ascii"', "\r\nContent-Transfer-Encoding: 8bit",
    "\r\nContent-Transfer-Encoding: BINARY", "\r\nX-Whatever: yes",
])
def test_model_part_plain_headers(extra: str) -> None:
    assert form_model(form(field("model", b"gpt-4o-transcribe", extra)), CTYPE).model == "gpt-4o-transcribe"


def test_model_value_is_returned_as_sent() -> None:
    # The caller checks length and printability; the parser returns the exact text.
    assert form_model(form(field("model", b"")), CTYPE).model == ""
    assert form_model(form(field("model", b" a\r\nb ")), CTYPE).model == " a\r\nb "


def test_limits_are_inclusive() -> None:
    assert form_model(form(*[field(f"f{i}", b"") for i in range(MAX_PARTS - 1)], MODEL), CTYPE).model == "whisper-1"
    header = 'Content-Disposition: form-data; name="model"\r\nX-Pad: '
    header += "p" * (MAX_PART_HEADER_BYTES - 4 - len(header))  # + the CRLF CRLF that ends the block
    assert form_model(form(part(header, b"m")), CTYPE).model == "m"
    refused(form_model(form(part(header + "p", b"m")), CTYPE), str(MAX_PART_HEADER_BYTES))
    lines = ['Content-Disposition: form-data; name="model"'] + [f"X-{i}: y" for i in range(_MAX_PART_HEADER_LINES - 1)]
    assert form_model(form(part("\r\n".join(lines), b"m")), CTYPE).model == "m"


# --- refused ---------------------------------------------------------------------------------------

def refused(result: FormModel | Problem, *words: str, code: str = "invalid_request_body") -> Problem:
    assert isinstance(result, Problem), result
    assert result.code == code and result.status == 400, result
    for word in words:
        assert word in result.message, result
    return result


@pytest.mark.parametrize("content_type", [
    "", "application/json", "multipart/mixed; boundary=abc", "multipart/form-data", "multipart/form-data;",
    "multipart/form-data; boundary=", 'multipart/form-data; boundary=""',
    "multipart/form-data; boundary=abc; boundary=abc",  # duplicate, even when equal
    "multipart/form-data; boundary=abc; BOUNDARY=def",
    "multipart/form-data; boundary*=utf-8''abc", "multipart/form-data; boundary=abc; boundary*=utf-8''def",
    "multipart/form-data; boundary=abc, multipart/form-data; boundary=def",  # two headers joined by Envoy
    'multipart/form-data; boundary="ab,c"', "multipart/form-data; boundary=" + "x" * 71,
    'multipart/form-data; boundary="abc "', 'multipart/form-data; boundary=" abc"',
    'multipart/form-data; boundary="a\\bc"', 'multipart/form-data; boundary="a;b"', "multipart/form-data; boundary=a;",
    "multipart/form-data; boundary = abc", "multipart/form-data boundary=abc", 'multipart/form-data; boundary="abc',
    "multipart/form-data; boundary=abc; charset=utf-8; charset=utf-8", "multipart/form-data; boundary=a\x00bc",
    "multipart/form-data; boundary=abc\u00e9", "multipart/form-data; boundary=abc\u4e2d",  # not latin-1
    "multipart/form-data; boundary=ab\u2028c",
    "multipart/form-data; boundary=a''abc", "multipart/form-data; boundary=abc*",  # email: boundary "abc"
])
def test_refused_content_types(content_type: str) -> None:
    refused(form_model(form(MODEL, boundary="abc"), content_type), "multipart/form-data")


@pytest.mark.parametrize("body,words", [
    pytest.param(form(part('Content-Disposition: form-data; name="file"\r\n'
                           'Content-Disposition: form-data; name="model"', b"gpt-4o")),
                 ["ambiguous", "part 1 has two Content-Disposition headers"], id="duplicate Content-Disposition"),
    pytest.param(form(MODEL, part('Content-Disposition: form-data; name="x"\r\ncontent-disposition: form-data; '
                                  'name="y"', b"")), ["part 2 has two"], id="duplicate header, other case"),
    pytest.param(form(part('Content-Disposition: form-data; name="file"; name="model"', b"gpt-4o")),
                 ["two 'name' parameters"], id="duplicate name="),
    pytest.param(form(part('Content-Disposition: form-data; NAME="file"; name="model"', b"gpt-4o")),
                 ["two 'name' parameters"], id="duplicate name= in another case"),
    pytest.param(form(part("Content-Disposition: form-data; name=\"file\"; name*=utf-8''model", b"gpt-4o")),
                 ["RFC 2231", "name*"], id="name*="),
    pytest.param(form(part('Content-Disposition: form-data; name*0="mo"; name*1="del"', b"gpt-4o")),
                 ["RFC 2231"], id="name*0= continuation"),
    pytest.param(form(MODEL, part("Content-Disposition: form-data; name=\"file\"; filename*=utf-8''a.wav", b"x")),
                 ["RFC 2231", "filename*"], id="filename*="),
    pytest.param(form(part("Content-Disposition: form-data; name=a''model", b"gpt-4o")), ["parameters"],
                 id="bare value with ' (email reads 'model')"),
    pytest.param(form(part("Content-Disposition: form-data; name=model*", b"gpt-4o")), ["parameters"],
                 id="bare value with * (email reads 'model')"),
    pytest.param(form(part('Content-Disposition: form-data; name="mo\\"del"', b"x")), ["parameters"],
                 id="backslash in quoted-string"),
    pytest.param(form(part('Content-Disposition: form-data; name="file"; filename="a; name=model"', b"x")),
                 ["parameters"], id="semicolon in quoted-string"),
    pytest.param(form(part('Content-Disposition: form-data; name = "model"', b"x")), ["parameters"],
                 id="spaces around ="),
    pytest.param(form(part('Content-Disposition: form-data; name="model";', b"x")), ["parameters"],
                 id="trailing semicolon"),
    pytest.param(b"preamble\r\n" + form(MODEL), ["preamble"], id="preamble"),
    pytest.param(b"\r\n" + form(MODEL), ["preamble"], id="leading CRLF"),
    pytest.param(form(MODEL) + b"epilogue", ["follows the closing"], id="epilogue"),
    pytest.param(form(MODEL) + b"\r\n", ["follows the closing"], id="two CRLFs after close"),
    pytest.param(form(MODEL) + form(field("model", b"gpt-4o")), ["follows the closing"], id="part after close"),
    pytest.param(form(MODEL, end=b""), ["closing"], id="missing close"),
    pytest.param(form(MODEL)[:-(len(BOUNDARY) + 6)], ["closing"], id="truncated"),
    pytest.param(f"--{BOUNDARY}\r\n".encode() + MODEL + f"\n--{BOUNDARY}--\r\n".encode(),
                 ["part 1", "boundary"], id="bare LF before the close"),
    pytest.param(form(field("file", b"x\n--" + BOUNDARY.encode() + b"\r\n" + field("model", b"gpt-4o")), MODEL),
                 ["part 1", "boundary"], id="bare-LF delimiter"),
    pytest.param(form(field("file", b"x\r\n--" + BOUNDARY.encode() + b"X\r\nmore"), MODEL),
                 ["after part 1", "followed"], id="boundary prefix of a longer line"),
    pytest.param(form(field("file", b"x\r\n--" + BOUNDARY.encode() + b" \r\n" + field("model", b"gpt-4o")), MODEL),
                 ["after part 1", "followed"], id="transport padding"),
    pytest.param(form(field("file", b"inline --" + BOUNDARY.encode() + b" inside"), MODEL),
                 ["part 1", "boundary"], id="boundary inside data"),
    pytest.param(form(field("model", b"d2hpc3Blci0x", "\r\nContent-Transfer-Encoding: base64")),
                 ["Content-Transfer-Encoding"], id="base64"),
    pytest.param(form(field("model", b"gpt=2D4o", "\r\nContent-Transfer-Encoding: quoted-printable")),
                 ["Content-Transfer-Encoding"], id="quoted-printable"),
    pytest.param(form(FILE.replace(b"audio/wav", b"audio/wav\r\nContent-Transfer-Encoding: base64"), MODEL),
                 ["part 1", "Content-Transfer-Encoding"], id="base64 on another part"),
    pytest.param(form(MODEL, field("Model", b"gpt-4o")), ["part 2", "'model'"], id="Model"),
    pytest.param(form(MODEL, field("MODEL", b"gpt-4o")), ["'model'"], id="MODEL"),
    pytest.param(form(MODEL, field("%6Dodel", b"gpt-4o")), ["'model'"], id="percent-encoded"),
    pytest.param(form(MODEL, field("%256Dodel", b"gpt-4o")), ["'model'"], id="double percent-encoded"),
    pytest.param(form(MODEL, field("model[]", b"gpt-4o")), ["'model'"], id="model[]"),
    pytest.param(form(MODEL, field(" model", b"gpt-4o")), ["'model'"], id="spaces"),
    pytest.param(form(MODEL, field("\uff4d\uff4f\uff44\uff45\uff4c", b"gpt-4o")), ["'model'"], id="fullwidth"),
    pytest.param(form(field("=?utf-8?q?model?=", b"gpt-4o")), ["RFC 2047"], id="RFC 2047 encoded-word"),
    pytest.param(form(field("_charset_", b"utf-16"), MODEL), ["_charset_"], id="_charset_"),
    pytest.param(form(part('Content-Disposition: form-data; name="x"\r\nContent-Type: multipart/mixed; boundary=z',
                           b"--z\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o\r\n--z--"), MODEL),
                 ["part 1", "nests"], id="multipart/mixed part"),
    pytest.param(form(part('Content-Disposition: form-data; name="x"\r\nContent-Type: message/rfc822', b"")),
                 ["nests"], id="message/rfc822 part"),
    pytest.param(form(part('Content-Disposition: form-data; name="model"; filename="m.txt"', b"gpt-4o")),
                 ["filename"], id="model part with filename"),
    pytest.param(form(field("model", "gpt-4o".encode("utf-16"), "\r\nContent-Type: text/plain; charset=utf-16")),
                 ["'model' part"], id="model part charset utf-16"),
    pytest.param(form(field("model", b"gpt-4o", "\r\nContent-Type: application/json")), ["'model' part"],
                 id="model part not text/plain"),
    pytest.param(form(field("model", b"gpt-4o", "\r\nContent-Type: text/plain; format=flowed")), ["'model' part"],
                 id="model part with other parameter"),
    pytest.param(form(part('Content-Disposition: form-data;\r\n name="model"', b"gpt-4o")), ["folded"],
                 id="folded header line"),
    pytest.param(form(part('Content-Disposition: form-data; name="x"\nContent-Disposition: form-data; name="model"',
                           b"gpt-4o")), ["bare CR or LF"], id="bare LF in headers"),
    pytest.param(form(part('Content-Disposition: form-data; name="model"\rX-A: b', b"gpt-4o")), ["bare CR or LF"],
                 id="bare CR in headers"),
    pytest.param(form(part('Content-Disposition : form-data; name="model"', b"x")), ["Name: value"],
                 id="space before colon"),
    pytest.param(form(part('Content-Disposition: form-data; name="model"\r\nno colon here', b"x")),
                 ["Name: value"], id="line without colon"),
    pytest.param(form(part('Content-Disposition: form-data; name="model"\r\nX-A: a\x00b', b"x")), ["Name: value"],
                 id="NUL in a header value"),
    pytest.param(form(part(b'Content-Disposition: form-data; name="f"; filename="\xff.wav"', b"x")), ["UTF-8"],
                 id="headers not UTF-8"),
    pytest.param(form(part("X-Other: 1", b"x")), ["no Content-Disposition"], id="no Content-Disposition"),
    pytest.param(form(b"\r\nwhisper-1"), ["no headers"], id="no headers at all"),
    pytest.param(form(part('Content-Disposition: attachment; name="model"', b"x")), ["not form-data"],
                 id="not form-data"),
    pytest.param(form(part('Content-Disposition: form-data; filename="a.wav"', b"x")), ["no name"], id="no name"),
    pytest.param(form(b'Content-Disposition: form-data; name="model"\r\nwhisper-1'), ["empty line"],
                 id="no empty line after headers"),
    pytest.param(form(part("Content-Disposition: form-data; name=x\r\nX-Pad: " + "p" * MAX_PART_HEADER_BYTES, b"")),
                 [str(MAX_PART_HEADER_BYTES)], id="header block too big"),
    pytest.param(form(part("\r\n".join(['Content-Disposition: form-data; name="model"']
                                        + [f"X-{i}: y" for i in range(_MAX_PART_HEADER_LINES)]), b"m")),
                 [f"more than {_MAX_PART_HEADER_LINES} header lines"], id="too many header lines"),
    pytest.param(form(part('Content_Transfer_Encoding: base64\r\nContent-Disposition: form-data; name="model"',
                           b"d2hpc3Blci0x")), ["'_'"], id="header name with underscore"),
    pytest.param(form(*[field(f"f{i}", b"") for i in range(MAX_PARTS)], MODEL), [str(MAX_PARTS)],
                 id="too many parts"),
    pytest.param(f"--{BOUNDARY}--\r\n".encode(), ["no parts"], id="no parts"),
    pytest.param(b"", ["boundary"], id="empty body"),
    pytest.param(f"--{BOUNDARY}\r\n\r\n--{BOUNDARY}--".encode(), ["part 1"], id="empty part"),
    pytest.param(f"--{BOUNDARY}\r\n--{BOUNDARY}--".encode(), ["part 1"], id="part without even a CRLF"),
    pytest.param(f"--{BOUNDARY}--x".encode(), ["follows the closing"], id="junk after an immediate close"),
    pytest.param(f"--{BOUNDARY} \r\n".encode() + MODEL + f"\r\n--{BOUNDARY}--".encode(), ["first boundary"],
                 id="padding after the first boundary"),
    pytest.param(b"\x00\xff\r\n--" * 40, ["preamble"], id="random garbage"),
])
def test_refused_bodies(body: bytes, words: list[str]) -> None:
    refused(form_model(body, CTYPE), *words)


@pytest.mark.parametrize("boundary", ["abc ", " abc"])
def test_boundary_with_space_at_an_end(boundary: str) -> None:
    # Python's email strips a trailing space from the boundary; it would look for other delimiters.
    refused(form_model(form(MODEL, boundary=boundary), f'multipart/form-data; boundary="{boundary}"'), "boundary")


def test_joined_content_types() -> None:
    refused(form_model(form(MODEL), f"{CTYPE}, multipart/form-data; boundary=other"), "','")


def test_two_model_parts() -> None:
    problem = refused(form_model(form(MODEL, FILE, field("model", b"gpt-4o")), CTYPE), code="invalid_model")
    assert problem == Problem("invalid_model", "The form names 'model' more than once.", param="model")


def test_model_value_not_utf8() -> None:
    assert refused(form_model(form(field("model", b"whisper\xff")), CTYPE), code="invalid_model").param == "model"


def test_too_many_parts_stops_early() -> None:
    # 80,000 empty parts: refused at the limit, after reading about MAX_PARTS headers, not 80,000.
    empty = field("f", b"")
    body = form(*[empty] * 80_000)
    assert form_model(body, CTYPE) == Problem(
        "invalid_request_body", f"The multipart/form-data body has more than {MAX_PARTS} parts.")
    refused(form_model(f"--{BOUNDARY}\r\n\r\n\r\n".encode() * 80_000 + f"--{BOUNDARY}--".encode(), CTYPE))


# --- never raises ----------------------------------------------------------------------------------

@settings(max_examples=examples(500), deadline=None, database=None)
@given(body=st.binary(max_size=300), content_type=st.text(max_size=60))
def test_random_input_never_raises(body: bytes, content_type: str) -> None:
    assert isinstance(form_model(body, content_type), (FormModel, Problem))


@settings(max_examples=examples(300), deadline=None, database=None)
@given(content_type=st.text(max_size=80).map(lambda t: "multipart/form-data; boundary=" + t))
def test_random_boundaries_never_raise(content_type: str) -> None:
    assert isinstance(form_model(form(MODEL, boundary="x"), content_type), (FormModel, Problem))


# --- differential: whatever form_model accepts, other parsers read the same way ----------------------

def assert_parsers_agree(content_type: str, body: bytes) -> FormModel | Problem:
    result = form_model(body, content_type)
    if isinstance(result, Problem):
        return result
    # Every "--boundary" in an accepted body is a delimiter: one more than there are parts.
    parts = body.count(b"--" + result.content_type.split("boundary=")[1].strip('"').encode()) - 1
    ours = [] if result.model is None else [result.model.encode()]
    for forwarded in {content_type, result.content_type}:
        assert email_reading(forwarded, body) == (parts, ours)
        assert python_multipart_reading(forwarded, body) == (parts, ours)
    return result


# Adversarial material: names, parameters, headers and data that some parser reads differently.
NAMES = ["file", "Model", "MODEL", "%6Dodel", " model", "model ", "model[]", "_charset_", "=?utf-8?q?model?=",
         "mod\u0435l", "\uff4d\uff4f\uff44\uff45\uff4c", "x;name=model", 'mo\\"del', "\\model", "naïve",
         "a''model", "utf-8''model", "model*", "mo*del"]
DISPOSITIONS = [  # {n} is the part's name
    'form-data; name="{n}"', "form-data; name={n}", 'FORM-DATA; NAME="{n}"', 'form-data;name="{n}"',
    'form-data ; name="{n}" ', 'form-data; name="{n}"; filename="a.wav"', 'form-data; filename="é.wav"; name="{n}"',
    'form-data; name="{n}"; name="model"', 'form-data; name="model"; name="{n}"', "form-data; name*=utf-8''{n}",
    "form-data; name=\"{n}\"; name*=utf-8''model", "form-data; name=\"{n}\"; filename*=utf-8''a.wav",
    'form-data; name*0="mo"; name*1="del"', 'form-data; name="{n}"; filename="a; name=model"',
    'attachment; name="{n}"', 'form-data; name = "{n}"', 'form-data; name="{n}";', 'form-data name="{n}"',
    'form-data; name="{n}"x', "form-data", 'form-data; name="{n}"; size=3', "form-data; name=\"{n}\"; a='b'",
    "form-data; name=a''{n}", "form-data; name={n}*",
]
DISPOSITION_NAMES = ["Content-Disposition", "content-disposition", "CONTENT-DISPOSITION", "Content-Disposition ",
                     "Content_Disposition"]
COLONS = [": ", ":", ":\t", ":  "]
EXTRA_HEADERS = [
    "Content-Type: text/plain", "Content-Type: text/plain; charset=utf-8", "Content-Type: text/plain; charset=UTF-16",
    "Content-Type: audio/wav", "Content-Type: application/octet-stream", "Content-Type: multipart/mixed; boundary=z",
    "Content-Type: message/rfc822", "Content-Transfer-Encoding: binary", "Content-Transfer-Encoding: 8BIT",
    "Content-Transfer-Encoding: base64", "Content-Transfer-Encoding: quoted-printable",
    'Content-Disposition: form-data; name="model"', 'Content-Disposition: form-data; name="other"', "X-Extra: 1",
    "X-Folded: a\r\n b", ' name="model"', "\tname=model", "Bad Header: x", "NoColon", "X-Empty:", "x-extra: 2",
    'X-A: b\rContent-Disposition: form-data; name="model"', 'X-A: b\nContent-Disposition: form-data; name="model"',
]
MODELS = [b"whisper-1", b"gpt-4o-transcribe", b"forbidden-model", b"", b"dall-e-2\r\n", b"a\rb", b"\xff", b"--",
          b"gpt=2D4o", b"Z3B0LTRv", "modèle".encode(), "gpt-4o".encode("utf-16")]
BOUNDARIES = [BOUNDARY, "----WebKitFormBoundary7MA4YWxkTrZu0gW", "------------------------d74496d66958873e", "a",
              "a b", "x--", "--", "=?", "a'b", "a''b"]
BCHARS = string.ascii_letters + string.digits + "'()+_-./:=? "


@dataclass
class Part:
    headers: list[str]
    data: bytes
    line_break: bytes = b"\r\n"  # between header lines
    opening: bytes = b"\r\n"  # after the "--boundary" before it
    ending: bytes = b"\r\n"  # before the "--boundary" after it


@dataclass
class Form:
    content_type: str
    boundary: str
    parts: list[Part]
    preamble: bytes = b""
    close: bytes = b"--"
    epilogue: bytes = b"\r\n"

    @property
    def dash(self) -> bytes:
        return b"--" + self.boundary.encode()

    def body(self) -> bytes:
        parts = (self.dash + p.opening + p.line_break.join(h.encode() for h in p.headers) + p.line_break + b"\r\n"
                 + p.data + p.ending for p in self.parts)
        return self.preamble + b"".join(parts) + self.dash + self.close + self.epilogue

    def smuggled(self) -> bytes:
        return self.dash + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nforbidden\r\n' + self.dash + b"--"


def quoted_if_needed(boundary: str) -> str:
    return boundary if boundary.isascii() and all(c.isalnum() or c in "+_-." for c in boundary) else f'"{boundary}"'


@st.composite
def clean_forms(draw: st.DrawFn) -> tuple[Form, bytes | None]:
    """A form as clients send it, with only variations that must be accepted; and the model it names."""
    # Mostly the usual choice: with few variations per form, each one gets tried on an otherwise usual form.
    odds = draw(st.sampled_from([2, 6, 20]))

    def pick(usual: Any, variations: list[Any]) -> Any:
        return usual if draw(st.integers(0, odds)) else draw(st.sampled_from(variations))

    boundary = pick(BOUNDARY, BOUNDARIES)
    content_type = (pick("multipart/form-data", ["Multipart/Form-Data", "multipart/form-data "])
                    + pick("; ", [";", " ; ", ";\t"]) + pick("boundary", ["BOUNDARY", "Boundary"]) + "="
                    + pick(quoted_if_needed(boundary), [f'"{boundary}"'])
                    + pick("", ["; charset=utf-8", '; charset="utf-8"']))
    model: bytes | None = None
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        name = pick("model", ["file", "language", "prompt", "naïve"])
        if name == "model" and model is not None:
            name = "prompt"  # one model part at most
        usual_dispositions = DISPOSITIONS[2:5] + ([] if name == "model" else DISPOSITIONS[5:7])
        if name.isalnum() and name.isascii():  # a token: it may go unquoted
            usual_dispositions.append(DISPOSITIONS[1])
        headers = [pick("Content-Disposition", DISPOSITION_NAMES[:3]) + pick(": ", COLONS)
                   + pick(DISPOSITIONS[0], usual_dispositions).replace("{n}", name)]
        if name == "model":
            model = data = pick(b"whisper-1", MODELS[:4] + ["modèle".encode()])
            extra = EXTRA_HEADERS[:2]
        else:
            noise = draw(st.binary(max_size=40).filter(lambda b: b"--" + boundary.encode() not in b))
            data = pick(AUDIO, [b"", b"en", noise])
            extra = EXTRA_HEADERS[3:5]
        for header in draw(st.lists(st.sampled_from(extra + EXTRA_HEADERS[7:9] + ["X-Extra: 1", "X-Empty:"]),
                                    max_size=2, unique_by=lambda h: h.split(":")[0].lower())):
            headers.insert(draw(st.integers(0, len(headers))), header)
        parts.append(Part(headers, data))
    return Form(content_type, boundary, parts, epilogue=pick(b"\r\n", [b""])), model


# Each attack changes one thing in a form, in place.
def add_header(draw: st.DrawFn, form: Form) -> None:
    part = draw(st.sampled_from(form.parts))
    part.headers.insert(draw(st.integers(0, len(part.headers))), draw(st.sampled_from(EXTRA_HEADERS)))


def change_disposition(draw: st.DrawFn, form: Form) -> None:
    part = draw(st.sampled_from(form.parts))
    at = draw(st.integers(0, len(part.headers) - 1))
    disposition = draw(st.sampled_from(DISPOSITIONS)).replace("{n}", draw(st.sampled_from(["model", *NAMES])))
    part.headers[at] = draw(st.sampled_from(DISPOSITION_NAMES)) + draw(st.sampled_from(COLONS)) + disposition


def change_data(draw: st.DrawFn, form: Form) -> None:
    dash = form.dash
    data = [*MODELS, b"x\n" + form.smuggled(), b"x\r\n" + dash + b"y", b"x" + dash, b"\r\n" + dash + b" \r\n",
            b"\r\n" + dash + b"--"]
    draw(st.sampled_from(form.parts)).data = draw(st.sampled_from(data))


def change_line_breaks(draw: st.DrawFn, form: Form) -> None:
    part = draw(st.sampled_from(form.parts))
    breaks = [b"\n", b"\r", b"", b" \r\n", b"\t\r\n", b"X\r\n", b"\r\n\r\n", b"\n\r\n"]
    setattr(part, draw(st.sampled_from(["line_break", "opening", "ending"])), draw(st.sampled_from(breaks)))


def change_framing(draw: st.DrawFn, form: Form) -> None:
    place, value = draw(st.sampled_from([
        ("preamble", b"\r\n"), ("preamble", b"preamble\r\n"), ("preamble", b" "), ("preamble", form.smuggled()[:-2]),
        ("close", b"-- "), ("close", b"---"), ("close", b""), ("close", b"\r\n"),
        ("epilogue", b"\r\n\r\n"), ("epilogue", b"\r\nepilogue"), ("epilogue", b"x"),
        ("epilogue", b"\r\n" + form.smuggled())]))
    setattr(form, place, value)


def change_content_type(draw: st.DrawFn, form: Form) -> None:
    value, other = quoted_if_needed(form.boundary), quoted_if_needed(form.boundary + "x")
    form.content_type = draw(st.sampled_from([
        f"multipart/form-data; boundary={value}; boundary={other}",
        f"multipart/form-data; boundary={other}; boundary={value}",
        f"multipart/form-data; boundary={value}, multipart/form-data; boundary={other}",
        f"multipart/form-data; boundary={value}; boundary*=utf-8''{other}", f"multipart/form-data; boundary*={value}",
        f"multipart/form-data; boundary={value};", f"multipart/form-data; boundary={value}; charset",
        f"multipart/mixed; boundary={value}", f'multipart/form-data; boundary="{form.boundary} "',
        f"multipart/form-data; boundary={value}; charset=utf-8; charset=utf-8",
        f"multipart/form-data; boundary=x''{value}", f"multipart/form-data; boundary={value}*"]))


def change_boundary(draw: st.DrawFn, form: Form) -> None:
    form.boundary = draw(st.text(BCHARS + ",", min_size=1, max_size=72))
    form.content_type = f'multipart/form-data; boundary="{form.boundary}"'


def nest(draw: st.DrawFn, form: Form) -> None:
    part = draw(st.sampled_from(form.parts))
    inner = b'--z\r\nContent-Disposition: form-data; name="model"\r\n\r\nforbidden\r\n--z--'
    kind = draw(st.sampled_from(["multipart/mixed; boundary=z", "multipart/form-data; boundary=z", "message/rfc822"]))
    part.headers = [h for h in part.headers if not h.lower().startswith("content-type")] + ["Content-Type: " + kind]
    part.data = b"Content-Type: multipart/mixed; boundary=z\r\n\r\n" + inner if kind == "message/rfc822" else inner


def encode(draw: st.DrawFn, form: Form) -> None:
    part = draw(st.sampled_from(form.parts))
    encoding, data = draw(st.sampled_from([("base64", b"Z3B0LTRv"), ("quoted-printable", b"gpt=2D4o")]))
    part.headers.append("Content-Transfer-Encoding: " + encoding)
    part.data = data  # "gpt-4o", once decoded


ATTACKS = [add_header, change_disposition, change_data, change_line_breaks, change_framing, change_content_type,
           change_boundary, nest, encode]


@st.composite
def attacked_forms(draw: st.DrawFn) -> Form:
    form, _ = draw(clean_forms())
    for attack in draw(st.lists(st.sampled_from(ATTACKS), min_size=1, max_size=3)):
        attack(draw, form)
    return form


@settings(max_examples=examples(300), deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(clean_forms())
def test_what_clients_send_is_accepted_and_read_alike(case: tuple[Form, bytes | None]) -> None:
    form, model = case
    result = assert_parsers_agree(form.content_type, form.body())
    assert isinstance(result, FormModel), result
    assert result.model == (None if model is None else model.decode())


@settings(max_examples=examples(1500), deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(attacked_forms())
def test_attacked_forms_are_refused_or_read_alike(form: Form) -> None:
    assert_parsers_agree(form.content_type, form.body())


SPLICES = [b"\r\n", b"\n", b"\r", b"--", b'"', b";", b"; name=model", b'; name="model"', b"*", b" ", b"\t", b"=?",
           b"model", b"Model", b"\x00", b"\xff", b"%6D", b"\\", b":", b"\r\n\r\n", b"form-data",
           b'\r\nContent-Disposition: form-data; name="model"', b"\r\nContent-Transfer-Encoding: quoted-printable",
           b"\r\n --", b"=2D"]


@settings(max_examples=examples(1000), deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=clean_forms(), data=st.data())
def test_mutated_forms_are_refused_or_read_alike(case: tuple[Form, bytes | None], data: st.DataObject) -> None:
    form, _ = case
    body, dash = form.body(), form.dash
    for _ in range(data.draw(st.integers(1, 3))):
        start = data.draw(st.integers(0, len(body)))
        end = start + data.draw(st.sampled_from([0, 0, 1, 2, 5]))
        splice = data.draw(st.sampled_from(SPLICES + [dash, b"\r\n" + dash + b"\r\n", b"\n" + dash, dash + b"--"]))
        body = body[:start] + splice + body[end:]
    assert_parsers_agree(form.content_type, body)
