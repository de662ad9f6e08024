"""``*`` patterns (globs whose only metacharacter is ``*``), matched in linear time.

A ``*`` matches any run of characters, the empty run included; every other character
matches only itself, and the whole name must match. A regex with one ``(.*)`` per star
can backtrack: ``*-*-*-*-x`` against 250 dashes takes seconds, and requested model
names come from callers. Here a pattern is split once into its literal parts and a name
is checked with ``startswith``, ``endswith`` and one ``str.find`` per middle part, so a
check costs one pass over the name for a given pattern, whatever the name holds.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=4096)
def parts(pattern: str) -> tuple[str, ...]:
    """The literal parts between the stars: ``"a*b**c"`` -> ``("a", "b", "", "c")``."""
    return tuple(pattern.split("*"))


def matches(pattern: str, name: str) -> bool:
    """Whether ``name`` matches ``pattern`` as a whole; a pattern without ``*`` matches only itself.

    Placing each middle part at its leftmost occurrence after the previous one is
    enough: when only ``*`` separates the parts, an earlier placement never leaves less
    room for the parts after it, so if any placement fits, the leftmost one does.
    """
    literals = parts(pattern)
    if len(literals) == 1:
        return name == pattern
    prefix, *middle, suffix = literals
    end = len(name) - len(suffix)
    # The length check stops a prefix and a suffix that overlap in a short name (a*a vs "a").
    if end < len(prefix) or not name.startswith(prefix) or not name.endswith(suffix):
        return False
    start = len(prefix)
    for part in middle:
        found = name.find(part, start, end)
        if found < 0:
            return False
        start = found + len(part)
    return True


def capture(pattern: str, name: str) -> str | None:
    """What the first ``*`` of ``pattern`` matched in ``name``; None when the name does
    not match or the pattern has no ``*``.

    With one star this is the name without the pattern's literal prefix and suffix.
    With several stars a name can often be split more than one way (``*/*`` against
    ``a/b/c``); the first star then takes the longest run it can (``a/b``), which is
    what the regex ``(.*)`` this module replaced captured, so routing is unchanged. It is
    found by placing the later parts as far right as they go, again one pass.
    """
    literals = parts(pattern)
    if len(literals) == 1 or not matches(pattern, name):
        return None
    prefix, *middle, suffix = literals
    start, end = len(prefix), len(name) - len(suffix)
    for part in reversed(middle):  # rightmost placement of each later part leaves the first star longest
        end = name.rfind(part, start, end)
    return name[start:end]
