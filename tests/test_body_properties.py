"""Property, through the real stack: whenever the gateway allows a request, every
reasonable parser of the body the provider received reads the same model, and that model
is the provider's name for the deployment the request was routed to.

Bodies are generated the way an attacker would write them (duplicate members at any
depth, members named like "model" in another case or with escapes, odd numbers, lone
surrogates, deep nesting, odd whitespace; forms with duplicate headers and parameters,
RFC 2231 names, parts past the end), sent through Envoy to an upstream that echoes the
bytes it received, and read back with first-wins, last-wins and case-insensitive JSON
readers, and with Python's email parser and python-multipart for forms.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from extauthz.check.json_body import model_span, read_json_model
from tests import harness
from tests.form_readers import email_reading, python_multipart_reading
from tests.harness import MASTER_KEY, Stack, http
from tests.lanes import examples

PROVIDER_MODELS = {"Bearer k-alpha": "provider-alpha", "Bearer k-beta": "provider-beta", "Bearer k-wa": "whisper-a"}
WILDCARD = "Bearer k-w"  # w/* -> the part after "w/"
FORM_MODELS = {"Bearer k-wa": "whisper-a"}


@pytest.fixture(scope="module")
def stack(workdir: Path, redis_port: int) -> Iterator[Stack]:
    upstream, port = harness.start_upstream(workdir)
    try:
        text = (Path(__file__).parent / "configs" / "properties.yaml").read_text()
        config = workdir / "properties.yaml"
        config.write_text(text.replace("{upstream}", f"http://127.0.0.1:{port}"))
        running = harness.start_stack(workdir, config, f"redis://127.0.0.1:{redis_port}/0")
        try:
            yield running
        finally:
            running.stop()
    finally:
        upstream.stop()


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    r = http("POST", stack.envoy.url + "/key/generate", {"models": ["alpha", "beta", "open", "whisper-a"]},
             {"Authorization": f"Bearer {MASTER_KEY}"})
    assert r.status == 200, r.text
    return r.json()["key"]


# -- JSON ---------------------------------------------------------------------------------

NAMES = ["alpha", "beta", "w/ok", "w/caf\u00e9", "whisper-a",  # allowed
         "gamma", "Alpha", "w/OK", "w/x-1", "W/x-1", "w/X-1", "w/w/x-1", "w/ ok", "w//ok", "w/", ""]
ALLOWED_NAMES = NAMES[:5]
BLANK = st.sampled_from(["", "", "", " ", "\n", "\t", "\r\n  "])


@st.composite
def string_token(draw: st.DrawFn, text: str) -> str:
    style = draw(st.sampled_from(["plain", "plain", "ascii", "escaped", "slash"]))
    if style == "escaped":  # every character as \uXXXX, as some serializers do
        return '"' + "".join(f"\\u{ord(c):04x}" for c in text) + '"'
    if style == "slash":
        return json.dumps(text).replace("/", "\\/")
    return json.dumps(text, ensure_ascii=style == "ascii")


def model_token(names: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(names).flatmap(string_token)


# Values a careful client sends; the provider must get them byte for byte.
BENIGN = st.sampled_from(["1", "-0", "18446744073709551615", "0.1000000000000000055511151231257827", "1E2", "true",
                          "null", '"text"', '"\\ud83d\\ude00"', '"\\"model\\": \\"gamma\\""', "[]", "{}",
                          '[{"role": "user", "content": "hi", "model": "gamma"}]', "[[[[1]]]]"])
# What an attacker adds, each a reason for some parser to read the body differently.
MUTATIONS = [
    lambda t: ("model", t), lambda t: ("Model", t), lambda t: ("MODEL", t), lambda t: ("mod\\u0065l", t),
    lambda t: ("x", '{"a": 1, "a": 2}'), lambda t: ("x", f'{{"model": {t}, "model": "gamma"}}'),
    lambda t: ("x", "NaN"), lambda t: ("x", "-Infinity"), lambda t: ("x", "1e999"), lambda t: ("x", '"\\ud800"'),
    lambda t: ("x", "[" * 64 + "]" * 64), lambda t: ("x", "[" * 63 + "]" * 63), lambda t: ("model ", t),
]


@st.composite
def json_body(draw: st.DrawFn) -> bytes:
    members = [("messages", draw(BENIGN)), ("model", draw(model_token(
        draw(st.sampled_from([ALLOWED_NAMES, ALLOWED_NAMES, NAMES])))))]
    members += [("x" + str(i), draw(BENIGN)) for i in range(draw(st.integers(0, 2)))]
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        name, text = draw(st.sampled_from(MUTATIONS))(draw(model_token(NAMES)))
        members.insert(draw(st.integers(0, len(members))), (name, text))
    order = draw(st.permutations(members))
    rendered = [f'{draw(BLANK)}"{name}"{draw(BLANK)}:{draw(BLANK)}{text}{draw(BLANK)}' for name, text in order]
    return (draw(BLANK) + "{" + ",".join(rendered) + "}" + draw(BLANK)).encode()


def pairs_reader(pick: Callable[[list[tuple[str, Any]]], Any]) -> Callable[[bytes], Any]:
    def read(raw: bytes) -> Any:
        top: list[tuple[str, Any]] = []

        def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            top[:] = pairs  # the outermost object is completed last
            return dict(pairs)

        json.loads(raw, object_pairs_hook=hook)
        return pick(top)
    return read


def _values(pairs: list[tuple[str, Any]], fold: bool) -> list[Any]:
    return [v for k, v in pairs if (k.casefold() == "model" if fold else k == "model")]


JSON_READERS = {
    "last wins (Python, JavaScript)": pairs_reader(lambda p: _values(p, False)[-1]),
    "first wins": pairs_reader(lambda p: _values(p, False)[0]),
    "case-insensitive, last wins (Go)": pairs_reader(lambda p: _values(p, True)[-1]),
    "case-insensitive, first wins": pairs_reader(lambda p: _values(p, True)[0]),
}


def only_the_model_changed(sent: bytes, got: bytes) -> None:
    """Every byte but those of the top-level model's value reached the provider as sent."""
    span = model_span(read_json_model(sent))
    prefix = 0
    while prefix < min(len(sent), len(got)) and sent[prefix] == got[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(sent), len(got)) - prefix and sent[-1 - suffix] == got[-1 - suffix]:
        suffix += 1
    if sent != got:
        assert span.start <= prefix and len(sent) - suffix <= span.end, (sent, got)


