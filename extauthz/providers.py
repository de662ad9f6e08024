"""What each provider expects: default base URL and the header that carries its credential."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_BASES = {
    "openai": "https://api.openai.com/v1",
    "azure": None,
    "anthropic": "https://api.anthropic.com",
    "groq": "https://api.groq.com/openai/v1",
    "mistral": "https://api.mistral.ai/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "together_ai": "https://api.together.xyz/v1",
    "fireworks_ai": "https://api.fireworks.ai/inference/v1",
    "openrouter": "https://openrouter.ai/api/v1",
    "xai": "https://api.x.ai/v1",
    "gemini": "https://generativelanguage.googleapis.com",
}
ANTHROPIC_VERSION = "2023-06-01"

# Headers through which a caller may present a virtual key; all are stripped on allow.
CLIENT_KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
# Client headers that never reach a provider beside the operator's credential: the
# caller's own credentials and session, and headers that pick which organisation or
# project the operator's key bills (a deployment's `organization` is set by the gateway).
CLIENT_ONLY_HEADERS = ("cookie", "proxy-authorization", "x-litellm-api-key",
                       "openai-organization", "openai-project", "x-goog-user-project")


def default_base(provider: str) -> str | None:
    return DEFAULT_BASES.get(provider)


def base_problem(api_base: str) -> str | None:
    parts = urlsplit(api_base)
    if parts.scheme not in ("http", "https"):
        return f"{api_base!r} is not an http(s) URL"
    if not parts.hostname:
        return f"{api_base!r} names no host"
    if parts.query or parts.fragment:
        return f"{api_base!r} must not carry a query or fragment"
    try:
        _ = parts.port  # parsing it is the check
    except ValueError:
        return f"{api_base!r} has an invalid port"
    return None


@dataclass(frozen=True)
class Upstream:
    """One network destination; Envoy gets one cluster per upstream."""

    scheme: str
    host: str
    port: int
    base_path: str

    @property
    def cluster(self) -> str:
        # '.' (and anything odd) becomes '_': Envoy splits stat names on '.'.
        host = "".join(c if c.isalnum() or c == "-" else "_" for c in self.host.lower())
        return f"upstream_{self.scheme}_{host}_{self.port}"

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


def upstream(api_base: str) -> Upstream:
    parts = urlsplit(api_base)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Upstream(parts.scheme, parts.hostname or "", port, parts.path.rstrip("/"))


def credential_header(provider: str, api_key: str) -> tuple[str, str]:
    if provider == "azure":
        return ("api-key", api_key)
    if provider == "anthropic":
        return ("x-api-key", api_key)
    if provider == "gemini":
        return ("x-goog-api-key", api_key)
    return ("authorization", f"Bearer {api_key}")


def api_format(provider: str) -> str:
    """The request format a provider reads; every other provider speaks OpenAI's."""
    return provider if provider in ("anthropic", "gemini") else "openai"
