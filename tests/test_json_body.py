"""Strict JSON reading and the model's byte span, without I/O."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.check.facts import Problem
from extauthz.check.json_body import MAX_DEPTH, JsonModel, model_span, read_json_model
from tests.lanes import examples


def code(body: bytes) -> str | None:
    read = read_json_model(body)
    return read.code if isinstance(read, Problem) else None


@pytest.mark.parametrize("body", [
    b'{"model":"gpt-4o","model":"gpt-4"}',
    b'{"model":"gpt-4","x":{"a":1,"a":2}}',
    b'{"model":"gpt-4","x":[{"a":1},{"b":1,"b":1}]}',
    b'{"mod\\u0065l":"a","model":"b"}',
    b'{"model":"gpt-4","temperature":NaN}',
    b'{"model":"gpt-4","t":Infinity}',
    b'{"model":"gpt-4","t":-Infinity}',
    b'{"model":"gpt-4","t":1e999}',
    b'{"model":"gpt-4","t":-1E400}',
    b'{"model":"gpt-4","x":"\\ud800"}',
    b'{"model":"gpt-4","x":"\\udc00\\ud800"}',
    b'{"model":"gpt-4","x":"\\ud83d"}',
    b'{"model":"gpt-4","x":"\\ud83d\\\\ude00"}',
    b'{"model":"gpt-4","x":' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}",
    b'{"model":"gpt-4","x":' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'\xef\xbb\xbf{"model":"a"}',
    b'{"model":"a"} {}',
    b'{"model":"a",}',
    b'{"model":"\xff"}',
    b'{"model":"a\x01"}',
    b"[]",
    b'"model"',
    b"",
])
def test_bodies_parsers_could_disagree_on_are_refused(body: bytes) -> None:
    assert code(body) == "invalid_request_body"


@pytest.mark.parametrize("name", ["Model", "MODEL", "mODEL", "MoDeL"])
def test_a_member_named_model_in_another_case_is_refused(name: str) -> None:
    assert code(b'{"model":"gpt-4","%s":"o1"}' % name.encode()) == "invalid_model"
    assert code(b'{"%s":"o1"}' % name.encode()) == "invalid_model"


@pytest.mark.parametrize("body", [
    b'{"model":"gpt-4","seed":18446744073709551615,"big":' + b"9" * 400 + b"}",
    b'{"model":"gpt-4","x":0.1000000000000000055511151231257827,"y":1E2,"z":-0}',
    b'{"model":"gpt-4","x":"\\ud83d\\ude00 \\\\ud800"}',
    b'{"model":"gpt-4","x":' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}",
    b'{"model":"gpt-4","nested":{"Model":"x","model":"y"}}',
    b' \r\n{ "model" :\t"gpt-4" } \n',
])
def test_what_every_parser_reads_alike_is_accepted(body: bytes) -> None:
    read = read_json_model(body)
    assert isinstance(read, JsonModel) and read.model == "gpt-4" and read.present


@pytest.mark.parametrize("body,expected", [
    (b'{"model":"gpt-4"}', b'"gpt-4"'),
    (b'{"x":"caf\xc3\xa9 \xf0\x9f\x98\x80","model" : "gpt\\u002d4" }', b'"gpt\\u002d4"'),
    (b'{"mo\\u0064el": "gpt-4", "a": 1}', b'"gpt-4"'),
    (b'{"messages":[{"model":"other"}],"model":"gpt-4"}', b'"gpt-4"'),
    (b'{"model":null}', b"null"),
])
def test_the_span_holds_the_top_level_model_value(body: bytes, expected: bytes) -> None:
    span = model_span(read_json_model(body))
    assert body[span.start:span.end] == expected == span.original and span.body_length == len(body)


@pytest.mark.parametrize("body,at,members_after", [(b" { } ", 2, False), (b'{"messages": []}', 1, True),
                                                   (b'\n{\n"a":1}', 2, True)])
def test_a_body_without_a_model_gets_an_insertion_point(body: bytes, at: int, members_after: bool) -> None:
    read = read_json_model(body)
    assert isinstance(read, JsonModel) and not read.present
    assert model_span(read) == (at, at, b"", len(body), members_after)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5) |
                    st.floats(allow_nan=False, allow_infinity=False),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children,
                                                                                      max_size=3), max_leaves=12)


@settings(max_examples=examples(500), deadline=None)
@given(doc=st.dictionaries(st.text(max_size=6), JSON, max_size=4), model=st.text(min_size=1, max_size=8),
       ascii_only=st.booleans(), indent=st.sampled_from([None, 0, 2]))
def test_any_plain_document_reads_as_json_loads_does_and_its_span_is_exact(doc: dict, model: str, ascii_only: bool,
                                                                            indent: int | None) -> None:
    doc = {k: v for k, v in doc.items() if k.casefold() != "model"} | {"model": model}
    body = json.dumps(doc, ensure_ascii=ascii_only, indent=indent).encode("utf-8", "surrogatepass")
    read = read_json_model(body)
    if isinstance(read, Problem):  # only the surrogates hypothesis may generate, or depth
        assert read.message.startswith(("The JSON body contains an unpaired", "The request body must be UTF-8"))
        return
    assert read.model == json.loads(body)["model"] == model
    span = model_span(read)
    assert json.loads(body[span.start:span.end]) == model
    assert json.loads(body[:span.start] + b'"replaced"' + body[span.end:])["model"] == "replaced"


def test_member_offsets_are_bytes_in_a_body_with_multibyte_characters() -> None:
    from extauthz.check.json_body import members
    body = '{"a": "é€😀", "bb" : {"c": "ü"},\n "model":"m-ä", "z": 1}'.encode()
    found = members(read_json_model(body))
    assert [m.name for m in found] == ["a", "bb", "model", "z"]
    assert [body[m.start:m.value_end] for m in found] == [
        '"a": "é€😀"'.encode(), '"bb" : {"c": "ü"}'.encode(), '"model":"m-ä"'.encode(), b'"z": 1']
