"""One table of providers: what each expects of a request routed to it.

A provider is named by the prefix of ``litellm_params.model`` (``azure/gpt-4o``). Its
record says which request format it reads, which header carries its credential, its
default base URL, where it reads the model (the path or the body), how the upstream
path is built, and the headers it needs that a client may leave out. Routing reads
this table; nothing else knows a provider by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable
from urllib.parse import quote, urlencode, urlsplit

# The request formats ("API formats") the gateway routes; it does not translate between them.
# BEDROCK_INVOKE is Anthropic's Messages body as Bedrock's InvokeModel reads it: no "model"
# (the path names it), no "stream" (the path says it), an "anthropic_version" member.
# VERTEX_RAW_PREDICT likewise for Vertex AI's rawPredict (the "stream" member stays).
OPENAI, ANTHROPIC, GEMINI = "openai", "anthropic", "gemini"
BEDROCK_INVOKE, VERTEX_RAW_PREDICT = "bedrock-invoke", "vertex-raw-predict"
API_FORMATS = (OPENAI, ANTHROPIC, GEMINI, BEDROCK_INVOKE, VERTEX_RAW_PREDICT)
ANTHROPIC_VERSION = "2023-06-01"


@dataclass(frozen=True)
class HostedAnthropic:
    """Anthropic models on a cloud platform: the path names the model and whether to
    stream, the body carries the platform's "anthropic_version" instead of "model"."""

    version: str                  # the anthropic_version the gateway writes
    operations: tuple[str, str]   # (plain, streaming)
    keeps_stream: bool            # whether the body may keep its "stream" member
    streams_sse: bool             # whether a streamed answer is server-sent events (else AWS event stream)


BEDROCK_ANTHROPIC = HostedAnthropic("bedrock-2023-05-31", ("invoke", "invoke-with-response-stream"), False, False)
VERTEX_ANTHROPIC = HostedAnthropic("vertex-2023-10-16", ("rawPredict", "streamRawPredict"), True, True)

# Headers through which a caller may present a virtual key; all are stripped on allow.
CLIENT_KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
# Client headers that never reach a provider beside the operator's credential: the
# caller's own credentials and session, and headers that pick which organisation or
# project the operator's key bills (a deployment's `organization` is set by the gateway).
CLIENT_ONLY_HEADERS = ("cookie", "proxy-authorization", "x-litellm-api-key",
                       "openai-organization", "openai-project", "x-goog-user-project",
                       # Google's field mask: it would strip usageMetadata from the answer
                       "x-goog-fieldmask",
                       # AWS: what Envoy's signature carries, and what picks what the operator's
                       # identity is billed for or runs (service tier, guardrails, tracing)
                       "x-amz-security-token", "x-amz-date", "x-amz-content-sha256", "x-amz-target",
                       "x-amzn-bedrock-service-tier", "x-amzn-bedrock-guardrailidentifier",
                       "x-amzn-bedrock-guardrailversion", "x-amzn-bedrock-trace",
                       "x-amzn-bedrock-performanceconfig-latency")

# (upstream base path, operation, provider model, api_version) -> (path, query to add)
PathBuilder = Callable[[str, str, str, "str | None"], "tuple[str, str]"]


def _openai_path(base: str, operation: str, model: str, version: str | None) -> tuple[str, str]:
    return f"{base}/{operation}", ""


def _azure_path(base: str, operation: str, model: str, version: str | None) -> tuple[str, str]:
    return (f"{base}/openai/deployments/{quote(model, safe='')}/{operation}",
            urlencode({"api-version": version}) if version else "")


def _anthropic_path(base: str, operation: str, model: str, version: str | None) -> tuple[str, str]:
    prefix = base if base.endswith("/v1") else f"{base}/v1"
    return f"{prefix}/{operation}", ""


def _v1_path(base: str, operation: str, model: str, version: str | None) -> tuple[str, str]:
    """Servers whose OpenAI-compatible API lives under /v1 of the base LiteLLM is given
    (Ollama: LiteLLM's own ollama/ calls its native API at the same base)."""
    prefix = base if base.endswith("/v1") else f"{base}/v1"
    return f"{prefix}/{operation}", ""


def _bedrock_invoke_path(base: str, operation: str, model: str, version: str | None) -> tuple[str, str]:
    # The model id's ':' (anthropic.claude-...-v1:0) escaped, as AWS's own SDKs send it.
    return f"{base}/model/{quote(model, safe='')}/{operation}", ""


def _bedrock_openai_path(base: str, operation: str, model: str, version: str | None) -> tuple[str, str]:
    return f"{base}/openai/v1/{operation}", ""


def _gemini_path(base: str, operation: str, model: str, version: str | None) -> tuple[str, str]:
    prefix = base if base.endswith(("/v1", "/v1beta")) else f"{base}/v1beta"
    return f"{prefix}/models/{quote(model, safe='')}:{operation}", ""


