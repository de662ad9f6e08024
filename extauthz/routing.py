"""How an allowed request reaches its deployment: the headers Envoy applies on allow.

Everything that depends only on the deployment is computed once, at config load.
"""

from __future__ import annotations

from dataclasses import dataclass

from extauthz import providers
from extauthz.config import Deployment

# Set on every allow; Envoy routes on it (cluster_header). A client's own value never
# survives an allow, and a request without it matches no upstream route.
CLUSTER_HEADER = "x-extauthz-cluster"
# The provider-side model name; Envoy's transform filter writes it into the body's "model".
MODEL_HEADER = "x-extauthz-model"


@dataclass(frozen=True)
class Route:
    deployment: Deployment
    upstream: providers.Upstream
    headers: tuple[tuple[str, str], ...]
    headers_to_remove: tuple[str, ...]

    @classmethod
    def of(cls, d: Deployment) -> "Route":
        upstream = providers.upstream(d.api_base)
        # The body was parsed as JSON to be checked; saying so makes Envoy's transform filter
        # rewrite "model" even when the client sent no or another content type.
        headers = [(CLUSTER_HEADER, upstream.cluster), (":authority", upstream.authority),
                   ("content-type", "application/json")]
        if d.api_key:
            headers.append(providers.credential_header(d.provider, d.api_key))
        overwritten = {name for name, _ in headers}
        # Envoy applies sets before removes: a header we overwrite must not also be removed.
        remove = tuple(h for h in providers.CLIENT_KEY_HEADERS if h not in overwritten)
        return cls(d, upstream, tuple(headers), remove)

    def provider_model(self, capture: str | None) -> str:
        model = self.deployment.provider_model
        return model.replace("*", capture, 1) if capture is not None and "*" in model else model

    def path(self, request_path: str, provider_model: str) -> str:
        d = self.deployment
        if d.provider == "azure":
            operation = _operation(request_path)
            query = f"?api-version={d.api_version}" if d.api_version else ""
            return f"{self.upstream.base_path}/openai/deployments/{provider_model}/{operation}{query}"
        return providers.upstream_path(self.upstream.base_path, request_path)

    def allow_headers(self, request_path: str, capture: str | None) -> tuple[tuple[str, str], ...]:
        model = self.provider_model(capture)
        return self.headers + ((":path", self.path(request_path, model)), (MODEL_HEADER, model))


def _operation(request_path: str) -> str:
    """``/v1/chat/completions?x`` -> ``chat/completions``; Azure-style paths keep their operation."""
    path = request_path.split("?", 1)[0].strip("/")
    if path.startswith("openai/deployments/"):
        return path.split("/", 3)[3] if path.count("/") >= 3 else ""
    return path[3:] if path.startswith("v1/") else path