@settings(max_examples=examples(250), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(body=json_body())
def test_every_json_parser_reads_the_model_the_gateway_checked(stack: Stack, key: str, body: bytes) -> None:
    r = http("POST", stack.envoy.url + "/v1/chat/completions", raw=body,
             headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    event(f"status {r.status}")
    if r.status != 200:
        assert r.status in (400, 403) and r.json()["error"]["code"], r.text
        return
    echo = r.json()["echo"]
    got = base64.b64decode(echo["raw_body"])
    read = {name: reader(got) for name, reader in JSON_READERS.items()}
    assert len(set(read.values())) == 1, read
    (model,) = set(read.values())
    credential = echo["headers"]["authorization"]
    if credential == WILDCARD:
        checked = "w/" + model
        assert checked in NAMES and not model.casefold().startswith("x-") and checked == checked.strip()
    else:
        assert PROVIDER_MODELS[credential] == model, (credential, model)
    only_the_model_changed(body, got)


# -- multipart/form-data -----------------------------------------------------------------------

BOUNDARY = "prop-boundary"
FORM_NAMES = ["whisper-a", "whisper-b", "Whisper-a", "alpha"]


@st.composite
def form_part(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(["file"] * 4 + ["x"] * 3 + ["model", "Model", "_charset_"]))
    disposition = f'form-data; name="{name}"'
    variant = draw(st.sampled_from(["plain"] * 12 + ["two dispositions", "two names", "rfc2231", "filename",
                                                     "base64", "utf-16", "unquoted", "folded"]))
    headers = []
    other = draw(st.sampled_from(["model", "x"]))
    if variant == "two dispositions":
        headers.append(f'Content-Disposition: form-data; name="{other}"')
    if variant == "two names":
        disposition += f'; name="{other}"'
    if variant == "rfc2231":
        disposition = f"form-data; name*=UTF-8''{name}"
    if variant == "filename":
        disposition += '; filename="a.wav"'
    if variant == "unquoted":
        disposition = f"form-data; name={name}"
    headers.insert(draw(st.integers(0, len(headers))), f"Content-Disposition: {disposition}")
    if variant == "folded":
        headers[-1] = headers[-1].replace("; ", ";\r\n ", 1)
    if variant == "base64":
        headers.append("Content-Transfer-Encoding: base64")
    if variant == "utf-16":
        headers.append("Content-Type: text/plain; charset=utf-16")
    data = draw(st.sampled_from(FORM_NAMES)).encode() if name != "file" else b"RIFF\r\n--x\x00\xff"
    return "\r\n".join(headers).encode() + b"\r\n\r\n" + data


@st.composite
def form_body(draw: st.DrawFn) -> tuple[bytes, str]:
    parts = draw(st.lists(form_part(), max_size=3))
    if draw(st.sampled_from([True, True, True, False])):
        model = draw(st.sampled_from(["whisper-a", "whisper-a", "whisper-b"])).encode()
        parts.insert(draw(st.integers(0, len(parts))), b'Content-Disposition: form-data; name="model"\r\n\r\n' + model)
    dash = b"--" + BOUNDARY.encode()
    body = b"".join(dash + b"\r\n" + p + b"\r\n" for p in parts) + dash + b"--\r\n"
    tail = draw(st.sampled_from(["none"] * 15 + ["epilogue", "late part", "no close", "preamble", "bare LF"]))
    if tail == "epilogue":
        body += b"trailing text\r\n"
    if tail == "late part":
        body += dash + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-b\r\n' + dash + b"--\r\n"
    if tail == "no close":
        body = body[: -len(dash) - 4]
    if tail == "preamble":
        body = b"preamble\r\n" + body
    if tail == "bare LF":
        body = body.replace(b"\r\n", b"\n")
    content_type = draw(st.sampled_from([f"multipart/form-data; boundary={BOUNDARY}"] * 10 + [
                                         f'multipart/form-data; boundary="{BOUNDARY}"',
                                         f"multipart/form-data; boundary={BOUNDARY}; boundary=other",
                                         f"Multipart/Form-Data;boundary={BOUNDARY}"]))
    return body, content_type


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(form=form_body())
def test_every_form_parser_reads_the_model_the_gateway_checked(stack: Stack, key: str,
                                                                form: tuple[bytes, str]) -> None:
    body, content_type = form
    r = http("POST", stack.envoy.url + "/v1/audio/transcriptions", raw=body,
             headers={"Authorization": f"Bearer {key}", "Content-Type": content_type})
    event(f"status {r.status}")
    if r.status != 200:
        assert r.status in (400, 403) and r.json()["error"]["code"], r.text
        return
    echo = r.json()["echo"]
    got, forwarded_type = base64.b64decode(echo["raw_body"]), echo["headers"]["content-type"]
    assert got == body
    expected = FORM_MODELS[echo["headers"]["authorization"]]
    assert email_reading(forwarded_type, got)[1] == [expected.encode()]
    assert python_multipart_reading(forwarded_type, got)[1] == [expected.encode()]
