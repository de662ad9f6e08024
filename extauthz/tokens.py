"""Short-lived provider credentials (OAuth bearer tokens), refreshed in the background.

Some deployments authenticate with a token the provider's identity service issues for an
hour or so: Vertex AI (a Google service account, or workload identity) and Azure OpenAI
with Entra ID (a client credential). The sidecar holds the current token of each and puts
it in the allow response like a static key. Tokens are fetched by the providers' own auth
libraries (``google-auth``, ``azure-identity``: the optional extras ``extauthz[vertex]``,
``extauthz[azure]``), on a thread, ahead of expiry, never on a request's path. A
deployment whose token is missing or expired is refused with 503 (fail closed) until a
refresh succeeds; every failure is logged and counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("extauthz.tokens")

GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
AZURE_SCOPE = "https://cognitiveservices.azure.com/.default"
# Refresh this long before expiry (at most half the token's lifetime), so a request
# never carries a token about to expire.
REFRESH_AHEAD_S = 300.0
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0
# A fetch that takes longer failed: a token endpoint that hangs must not hold a thread, the
# refresh or the shutdown (the libraries' own HTTP timeouts are set below this).
FETCH_TIMEOUT_S, HTTP_TIMEOUT_S = 30.0, 10.0
GOOGLE_TYPES = ("service_account", "authorized_user", "external_account", "impersonated_service_account")
Clock = Callable[[], float]


@dataclass(frozen=True)
class TokenSpec:
    """What identifies a token: the same spec in two deployments (or two configs across a
    reload) shares one token and one refresh."""

    kind: str                      # "google" | "azure"
    credentials: str | None = field(default=None, repr=False)  # Google: service-account JSON or path
    tenant_id: str | None = None   # Azure: Entra tenant
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    authority: str | None = None   # Azure: the Entra host (sovereign clouds)

    @property
    def label(self) -> str:
        """How logs name the credential: never its text (inline JSON holds the private key)."""
        if self.kind == "azure":
            return f"entra client {self.client_id} of tenant {self.tenant_id}"
        if not self.credentials:
            return "google application default credentials"
        info = google_info(self.credentials)
        if info is None:
            return "google credentials (unreadable)"
        email = info.get("client_email")
        return f"google {info.get('type')} {email if isinstance(email, str) else '(no client_email)'}"


def google_info(credentials: str) -> dict[str, Any] | None:
    """The credential document: inline JSON, or the JSON file it names; None when it is
    neither (the reason is not told: it would quote the value)."""
    text = credentials.strip()
    try:
        if not text.startswith("{"):
            if not os.path.isfile(text):
                return None
            with open(text, encoding="utf-8") as f:
                text = f.read()
        info = json.loads(text)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("type") in GOOGLE_TYPES else None


class TokenHolder:
    """The current token of one spec; ``bearer()`` is what a request reads."""

    def __init__(self, spec: TokenSpec, clock: Clock = time.time) -> None:
        self.spec = spec
        self.clock = clock
        self.token: str | None = None
        self.expires_at = 0.0
        self.failures = 0
        self.last_error = "not fetched yet"

    def bearer(self) -> str | None:
        """The token while it is valid, else None (the request is refused)."""
        return self.token if self.token is not None and self.clock() < self.expires_at else None

    def unavailable_reason(self) -> str:
        return f"no valid token from {self.spec.label}: {self.last_error}"

    def set(self, token: str, expires_at: float) -> None:
        self.token, self.expires_at, self.failures, self.last_error = token, expires_at, 0, ""

    def next_refresh_in(self) -> float:
        """Seconds until the next fetch: ahead of expiry, or a backoff after failures; never
        less than RETRY_MIN_S (a token issued with no life left must not spin the loop)."""
        if self.failures:
            return min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (self.failures - 1)) * random.uniform(0.8, 1.0)
        lifetime = self.expires_at - self.clock()
        return max(RETRY_MIN_S, lifetime - min(REFRESH_AHEAD_S, lifetime / 2))


def fetch(spec: TokenSpec) -> tuple[str, float]:
    """A new token and its expiry (epoch seconds), from the provider's auth library.
    Blocking: called on a thread."""
    if spec.kind == "google":
        return _fetch_google(spec)
    return _fetch_azure(spec)


def _fetch_google(spec: TokenSpec) -> tuple[str, float]:
    import google.auth
    import google.auth.transport.requests

    class Request(google.auth.transport.requests.Request):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            kwargs["timeout"] = min(kwargs.get("timeout") or HTTP_TIMEOUT_S, HTTP_TIMEOUT_S)
            return super().__call__(*args, **kwargs)

    if spec.credentials:
        info = google_info(spec.credentials)
        if info is None:
            raise ValueError("the credentials are neither a Google credential JSON nor a file holding one")
        creds, _ = google.auth.load_credentials_from_dict(info, scopes=[GOOGLE_SCOPE])
    else:
        creds, _ = google.auth.default(scopes=[GOOGLE_SCOPE])
    creds.refresh(Request())
    expiry = creds.expiry.replace(tzinfo=None) if creds.expiry else None
    expires_at = (expiry - expiry.__class__(1970, 1, 1)).total_seconds() if expiry else time.time() + 3000
    return creds.token, expires_at


def _fetch_azure(spec: TokenSpec) -> tuple[str, float]:
    from azure.identity import ClientSecretCredential, DefaultAzureCredential

    timeouts = {"connection_timeout": HTTP_TIMEOUT_S, "read_timeout": HTTP_TIMEOUT_S}
    if spec.client_secret:
        if spec.tenant_id is None or spec.client_id is None:  # (the config gives them with a secret)
            raise ValueError("an Entra client secret needs its tenant_id and client_id")
        # Another authority host (a sovereign cloud, a private one) is taken as given: no
        # instance discovery against Microsoft's public cloud.
        extra: dict[str, Any] = {"authority": spec.authority, "disable_instance_discovery": True} \
            if spec.authority else {}
        credential: Any = ClientSecretCredential(spec.tenant_id, spec.client_id, spec.client_secret,
                                                 **extra, **timeouts)
    else:
        credential = DefaultAzureCredential(**timeouts)
    token = credential.get_token(AZURE_SCOPE)
    return token.token, float(token.expires_on)


def missing_library(kind: str) -> str | None:
    """Why tokens of this kind cannot be fetched here, or None."""
    module, extra = {"google": ("google.auth", "vertex"), "azure": ("azure.identity", "azure")}[kind]
    try:
        __import__(module)
    except ImportError:
        return f"the {module} library is not installed (pip install 'extauthz[{extra}]')"
    return None


class Tokens:
    """Every token the loaded configs need, each refreshed by a task of its own."""

    def __init__(self, fetcher: Callable[[TokenSpec], tuple[str, float]] = fetch, clock: Clock = time.time) -> None:
        self.fetcher = fetcher
        self.clock = clock
        self.holders: dict[TokenSpec, TokenHolder] = {}
        self.tasks: dict[TokenSpec, asyncio.Task[None]] = {}
        self.fetch_failures = 0
        # Threads of their own: a token endpoint that hangs holds none of the loop's others
        # (name resolution for Redis runs on the default executor).
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="extauthz-token")

    def holder(self, spec: TokenSpec) -> TokenHolder:
        found = self.holders.get(spec)
        if found is None:
            found = self.holders[spec] = TokenHolder(spec, self.clock)
        return found

    def start(self) -> None:
        """A refresh task for every holder without one (at start-up and after a reload)."""
        for spec, holder in self.holders.items():
            if spec not in self.tasks:
                self.tasks[spec] = asyncio.create_task(self.refresh_forever(holder), name=f"token: {spec.label}")

    async def refresh_forever(self, holder: TokenHolder) -> None:
        while True:
            await self.refresh(holder)
            await asyncio.sleep(holder.next_refresh_in())

    async def refresh(self, holder: TokenHolder) -> None:
        # Imported here: the config (which names TokenSpec) is read before --workers sets up
        # prometheus_client's multiprocess directory, which it reads when first imported.
        from extauthz.telemetry import metrics

        try:
            fetching = asyncio.get_running_loop().run_in_executor(self.executor, self.fetcher, holder.spec)
            token, expires_at = await asyncio.wait_for(fetching, FETCH_TIMEOUT_S)
            if expires_at <= self.clock():
                raise ValueError("the token endpoint issued a token that has already expired")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any library error: keep the old token while it lasts, retry soon
            self.fetch_failures += 1
            metrics.TOKEN_REFRESHES.labels("failed").inc()
            holder.failures += 1
            # The exception's type and text name the endpoint and the reason, not the secret.
            holder.last_error = "no answer within %.0f s" % FETCH_TIMEOUT_S if isinstance(e, asyncio.TimeoutError) \
                else f"{type(e).__name__}: {str(e)[:300]}"
            log.error("token refresh failed for %s (attempt %d): %s", holder.spec.label, holder.failures,
                      holder.last_error)
            return
        holder.set(token, expires_at)
        metrics.TOKEN_REFRESHES.labels("ok").inc()
        log.info("token refreshed for %s, valid for %.0f s", holder.spec.label, expires_at - self.clock())

    def keep(self, specs: set[TokenSpec]) -> None:
        """After a reload: stop refreshing tokens no deployment uses any more."""
        for spec in [s for s in self.holders if s not in specs]:
            task = self.tasks.pop(spec, None)
            if task is not None:
                task.cancel()
            del self.holders[spec]

    def take_tasks(self) -> list[asyncio.Task[None]]:
        """The refresh tasks, for the App to end at stop; a fetch still running on its thread
        is abandoned (the process does not wait for it)."""
        tasks = list(self.tasks.values())
        self.tasks.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)
        return tasks


NO_TOKENS = Tokens()  # for a catalog built without an App: its tokens are never fetched (requests get 503)