@dataclass(frozen=True)
class Provider:
    api_format: str                  # the request format it reads
    credential_header: str           # "authorization" carries "Bearer <key>"; others the key itself
    default_base: str | None         # None: api_base is required
    build_path: PathBuilder = _openai_path
    model_in_path: bool = False      # the path names the model (Azure deployments, Gemini models)
    takes_organization: bool = False  # OpenAI's organization header (litellm_params.organization)
    default_headers: tuple[tuple[str, str], ...] = ()  # added when the client sent none
    # Other request formats it reads; for BEDROCK_INVOKE deployments an Anthropic Messages
    # request is rewritten into the invoke body (see routing.py).
    also_reads: tuple[str, ...] = ()
    aws_service: str | None = None   # requests are signed by Envoy for this AWS service (SigV4)
    operations: tuple[str, ...] | None = None  # the only operations it serves (None: any of its format)
    hosted_anthropic: HostedAnthropic | None = None

    def reads(self, api_format: str) -> bool:
        return api_format == self.api_format or api_format in self.also_reads

    def credential(self, api_key: str) -> tuple[str, str]:
        assert self.credential_header, "a provider signed by Envoy takes no key"
        value = f"Bearer {api_key}" if self.credential_header == "authorization" else api_key
        return (self.credential_header, value)


def _openai_compatible(base: str | None) -> Provider:
    return Provider(OPENAI, "authorization", base, takes_organization=True)


PROVIDERS: dict[str, Provider] = {
    "openai": _openai_compatible("https://api.openai.com/v1"),
    "azure": Provider(OPENAI, "api-key", None, _azure_path, model_in_path=True),
    "anthropic": Provider(ANTHROPIC, "x-api-key", "https://api.anthropic.com", _anthropic_path,
                          default_headers=(("anthropic-version", ANTHROPIC_VERSION),)),
    "gemini": Provider(GEMINI, "x-goog-api-key", "https://generativelanguage.googleapis.com", _gemini_path,
                       model_in_path=True),
    "groq": _openai_compatible("https://api.groq.com/openai/v1"),
    "mistral": _openai_compatible("https://api.mistral.ai/v1"),
    "deepseek": _openai_compatible("https://api.deepseek.com/v1"),
    "together_ai": _openai_compatible("https://api.together.xyz/v1"),
    "fireworks_ai": _openai_compatible("https://api.fireworks.ai/inference/v1"),
    "openrouter": _openai_compatible("https://openrouter.ai/api/v1"),
    "xai": _openai_compatible("https://api.x.ai/v1"),
    "perplexity": _openai_compatible("https://api.perplexity.ai"),
    "cerebras": _openai_compatible("https://api.cerebras.ai/v1"),
    "deepinfra": _openai_compatible("https://api.deepinfra.com/v1/openai"),
    "nvidia_nim": _openai_compatible("https://integrate.api.nvidia.com/v1"),
    "sambanova": _openai_compatible("https://api.sambanova.ai/v1"),
    "ollama": Provider(OPENAI, "authorization", "http://localhost:11434", _v1_path),
    "ollama_chat": Provider(OPENAI, "authorization", "http://localhost:11434", _v1_path),
    "lm_studio": Provider(OPENAI, "authorization", "http://localhost:1234", _v1_path),
}
# Bedrock, by model family (see bedrock_flavour): no credential of the sidecar's, Envoy
# signs each request with the AWS credential chain of its own environment.
BEDROCK_FLAVOURS: dict[str, Provider] = {
    "anthropic": Provider(BEDROCK_INVOKE, "", None, _bedrock_invoke_path, model_in_path=True,
                          also_reads=(ANTHROPIC,), aws_service="bedrock",
                          operations=("invoke", "invoke-with-response-stream", "messages"),
                          hosted_anthropic=BEDROCK_ANTHROPIC),
    "openai": Provider(OPENAI, "", None, _bedrock_openai_path, aws_service="bedrock",
                       operations=("chat/completions",)),
}
def _vertex_openai_path(base: str, operation: str, model: str, version: str | None) -> tuple[str, str]:
    return f"{base}/endpoints/openapi/{operation}", ""


def _vertex_anthropic_path(base: str, operation: str, model: str, version: str | None) -> tuple[str, str]:
    return f"{base}/publishers/anthropic/models/{quote(model, safe='@')}:{operation}", ""


# Vertex AI, by model family: the api_base ends in /v1/projects/{project}/locations/{location};
# the credential is an OAuth token the sidecar refreshes (tokens.py).
VERTEX_FLAVOURS: dict[str, Provider] = {
    "gemini": Provider(OPENAI, "authorization", None, _vertex_openai_path, operations=("chat/completions",)),
    "claude": Provider(VERTEX_RAW_PREDICT, "authorization", None, _vertex_anthropic_path, model_in_path=True,
                       also_reads=(ANTHROPIC,), operations=("rawPredict", "streamRawPredict", "messages"),
                       hosted_anthropic=VERTEX_ANTHROPIC),
}


