"""The token holders and their refresh, without I/O: an injected fetcher and clock."""

from __future__ import annotations

import asyncio

import pytest

from extauthz import tokens
from extauthz.tokens import TokenHolder, Tokens, TokenSpec

SPEC = TokenSpec("google", '{"client_email": "a@b"}')


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_token_is_used_only_while_valid() -> None:
    clock = Clock()
    holder = TokenHolder(SPEC, clock)
    assert holder.bearer() is None and "not fetched yet" in holder.unavailable_reason()
    holder.set("t1", 1060.0)
    assert holder.bearer() == "t1"
    clock.now = 1060.0
    assert holder.bearer() is None


@pytest.mark.parametrize("lifetime,expected", [(3600.0, 3300.0), (60.0, 30.0), (4.0, 2.0)])
def test_refresh_comes_ahead_of_expiry(lifetime: float, expected: float) -> None:
    clock = Clock()
    holder = TokenHolder(SPEC, clock)
    holder.set("t", clock.now + lifetime)
    assert holder.next_refresh_in() == pytest.approx(expected)


def test_failures_back_off_up_to_a_limit_and_keep_the_old_token() -> None:
    clock = Clock()
    calls: list[TokenSpec] = []

    def failing(spec: TokenSpec) -> tuple[str, float]:
        calls.append(spec)
        raise RuntimeError("token endpoint said no")

    registry = Tokens(failing, clock)
    holder = registry.holder(SPEC)
    holder.set("old", clock.now + 100)
    waits = []
    for _ in range(8):
        asyncio.run(registry.refresh(holder))
        waits.append(holder.next_refresh_in())
    assert holder.bearer() == "old" and "token endpoint said no" in holder.last_error
    assert waits[0] <= tokens.RETRY_MIN_S and max(waits) <= tokens.RETRY_MAX_S and waits[-1] > waits[0]
    assert registry.fetch_failures == 8


def test_one_credential_is_one_token_and_a_reload_drops_what_is_gone() -> None:
    async def run() -> None:
        fetched: list[TokenSpec] = []

        def fetch(spec: TokenSpec) -> tuple[str, float]:
            fetched.append(spec)
            return f"token-{len(fetched)}", 9e9

        registry = Tokens(fetch)
        other = TokenSpec("azure", tenant_id="t", client_id="c", client_secret="s")
        assert registry.holder(SPEC) is registry.holder(TokenSpec("google", '{"client_email": "a@b"}'))
        registry.holder(other)
        registry.start()
        await asyncio.sleep(0.05)
        assert sorted(h.bearer() or "" for h in registry.holders.values()) == ["token-1", "token-2"]
        registry.keep({SPEC})
        assert set(registry.holders) == {SPEC} and set(registry.tasks) == {SPEC}
        for task in registry.take_tasks():
            task.cancel()

    asyncio.run(run())


def test_a_secret_never_shows_in_a_specs_repr() -> None:
    spec = TokenSpec("azure", tenant_id="t", client_id="c", client_secret="very-secret")
    google = TokenSpec("google", '{"private_key": "-----BEGIN PRIVATE KEY-----x"}')
    assert "very-secret" not in repr(spec) and "PRIVATE" not in repr(google) and "PRIVATE" not in google.label


def test_a_fetch_that_hangs_fails_and_holds_no_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    release = threading.Event()
    monkeypatch.setattr(tokens, "FETCH_TIMEOUT_S", 0.2)

    def hangs(spec: TokenSpec) -> tuple[str, float]:
        release.wait(10)
        return "late", 9e9

    async def run() -> None:
        registry = Tokens(hangs)
        holder = registry.holder(SPEC)
        await registry.refresh(holder)
        assert holder.bearer() is None and "no answer within" in holder.last_error
        registry.take_tasks()  # the executor lets go of the thread still waiting

    asyncio.run(run())
    release.set()


def test_a_token_issued_already_expired_is_a_failure_and_no_busy_loop() -> None:
    clock = Clock()
    registry = Tokens(lambda spec: ("stale", clock.now - 1), clock)
    holder = registry.holder(SPEC)
    asyncio.run(registry.refresh(holder))
    assert holder.bearer() is None and holder.failures == 1
    holder.set("short", clock.now + 0.01)
    assert holder.next_refresh_in() >= tokens.RETRY_MIN_S


@pytest.mark.parametrize("credentials", [
    '{"type": "authorized_user", "client_secret": "d-FL95", "refresh_token": "1//0gSECRET"}x',  # not JSON
    '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----MIIsecret",}',      # trailing comma
    "eyJ0eXBlIjogInNlcnZpY2VfYWNjb3VudCJ9c2VjcmV0",                                              # base64, no file
])
def test_unreadable_credentials_are_never_quoted(credentials: str) -> None:
    spec = TokenSpec("google", credentials)
    assert spec.label == "google credentials (unreadable)"
    with pytest.raises(ValueError) as e:
        tokens._fetch_google(spec)
    assert "SECRET" not in str(e.value) and "secret" not in str(e.value)
