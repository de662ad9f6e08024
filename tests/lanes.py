"""The fast lane (`make test-fast`): the pure tests, with property tests drawing a tenth of
their examples, for the edit-run loop. `make test` draws them all."""

from __future__ import annotations

import os

FAST = os.environ.get("EXTAUTHZ_TEST_LANE") == "fast"


def examples(n: int) -> int:
    """How many examples a property test draws in this lane."""
    return max(25, n // 10) if FAST else n