def vertex_flavour(provider_model: str) -> tuple[str, str | None]:
    """The Vertex provider record's key for a model id, or why it cannot be routed."""
    model = provider_model.removeprefix("google/")
    for family in VERTEX_FLAVOURS:
        if model.startswith(family):
            return family, None
    return "", (f"Vertex AI model {provider_model!r}: the gateway serves Gemini (Vertex's OpenAI-compatible API) "
                "and Claude (rawPredict) on Vertex; other models need format translation")


# Cross-region inference profiles prefix the model id with a geography.
_INFERENCE_PROFILE = ("us.", "eu.", "apac.", "us-gov.", "global.", "jp.", "au.", "ca.")


VERTEX = ("vertex_ai", "vertex_ai_beta")


def bedrock_flavour(provider_model: str) -> tuple[str, str | None]:
    """The Bedrock provider record's key for a model id, or why it cannot be routed."""
    model = provider_model.removeprefix("invoke/")
    if model.startswith("converse/"):
        return "", "Bedrock's Converse API needs format translation, which the gateway does not do"
    for geo in _INFERENCE_PROFILE:
        model = model.removeprefix(geo)
    family = model.split(".", 1)[0]
    if family in BEDROCK_FLAVOURS:
        return family, None
    return "", (f"Bedrock model family {family!r} reads a format of its own; the gateway serves Anthropic models "
                f"(InvokeModel) and OpenAI models (Bedrock's OpenAI-compatible API) on Bedrock")
# Providers LiteLLM knows that read a format of their own, or sign requests in a way the
# gateway does not (yet): their deployments load as unavailable, with this reason.
UNSUPPORTED: dict[str, str] = {
    **{name: "SageMaker endpoints are not supported yet" for name in ("sagemaker", "sagemaker_chat")},
    "bedrock_converse": "Bedrock's Converse API needs format translation, which the gateway does not do",
    **{name: "its API is not OpenAI-, Anthropic- or Gemini-compatible, and the gateway does not translate formats"
       for name in ("cohere", "cohere_chat", "replicate", "huggingface", "ai21", "nlp_cloud", "aleph_alpha",
                    "petals", "baseten", "cloudflare", "watsonx", "predibase", "triton", "clarifai",
                    "oobabooga", "palm", "vllm")},
}
# Any other prefix is an OpenAI-compatible server at the deployment's own api_base.
OTHER = _openai_compatible(None)


def provider(name: str, provider_model: str = "") -> Provider:
    if name == "bedrock":
        return BEDROCK_FLAVOURS[bedrock_flavour(provider_model)[0]]
    if name in VERTEX:
        return VERTEX_FLAVOURS[vertex_flavour(provider_model)[0]]
    return PROVIDERS.get(name, OTHER)


def unsupported(name: str) -> str | None:
    """Why deployments of provider ``name`` cannot be routed, or None."""
    reason = UNSUPPORTED.get(name)
    return f"provider {name!r}: {reason}" if reason else None


def default_base(name: str) -> str | None:
    return provider(name).default_base


def base_problem(api_base: str) -> str | None:
    """What is wrong with a base URL, without repeating it: a URL may carry a secret (a
    query key, a password), and these reasons reach logs, /model/info and callers."""
    parts = urlsplit(api_base)
    if parts.scheme not in ("http", "https"):
        return "is not an http(s) URL"
    if not parts.hostname:
        return "names no host"
    if parts.username is not None or parts.password is not None:
        return "must not carry user info (credentials belong in api_key)"
    if parts.query or parts.fragment:
        return "must not carry a query or fragment"
    try:
        _ = parts.port  # parsing it is the check
    except ValueError:
        return "has an invalid port"
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


# A value read from the environment where it is used: LiteLLM's "os.environ/NAME".
ENV_PREFIX = "os.environ/"
# The litellm_params that hold credentials: sealed when stored, never shown, the only ones
# a runtime model may fill from the environment.
CREDENTIAL_NAME = re.compile(r"key|secret|token|credential|passw|auth", re.I)
NOT_CREDENTIALS = frozenset({"max_tokens", "tpm", "rpm", "aws_region_name", "use_azure_ad"})


def is_credential(name: str) -> bool:
    return bool(CREDENTIAL_NAME.search(name)) and name not in NOT_CREDENTIALS and "cost_per" not in name


def upstream(api_base: str) -> Upstream:
    parts = urlsplit(api_base)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Upstream(parts.scheme, parts.hostname or "", port, parts.path.rstrip("/"))
