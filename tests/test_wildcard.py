"""``*`` patterns: the same answers as the regex they replaced, without its backtracking."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.domain.wildcard import capture, matches, parts
from tests.lanes import examples


def regex(pattern: str) -> re.Pattern[str]:
    """The matcher wildcard.py replaced: each ``*`` a greedy ``(.*)``, everything else literal."""
    return re.compile("(.*)".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


TABLE = [
    # (pattern, name, matches)
    ("openai/*", "openai/gpt-4", True),
    ("openai/*", "openai/", True),  # '*' matches the empty string
    ("openai/*", "openai", False),
    ("openai/*", "xopenai/gpt-4", False),  # the whole name must match
    ("bedrock/*", "bedrockz/claude", False),
    ("openai/gpt-4.*", "openai/gpt-4xo", False),  # '.' is literal
    ("openai/gpt-4.*", "openai/gpt-4.1", True),
    ("openai/o1-*", "openai/o1-mini", True),
    ("*", "", True),
    ("*", "anything/at all", True),
    ("**", "x", True),
    ("a*a", "a", False),  # prefix and suffix may not overlap
    ("a*a", "aa", True),
    ("*-*-*-*-x", "a-b-c-d-x", True),
    ("*-*-*-*-x", "----x", True),
    ("*-*-*-*-x", "---x", False),
    ("a*b*c", "abxbyc", True),
    ("a*b*c", "acb", False),
    ("a*b*c", "abc", True),
    ("*ab*ab*", "xabab", True),
    ("*aba*", "abab", True),
    ("gpt-4", "gpt-4", True),  # no star: only itself
    ("gpt-4", "gpt-40", False),
    ("x*y", "x\ny", True),  # any character, newlines included
    ("[a-z]*", "[a-z]ok", True),  # regex syntax is literal
    ("[a-z]*", "bok", False),
]


@pytest.mark.parametrize("pattern,name,expected", TABLE)
def test_table_matches_like_the_regex(pattern: str, name: str, expected: bool) -> None:
    assert matches(pattern, name) is expected
    assert (regex(pattern).fullmatch(name) is not None) is expected


@pytest.mark.parametrize("pattern,name,expected", [
    ("openai/*", "openai/gpt-4o", "gpt-4o"),
    ("openai/*", "openai/", ""),
    ("openai/o1-*", "openai/o1-mini", "mini"),
    ("*-latest", "claude-3-latest", "claude-3"),
    ("a*a", "aaaa", "aa"),
    ("*", "anything", "anything"),
])
def test_one_star_capture_is_the_name_without_prefix_and_suffix(pattern: str, name: str, expected: str) -> None:
    assert capture(pattern, name) == expected


def test_capture_of_a_non_match_or_a_starless_pattern_is_none() -> None:
    assert capture("openai/*", "azure/gpt-4") is None
    assert capture("gpt-4", "gpt-4") is None


def test_multi_star_capture_is_the_longest_first_star_like_the_regex() -> None:
    assert capture("*/*", "a/b/c") == "a/b"
    assert capture("a*b*c", "abxbyc") == "bx"


def test_parts_are_the_literals_between_stars() -> None:
    assert parts("a*b**c") == ("a", "b", "", "c")
    assert parts("gpt-4") == ("gpt-4",)


def test_backtracking_input_answers_at_once() -> None:
    """The regex took seconds on four stars and minutes on five; no timing asserted, the
    test would simply hang if matching backtracked."""
    dashes = "-" * 250
    assert matches("*-*-*-*-x", dashes) is False
    assert matches("*-*-*-*-*-x", dashes) is False
    assert capture("*-*-*-*-*-x", dashes) is None
    assert matches("*-*-*-*-*-x", dashes + "x") is True
    assert capture("*-*-*-*-*-x", dashes + "x") == "-" * 245  # the suffix "-x" and four literal dashes take the rest


# Patterns of up to 4 stars (runs like '**' included) over the alphabet of the names.
PATTERNS = st.text(alphabet="ab-*", max_size=9).filter(lambda p: p.count("*") <= 4)
NAMES = st.text(alphabet="ab-", max_size=12)


@settings(max_examples=examples(3000), deadline=None)
@given(pattern=PATTERNS, name=NAMES)
def test_property_same_answer_and_capture_as_the_regex(pattern: str, name: str) -> None:
    found = regex(pattern).fullmatch(name)
    assert matches(pattern, name) is (found is not None)
    expected_capture = found.group(1) if found is not None and "*" in pattern else None
    assert capture(pattern, name) == expected_capture
