"""Load and validate config.yaml into frozen dataclasses.

The file is a LiteLLM proxy config (``model_list``, ``general_settings``,
``router_settings``...) plus an optional ``extauthz_settings`` section for this
service. A problem is reported as ``ConfigError`` naming the file, the YAML path
and what is wrong, so the process can refuse to start with a useful message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from extauthz.domain import providers, route_access, wildcard
from extauthz.domain.endpoints import OPERATIONS, classify, model_call_segment, unsafe_path
from extauthz.domain.providers import ENV_PREFIX
from extauthz.not_applied import not_applied
from extauthz.tokens import TokenSpec, google_info, missing_library

DISCOVERY_SUFFIX = "/.well-known/openid-configuration"

# LiteLLM sections that a config may carry and that this service does not use.
IGNORED_SECTIONS = frozenset({
    "callback_settings",
    "guardrails", "credential_list", "mcp_servers", "mcp_aliases", "search_tools",
    "vector_store_registry", "files_settings", "finetune_settings", "assistant_settings",
    "include", "prompts", "model_group_settings",
})
USED_SECTIONS = frozenset({"model_list", "general_settings", "router_settings", "extauthz_settings", "litellm_settings",
                           "environment_variables"})
MODEL_ENTRY_KEYS = frozenset({"model_name", "litellm_params", "model_info"})
# general_settings that decide who may call what and that the gateway does not enforce.
# Those that admit callers another way (tokens, custom code) admit no one here: such a
# caller presents no virtual key and is refused. Those that restrict who may call what
# would be lifted by ignoring them, so while one is set every LLM request is refused.
ADMITTING_SETTINGS = {
    "enable_jwt_auth": "JWT callers are refused (401): litellm_jwtauth.public_key_url (or $JWT_PUBLIC_KEY_URL) "
                       "names no keys to verify them with",
    "litellm_jwtauth": "JWT callers are refused (401): only virtual keys and the master key are checked",
    "custom_auth": "callers admitted by custom auth code are refused (401): only virtual keys are checked",
    "enable_oauth2_auth": "OAuth2 callers are refused (401): only virtual keys are checked",
    "enable_oauth2_proxy_auth": "OAuth2-proxy callers are refused (401): only virtual keys are checked",
}
# LiteLLM's proxy-wide capacity limits: not who may call what, so a warning, not a refusal.
PROXY_WIDE_LIMITS = ("max_parallel_requests", "global_max_parallel_requests")
# litellm_settings (a section otherwise not read) that restrict callers: LiteLLM's proxy-wide
# budget and its end users' budgets. Budgets here are on keys and teams (domain/budgets.py).
RESTRICTING_LITELLM_SETTINGS = ("max_budget", "max_end_user_budget")
# litellm_settings read for /key/generate (admin/key_params.py): the values a key gets when
# the request does not say, and the most it may ask for. Their fields, as LiteLLM's.
KEY_BOUND_NUMBERS = ("max_budget", "max_parallel_requests", "tpm_limit", "rpm_limit")
KEY_BOUND_DURATIONS = ("budget_duration", "duration")
KEY_DEFAULT_FIELDS = (*KEY_BOUND_NUMBERS, *KEY_BOUND_DURATIONS, "user_id", "team_id", "models", "metadata")
KEY_PARAMS = ("default_key_generate_params", "upperbound_key_generate_params")
KEY_DURATION = re.compile(r"[0-9]{1,6}(s|m|h|d|w|mo)")
RESTRICTING_SETTINGS = ("allowed_routes", "admin_only_routes", "allowed_ips", "enforce_user_param",
                        "public_routes", "admin_allowed_routes", "user_header_name",
                        # (a user's budget binds its personal keys here, as by default in LiteLLM)
                        "apply_user_budget_to_team_keys")
# Every general_settings key the gateway reads (applied, or refusing while set); any other
# is reported as not applied (not_applied.py).
GENERAL_SETTINGS_READ = frozenset({"master_key", "enable_jwt_auth", "litellm_jwtauth", "role_permissions",
                                   "pass_through_endpoints", "store_model_in_db", *ADMITTING_SETTINGS,
                                   *RESTRICTING_SETTINGS, *PROXY_WIDE_LIMITS})
# LiteLLM's switch for models managed at runtime (/model/new...), also read from its environment.
STORE_MODEL_IN_DB_ENV = "STORE_MODEL_IN_DB"
# A Bedrock deployment's own AWS identity: Envoy signs with its own (its environment, IRSA,
# an instance role), so a deployment naming another cannot be honoured. Only references to
# the standard environment variables, which Envoy reads itself, are the same identity.
AWS_IDENTITY_PARAMS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "aws_role_name",
                       "aws_session_name", "aws_profile_name", "aws_web_identity_token", "aws_sts_endpoint",
                       "aws_external_id")
AWS_STANDARD_ENV = {"aws_access_key_id": "os.environ/AWS_ACCESS_KEY_ID",
                    "aws_secret_access_key": "os.environ/AWS_SECRET_ACCESS_KEY",
                    "aws_session_token": "os.environ/AWS_SESSION_TOKEN"}
# litellm_params this service reads; any other parameter is a provider knob it ignores.
# Per-token prices LiteLLM reads from litellm_params as well as model_info (usage/prices.py).
PRICE_PARAMS = ("input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost",
                "cache_creation_input_token_cost")
USED_PARAMS = frozenset({"model", "api_key", "api_base", "api_version", "weight", "organization", *PRICE_PARAMS,
                         "aws_region_name", "aws_bedrock_runtime_endpoint", "vertex_project", "vertex_location",
                         "vertex_credentials", "azure_ad_token", "tenant_id", "client_id", "client_secret",
                         "azure_authority_host", "model_id", *AWS_IDENTITY_PARAMS})
# Where LiteLLM looks for a Bedrock deployment's region when litellm_params names none.
AWS_REGION_ENV = ("AWS_REGION_NAME", "AWS_REGION", "AWS_DEFAULT_REGION")


class ConfigError(ValueError):
    def __init__(self, file: str, yaml_path: str, problem: str) -> None:
        self.file, self.yaml_path, self.problem = file, yaml_path, problem
        super().__init__(f"{file}: {yaml_path or '<top>'}: {problem}")


class UnsetVariable(ConfigError):
    """An ``os.environ/NAME`` reference to a variable that is not set."""

    def __init__(self, file: str, where: str, name: str) -> None:
        super().__init__(file, where, f"environment variable {name} is not set")
        self.name, self.where = name, where


class Unroutable(Exception):
    """Why the gateway cannot route a deployment (the config still loads)."""


def setting(default: Any, *, minimum: float | None = None, maximum: float | None = None,
            choices: tuple[str, ...] = (), off: int | None = None, secret: bool = False) -> Any:
    """A setting's default and the values it admits; ``off``: a value outside ``minimum``
    that turns the thing off (``metrics_port: 0``); ``secret``: never in a repr."""
    return field(default=default, repr=not secret,
                 metadata={"min": minimum, "max": maximum, "choices": choices, "off": off})


PORT: dict[str, Any] = {"minimum": 1, "maximum": 65535}


@dataclass(frozen=True)
class Settings:
    """The sidecar's own settings (``extauthz_settings``; each also ``EXTAUTHZ_<NAME>``)."""

    redis_url: str = setting("redis://127.0.0.1:6379/0")  # redis://, rediss:// (TLS) or unix://
    # The ACL user and its password (or in the URL); the file form for a mounted secret.
    redis_username: str = setting("")
    redis_password: str = setting("", secret=True)
    redis_password_file: str = setting("")
    # TLS (a rediss:// URL): the CA to verify the server with (else the system's), a client
    # certificate and key, and whether the server's name must match its certificate.
    redis_tls_ca_file: str = setting("")
    redis_tls_cert_file: str = setting("")
    redis_tls_key_file: str = setting("")
    redis_tls_verify_hostname: bool = setting(True)
    # sentinel: the primary named redis_sentinel_master, as redis_sentinels report it (the
    # URL then gives the scheme, credentials and database, not the host). cluster: a Redis
    # Cluster, found from the URL's host and redis_cluster_nodes (more seeds, for a start
    # while one node is down).
    redis_mode: str = setting("standalone", choices=("standalone", "sentinel", "cluster"))
    redis_sentinels: tuple = setting(())  # ["host:port", ...] (in the environment: comma-separated)
    redis_sentinel_master: str = setting("mymaster")
    redis_sentinel_password: str = setting("", secret=True)
    redis_cluster_nodes: tuple = setting(())  # ["host:port", ...] (in the environment: comma-separated)
    # Admin writes wait for this many replicas to acknowledge them (Redis WAIT), up to the
    # timeout; one not acknowledged in time is answered 202 (committed on the primary only).
    redis_wait_replicas: int = setting(0, minimum=0)
    redis_wait_timeout_ms: int = setting(1000, minimum=1)
    redis_timeout_ms: int = setting(250, minimum=1)
    cache_max_entries: int = setting(100_000, minimum=0)
    cache_negative_ttl_s: float = setting(5.0, minimum=0)
    max_stale_s: float = setting(60.0, minimum=0)
    workers: int = setting(1, minimum=1)
    metrics_host: str = setting("0.0.0.0")
    metrics_port: int = setting(9464, **PORT, off=0)
    log_format: str = setting("json", choices=("json", "text"))
    log_allowed: bool = setting(False)
    tracing: str = setting("none", choices=("none", "otlp", "console"))
    key_prefix: str = setting("extauthz:")
    grpc_host: str = setting("127.0.0.1")
    grpc_port: int = setting(9000, **PORT)
    # gRPC health (grpc.health.v1) on a port of its own, for the kubelet's probes, which
    # reach the pod's IP: Check (whose allows carry provider credentials) can then stay on
    # 127.0.0.1 in a sidecar. 0: health is served on the Check port only.
    health_host: str = setting("0.0.0.0")
    health_port: int = setting(0, **PORT, off=0)
    # TLS on the Check port (Check and usage reports: an allow carries provider credentials)
    # where proxies reach it over the network (standalone mode): the server's certificate
    # and key, and with grpc_tls_client_ca_file a client certificate signed by that CA is
    # required (mutual TLS). Empty: plaintext, for loopback (a sidecar).
    grpc_tls_cert_file: str = setting("")
    grpc_tls_key_file: str = setting("")
    grpc_tls_client_ca_file: str = setting("")
    admin_host: str = setting("127.0.0.1")
    admin_port: int = setting(4001, **PORT)
    max_request_bytes: int = setting(10 * 1024 * 1024, minimum=1)  # also Envoy's buffer limit
    # Every key's and team's spend counted (as in LiteLLM); off: only those with a budget or
    # a rate limit (the others' responses are then not read at all).
    spend_tracking: bool = setting(True)
    # The output tokens a call is assumed to ask for when neither it (max_tokens), its
    # deployment (model_info.max_output_tokens) nor the price table says: a hold's bound
    # (usage/estimate.py).
    default_max_output_tokens: int = setting(16384, minimum=1)
    # Whether the Envoy in front sends usage reports (envoy/usage.lua and the gRPC access
    # log, as rendered). Without them budgets, tpm limits and max_parallel_requests cannot
    # be enforced: their callers are refused (403 usage_not_reported), never let through.
    usage_reports: bool = setting(True)
    # Whether an allow sets :authority to the provider's host (the rendered Envoy routes by
    # the cluster header and sends that host). Off behind a gateway that matches routes
    # again after the check (Istio clearRouteCache, Envoy Gateway recomputeRoute): there a
    # new host would match no route for the gateway's own hostname, so each route sets the
    # provider's host itself (VirtualService rewrite.authority, HTTPRoute URLRewrite).
    upstream_authority: bool = setting(True)
    # Whether the proxy in front can rewrite the body's model (splice.lua: the rendered
    # Envoy; Istio with deploy/istio/splice-envoyfilter.yaml). Off (Envoy Gateway): a call
    # whose provider knows the model by another name is refused (400
    # model_rewrite_unavailable), never sent under the client's name.
    body_rewrite: bool = setting(True)
    # shadow: model and limit denials are recorded (outcome shadow_deny) and the request
    # goes on, for rolling enforcement out on live traffic (check/shadow.py).
    enforcement: str = setting("enforce", choices=("enforce", "shadow"))
    shutdown_grace_s: float = setting(10.0, minimum=0)
    # The audit trail's size in Redis (the stream <key_prefix>audit): its oldest entries go
    # past this many entries or bytes of entries.
    audit_max_entries: int = setting(100_000, minimum=1)
    audit_max_bytes: int = setting(64 * 1024 * 1024, minimum=1024)
    # Self-service bounds (users acting for themselves: a JWT's user, an internal user's
    # key): the keys one user may own, and its admin writes per minute. 0: no bound.
    max_keys_per_user: int = setting(100, minimum=0)
    admin_writes_per_minute: int = setting(60, minimum=0)
    # A record's metadata (any caller): its JSON size and nesting depth at most.
    max_metadata_bytes: int = setting(16 * 1024, minimum=2)
    max_metadata_depth: int = setting(8, minimum=1)


@dataclass(frozen=True)
class EnvoySettings:
    """Settings only the rendered Envoy bootstrap reads (same section, same overrides)."""

    listen_port: int = setting(4000, **PORT)
    # The address Envoy's listener binds: every interface (a container's, a pod's), or
    # 127.0.0.1 for a gateway on a workstation (make run).
    listen_host: str = setting("0.0.0.0")
    envoy_admin_port: int = setting(9901, **PORT)
    # A listener on every address that serves Envoy's /stats/prometheus and nothing else
    # of the admin API (which stays on 127.0.0.1), for Prometheus to scrape. 0: none.
    envoy_stats_port: int = setting(0, **PORT, off=0)
    authz_timeout_ms: int = setting(1000, minimum=1)
    # Envoy's heap, in bytes, at which it refuses new requests (95 %) after giving memory
    # back (90 %): set it below the container's memory limit. 0: no memory-based actions.
    envoy_max_heap_bytes: int = setting(0, minimum=0)
    # Envoy's side of a Check port with TLS (grpc_tls_*): the CA that signed the sidecar's
    # certificate, the name the certificate must carry (also the SNI), and Envoy's own
    # client certificate and key for mutual TLS.
    authz_tls_ca_file: str = setting("")
    authz_tls_server_name: str = setting("")
    authz_tls_cert_file: str = setting("")
    authz_tls_key_file: str = setting("")
    # The CAs Envoy checks providers' certificates against (static and dynamic clusters):
    # the system's; a bundle with a private CA for servers on an organisation's own PKI.
    upstream_ca_file: str = setting("/etc/ssl/certs/ca-certificates.crt")


SETTING_FIELDS = {f.name: f for cls in (Settings, EnvoySettings) for f in dataclasses.fields(cls)}
# Environment variables that override a setting: EXTAUTHZ_<FIELD IN UPPER CASE>.
SETTINGS_ENV = {name: "EXTAUTHZ_" + name.upper() for name in SETTING_FIELDS}


@dataclass(frozen=True)
class Deployment:
    index: int
    model_name: str
    provider: str
    provider_model: str
    api_base: str
    api_version: str | None
    api_key: str | None = field(repr=False)
    access_groups: tuple[str, ...]
    weight: float
    organization: str | None = None  # OpenAI's organization header, set by the gateway
    unavailable: str | None = None   # why the gateway cannot route it (then api_base is "")
    region: str | None = None        # AWS region Envoy signs Bedrock requests for
    token: TokenSpec | None = None   # an OAuth token the sidecar keeps fresh (Vertex, Entra ID)
    key_is_bearer: bool = False      # api_key is a token sent as Authorization: Bearer (azure_ad_token)
    # model_info as written (mode, pricing, token limits...), for /model_group/info.
    info: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False, repr=False)
    # A runtime model's id (general_settings.store_model_in_db): None for the config's.
    model_id: str | None = None
    # Sent through Envoy's dynamic forward proxy cluster (a host its rendered config does not name).
    dynamic: bool = False

    @property
    def routable(self) -> bool:
        return self.unavailable is None

    @property
    def name(self) -> str:
        """Stable identifier for logs and metadata: config position and public name; a
        runtime model's id (no colon in it: the two never meet)."""
        return self.model_id if self.model_id is not None else f"{self.index}:{self.model_name}"


@dataclass(frozen=True)
class Alias:
    """``router_settings.model_group_alias``: a requested name served by another model group."""

    name: str
    target: str
    hidden: bool = False


@dataclass(frozen=True)
class PassThroughConfig:
    """``general_settings.pass_through_endpoints``: a path forwarded after key authentication."""

    path: str
    target: str
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    include_subpath: bool = False
    # Why it is not served (its requests are refused, 503; Envoy gets no cluster for it),
    # or None: the rest of the config serves, as with an unroutable deployment.
    unavailable: str | None = None

    @property
    def routable(self) -> bool:
        return self.unavailable is None


@dataclass(frozen=True)
class JwtAuth:
    """``general_settings.litellm_jwtauth`` with ``enable_jwt_auth: true``: Envoy validates
    the tokens (jwt_authn), the sidecar maps their verified claims to teams and roles."""

    public_key_urls: tuple[str, ...]          # JWKS URLs or OIDC discovery documents
    issuer: str | None = None
    # The issuer each URL's keys sign for: a discovery document's is its URL without
    # /.well-known/openid-configuration (OIDC Discovery requires it); a JWKS URL's is given.
    issuers: tuple[str, ...] = ()
    audiences: tuple[str, ...] = ()
    team_id_jwt_field: str | None = None      # claim paths may be nested: "realm_access.roles"
    team_ids_jwt_field: str | None = None
    team_id_default: str | None = None
    user_id_jwt_field: str | None = "sub"     # (LiteLLM's default is none; "sub" names the caller)
    # Whether the config sets user_id_jwt_field. LiteLLM reads a user record only then: a
    # record's proxy_admin role counts, and without user_id_upsert only users with a
    # record (/user/new) are admitted. Left unset, the token's "sub" only names the caller.
    user_id_field_set: bool = False
    user_email_jwt_field: str | None = None
    org_id_jwt_field: str | None = None
    roles_jwt_field: str | None = None
    role_mappings: tuple[tuple[str, str], ...] = ()   # IdP role -> internal role
    admin_jwt_scope: str | None = None
    enforce_rbac: bool = False
    team_id_upsert: bool = False
    user_id_upsert: bool = False
    @property
    def user_record_required(self) -> bool:
        return self.user_id_field_set and not self.user_id_upsert

    # Beyond LiteLLM: scope -> models or access groups (wildcards allowed), intersected
    # with the team's models.
    scope_mappings: tuple[tuple[str, tuple[str, ...]], ...] = ()
    clock_skew_s: int = 60
    # LiteLLM's public_key_ttl: how long Envoy keeps a fetched JWKS before fetching it again.
    public_key_ttl_s: float = 120
    # The paths each kind of caller may use (check/route_access.py patterns); None: no restriction
    # beyond its role. Admin: proxy_admin and proxy_admin_viewer; team: the other roles.
    team_allowed_routes: tuple[str, ...] | None = None
    admin_allowed_routes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Config:
    path: str
    deployments: tuple[Deployment, ...]
    master_key: str | None = field(repr=False)
    settings: Settings
    envoy: EnvoySettings = EnvoySettings()
    warnings: tuple[str, ...] = ()
    aliases: tuple[Alias, ...] = ()
    pass_through: tuple[PassThroughConfig, ...] = ()
    # Settings that decide who may call what and are not enforced: (setting, what happens).
    unenforced: tuple[tuple[str, str], ...] = ()
    jwt: JwtAuth | None = None
    # litellm_settings.default_key_generate_params and upperbound_key_generate_params: (field, value).
    key_defaults: tuple[tuple[str, Any], ...] = ()
    key_upperbounds: tuple[tuple[str, Any], ...] = ()
    # litellm_settings.budget_exceeded_status_code: LiteLLM's status for budget_exceeded.
    budget_exceeded_status: int = 422
    # general_settings.store_model_in_db (or $STORE_MODEL_IN_DB): models managed at runtime.
    store_model_in_db: bool = False
    # The variables the config's models read credentials from, each with the upstream
    # clusters it is sent to: all a runtime model may name of the environment.
    credential_hosts: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @property
    def routable(self) -> tuple[Deployment, ...]:
        return tuple(d for d in self.deployments if d.routable)

    @property
    def upstream_bases(self) -> list[str]:
        """Where Envoy sends calls: every routable deployment's base URL and pass-through
        target (a cluster each, by host)."""
        return [d.api_base for d in self.routable] + [p.target for p in self.pass_through if p.routable]

    @property
    def refuses_all(self) -> tuple[str, ...]:
        """The restricting settings set: while any is, every LLM request is refused."""
        return tuple(name for name, _ in self.unenforced if name in RESTRICTING_SETTINGS or name.startswith(
            "litellm_settings."))


def setting_path(name: str) -> str:
    """An unenforced setting's place in the config: general_settings unless it says otherwise."""
    return name if "." in name else f"general_settings.{name}"


def model_call_paths(base_path: str) -> tuple[set[str], tuple[str, ...]]:
    """Where an upstream whose API lives under ``base_path`` serves model calls: exact
    paths (OpenAI and Anthropic operations, with and without /v1) and path prefixes
    (Azure deployments, Gemini models)."""
    exact = {f"{base_path}{v1}/{op}" for op in OPERATIONS for v1 in ("", "/v1")}
    prefixes = tuple(f"{base_path}{p}" for p in ("/openai/deployments/", "/v1beta/models/", "/v1/models/"))
    return exact, prefixes


def model_call_reached(target: str, include_subpath: bool, deployments: tuple[Deployment, ...]) -> str | None:
    """A model-call path that a pass-through to ``target`` reaches (with any subpath a
    client appends when ``include_subpath``), or None. Model calls are known by the
    gateway's own endpoint table, under the base path of every deployment on the same
    upstream and of the provider defaults on the same host."""
    upstream = providers.upstream(target)
    path = upstream.base_path.lower()
    segment = model_call_segment(path)
    if segment is not None:
        return segment
    bases = {""}
    defaults = [p.default_base for p in providers.PROVIDERS.values() if p.default_base]
    for base in [d.api_base for d in deployments if d.routable] + defaults:
        other = providers.upstream(base)
        if (_host(other.host), other.port) == (_host(upstream.host), upstream.port):
            bases.add(other.base_path.lower())
    for base in sorted(bases):
        exact, prefixes = model_call_paths(base)
        if path in exact:
            return path
        if include_subpath:
            for call in sorted(exact):
                if call.startswith(path + "/"):
                    return call
        for prefix in prefixes:
            if path.startswith(prefix) or (include_subpath and prefix.startswith(path + "/")):
                return prefix + "…"
    return None


def _host(name: str) -> str:
    return name.rstrip(".").lower()  # "API.openai.com." is api.openai.com


def load(path: str, environ: Mapping[str, str] | None = None, require_secrets: bool = True) -> Config:
    """Read and validate ``path``. ``require_secrets=False`` tolerates unset secret variables
    (rendering an Envoy config needs no credentials)."""
    environ = os.environ if environ is None else environ
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(path, "", f"cannot read file: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(path, "", f"not valid YAML: {e}") from None
    return _Parser(path, environ, require_secrets).config(raw)


def from_dict(raw: Any, file: str = "<inline>", environ: Mapping[str, str] | None = None) -> Config:
    return _Parser(file, os.environ if environ is None else environ, True).config(raw)


def runtime_deployment(config: Config, model_id: str, entry: Any, unavailable: str | None = None,
                       index: int | None = None, parser: "_Parser | None" = None) -> Deployment:
    """A runtime model's entry read as a model_list entry is (ConfigError for one the config
    would refuse); ``unavailable``: why it cannot be served, known before (kept unroutable)."""
    index = len(config.deployments) if index is None else index
    if unavailable is not None:
        name = entry.get("model_name") if isinstance(entry, dict) else None
        return Deployment(index=index, model_name=name if isinstance(name, str) and name else model_id,
                          provider="", provider_model="", api_base="", api_version=None, api_key=None,
                          access_groups=(), weight=1.0, unavailable=unavailable, model_id=model_id)
    parser = parser or _Parser(config.path, os.environ, True)
    return dataclasses.replace(parser.deployment(index, entry, f"model {model_id}"), model_id=model_id)


def envoy_clusters(config: Config) -> frozenset[str]:
    """The upstream clusters an Envoy rendered from this config has."""
    return frozenset(providers.upstream(base).cluster for base in config.upstream_bases)


def served_by(config: Config, clusters: frozenset[str], dynamic: bool) -> Config:
    """The config with each deployment on a host the running Envoy has no cluster for sent
    through its dynamic forward proxy (``dynamic``: an Envoy rendered with store_model_in_db
    has one), else marked unroutable with the reason (a call is refused with it, not sent
    to a cluster Envoy does not know: a bare 503)."""
    def known(d: Deployment) -> Deployment:
        if not d.routable or providers.upstream(d.api_base).cluster in clusters:
            return d
        if dynamic:
            return dataclasses.replace(d, dynamic=True)
        host = providers.upstream(d.api_base).host
        return dataclasses.replace(d, unavailable=f"the running Envoy has no cluster for {host!r} (a host its "
                                   "rendered config does not name): render Envoy again with it (extauthz "
                                   "envoy-config) and restart it")
    deployments = tuple(known(d) for d in config.deployments)
    return config if deployments == config.deployments else dataclasses.replace(config, deployments=deployments)


def name_taken(config: Config, name: str) -> str | None:
    """Why a runtime model may not be called ``name``: the config's own models and aliases
    keep their names, and a runtime name or pattern may not overlap a pattern of theirs
    (a more specific one would take its calls, and the callers' prompts, elsewhere)."""
    own = [d for d in config.deployments if d.model_id is None]
    if name in {d.model_name for d in own} | {a.name for a in config.aliases}:
        return f"{name!r} is a model of the config file"
    sample = name.replace("*", "x")
    for d in own:
        if "*" not in d.model_name:
            continue
        if wildcard.matches(d.model_name, sample) or ("*" in name and wildcard.matches(name, d.model_name.replace(
                "*", "x"))):
            return f"{name!r} overlaps the config's {d.model_name!r}"
    return None


def with_runtime_models(config: Config, entries: list[tuple[str, Any, str | None]],
                        environ: Mapping[str, str] | None = None) -> Config:
    """The config with runtime models (``(model id, entry, why it cannot be served or
    None)``, credentials opened) after its own, each read as a model_list entry is. One that
    cannot be served is kept, unroutable, with the reason: a bad entry never takes the
    others (or the config's) down. Warnings are the config's only: runtime models are
    reported by the admin API."""
    if not entries:
        return config
    parser = _Parser(config.path, os.environ if environ is None else environ, True)
    runtime: list[Deployment] = []
    seen = {u.cluster: u for u in map(providers.upstream, config.upstream_bases)}
    for offset, (model_id, entry, problem) in enumerate(entries):
        index = len(config.deployments) + offset
        name = entry.get("model_name") if isinstance(entry, dict) else None
        try:
            # (checked when stored; the config may have taken the name since, or a variable gone)
            problem = problem or (name_taken(config, name) if isinstance(name, str) else None)
            deployment = runtime_deployment(config, model_id, entry, problem, index, parser)
        except (ConfigError, ValueError, TypeError, OverflowError) as e:
            deployment = runtime_deployment(config, model_id, {"model_name": name}, getattr(e, "problem", str(e)),
                                            index, parser)
        if deployment.routable:
            upstream = providers.upstream(deployment.api_base)
            other = seen.setdefault(upstream.cluster, upstream)
            if (other.scheme, other.host, other.port) != (upstream.scheme, upstream.host, upstream.port):
                deployment = dataclasses.replace(deployment, unavailable=f"{other.host!r} and {upstream.host!r} map "
                                                 "to one Envoy cluster name; use one spelling of each host")
        runtime.append(deployment)
    return dataclasses.replace(config, deployments=config.deployments + tuple(runtime))


class _Parser:
    def __init__(self, file: str, environ: Mapping[str, str], require_secrets: bool) -> None:
        self.file, self.environ, self.require_secrets = file, environ, require_secrets
        self.warnings: list[str] = []
        self.jwt_problem: str | None = None  # why enable_jwt_auth cannot be honoured
        self.credential_hosts: dict[str, set[str]] = {}

    def error(self, where: str, problem: str) -> ConfigError:
        return ConfigError(self.file, where, problem)

    def mapping(self, value: Any, where: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(where, f"expected a mapping, got {type(value).__name__}")
        return value

    def string(self, value: Any, where: str, secret: bool = False) -> str | None:
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not secret:
            value = str(value)
        if not isinstance(value, str):
            raise self.error(where, f"expected a string, got {type(value).__name__}")
        if value.startswith(ENV_PREFIX):
            name = value[len(ENV_PREFIX):]
            if name in self.environ:
                return self.environ[name]
            if secret and not self.require_secrets:
                return None
            raise UnsetVariable(self.file, where, name)
        return value

    def config(self, raw: Any) -> Config:
        top = self.mapping(raw, "")
        for key in top:
            if key in IGNORED_SECTIONS:
                self.warnings.append(not_applied("", key))
            elif key not in USED_SECTIONS:
                self.warnings.append(f"{key}: unknown top-level section, ignored")
        self.apply_environment_variables(top.get("environment_variables"))
        litellm = self.mapping(top.get("litellm_settings"), "litellm_settings")
        unused = sorted(str(k) for k in litellm if k not in (*KEY_PARAMS, *RESTRICTING_LITELLM_SETTINGS,
                                                              "budget_exceeded_status_code"))
        budget_status = litellm.get("budget_exceeded_status_code", 422)
        if isinstance(budget_status, bool) or not isinstance(budget_status, int) or not 400 <= budget_status <= 599:
            raise self.error("litellm_settings.budget_exceeded_status_code", "must be an HTTP error status "
                             f"(400-599), got {budget_status!r}")
        self.warnings.extend(not_applied("litellm_settings", name) for name in unused)
        key_defaults = self.key_params(litellm, "default_key_generate_params", KEY_DEFAULT_FIELDS)
        key_upperbounds = self.key_params(litellm, "upperbound_key_generate_params",
                                          (*KEY_BOUND_NUMBERS, *KEY_BOUND_DURATIONS))
        models = top.get("model_list")
        if not isinstance(models, list) or not models:
            raise self.error("model_list", "must be a non-empty list of models")
        deployments = tuple(self.deployment(i, entry) for i, entry in enumerate(models))
        general = self.mapping(top.get("general_settings"), "general_settings")
        jwt = self.jwt_auth(general)
        unenforced = self.unenforced(general, jwt is not None) + self.unenforced_litellm(top.get("litellm_settings"))
        for name in PROXY_WIDE_LIMITS:
            if general.get(name) is not None:
                self.warnings.append(f"general_settings.{name}: a proxy-wide limit, not enforced by extauthz (the "
                                     "limits of keys and teams are: max_parallel_requests, rpm_limit, tpm_limit)")
        master_key = self.string(general.get("master_key"), "general_settings.master_key", secret=True)
        if master_key is not None and not master_key:
            raise self.error("general_settings.master_key", "must not be empty")
        settings, envoy = self.settings(self.mapping(top.get("extauthz_settings"), "extauthz_settings"))
        router = self.mapping(top.get("router_settings"), "router_settings")
        self.warnings.extend(not_applied("router_settings", str(k)) for k in sorted(router, key=str)
                             if k != "model_group_alias")
        self.warnings.extend(not_applied("general_settings", str(k)) for k in sorted(general, key=str)
                             if k not in GENERAL_SETTINGS_READ)
        aliases = self.aliases(router.get("model_group_alias"), {d.model_name for d in deployments})
        pass_through = tuple(self.pass_through(i, e, deployments) for i, e in enumerate(
            self.sequence(general.get("pass_through_endpoints"), "general_settings.pass_through_endpoints")))
        self.distinct_clusters([d.api_base for d in deployments if d.routable]
                               + [p.target for p in pass_through if p.routable])
        store_models = general.get("store_model_in_db")
        if isinstance(store_models, str):
            store_models = store_models.strip().lower() == "true"
        if store_models is not None and not isinstance(store_models, bool):
            raise self.error("general_settings.store_model_in_db", f"must be true or false, got {store_models!r}")
        # As LiteLLM: on when the setting or the variable says so.
        store_models = bool(store_models) or self.environ.get(STORE_MODEL_IN_DB_ENV, "").strip().lower() == "true"
        return Config(self.file, deployments, master_key, settings, envoy, tuple(self.warnings), aliases,
                      pass_through, unenforced, jwt, key_defaults, key_upperbounds, budget_status, store_models,
                      {name: frozenset(hosts) for name, hosts in self.credential_hosts.items()})

    def key_params(self, litellm: dict, name: str, fields: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
        """One of LiteLLM's key generation maps, checked: a value that cannot be applied
        refuses the config (a bound silently dropped would let keys past it)."""
        where = f"litellm_settings.{name}"
        given = self.mapping(litellm.get(name), where)
        out = []
        for field_name, value in given.items():
            if field_name not in fields:
                self.warnings.append(f"{where}.{field_name}: not used by extauthz (it reads {', '.join(fields)})")
                continue
            if value is None:
                continue
            if field_name in KEY_BOUND_NUMBERS and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                    or not value >= 0 or value == float("inf")):
                raise self.error(f"{where}.{field_name}", f"must be a number, 0 or more, got {value!r}")
            if field_name in KEY_BOUND_DURATIONS and not (isinstance(value, str) and KEY_DURATION.fullmatch(value)):
                raise self.error(f"{where}.{field_name}", f"must be a duration such as 30d or 1mo, got {value!r}")
            if field_name in ("user_id", "team_id") and not (isinstance(value, str) and value):
                raise self.error(f"{where}.{field_name}", f"must be a string, got {value!r}")
            if field_name == "models" and not (isinstance(value, list) and all(isinstance(m, str) for m in value)):
                raise self.error(f"{where}.models", f"must be a list of model names, got {value!r}")
            if field_name == "metadata" and not isinstance(value, dict):
                raise self.error(f"{where}.metadata", f"must be a mapping, got {value!r}")
            out.append((field_name, value))
        return tuple(out)

    # litellm_jwtauth keys the gateway reads; others are reported (see jwt_auth).
    JWT_KEYS = ("public_key_url", "audience", "issuer", "team_id_jwt_field", "team_ids_jwt_field", "team_id_default",
                "user_id_jwt_field", "user_email_jwt_field", "org_id_jwt_field", "roles_jwt_field", "role_mappings",
                "admin_jwt_scope", "enforce_rbac", "team_id_upsert", "user_id_upsert", "scope_mappings",
                "enforce_scope_based_access",
                # (a token's models are always its teams' here: LiteLLM's switch for that is read as on)
                "enforce_team_based_model_access",
                "clock_skew_s", "public_key_ttl", "team_allowed_routes", "admin_allowed_routes")
    INTERNAL_ROLES = ("proxy_admin", "proxy_admin_viewer", "internal_user", "internal_user_viewer", "team")

    def scope_mappings(self, raw: dict, where: str) -> list[tuple[str, tuple[str, ...]]]:
        """Scopes and the models each grants. LiteLLM's form: a list of ``{scope, models,
        routes}`` with ``enforce_scope_based_access: true`` (it refuses the list without it,
        and so does this); a mapping of scope to models is this gateway's shorter form. A
        scope mapping's ``routes`` are read by neither (reported)."""
        given = raw.get("scope_mappings")
        enforce = raw.get("enforce_scope_based_access", False)
        if not isinstance(enforce, bool):
            raise self.error(f"{where}.enforce_scope_based_access", "expected true or false")
        if isinstance(given, list):
            if not enforce:
                raise self.error(f"{where}.scope_mappings", "a list of scope mappings needs "
                                 "enforce_scope_based_access: true (as LiteLLM requires)")
            pairs = []
            for i, entry in enumerate(given):
                entry = self.mapping(entry, f"{where}.scope_mappings[{i}]")
                unknown = sorted(str(k) for k in entry if k not in ("scope", "models", "routes"))
                if unknown or not isinstance(entry.get("scope"), str) or not entry["scope"]:
                    raise self.error(f"{where}.scope_mappings[{i}]", "needs 'scope' (and 'models'); unknown: "
                                     + (", ".join(unknown) or "none"))
                if entry.get("routes") is not None:
                    self.warnings.append(f"{where}.scope_mappings[{i}].routes: not enforced (nor by LiteLLM, "
                                         "which reads a scope mapping's models only)")
                pairs.append((entry["scope"], entry.get("models") if entry.get("models") is not None else []))
        else:
            pairs = list(self.mapping(given, f"{where}.scope_mappings").items())
            if enforce and not pairs:
                self.warnings.append(f"{where}.enforce_scope_based_access: true without scope_mappings: "
                                     "nothing to enforce")
        scopes = []
        for scope, models in pairs:
            if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
                raise self.error(f"{where}.scope_mappings.{scope}", "expected a list of models or access groups")
            scopes.append((str(scope), tuple(models)))
        return scopes

    def jwt_auth(self, general: dict) -> JwtAuth | None:
        """``enable_jwt_auth`` with its ``litellm_jwtauth`` section, or None when JWTs are off."""
        enabled = general.get("enable_jwt_auth", False)
        if not isinstance(enabled, bool):
            raise self.error("general_settings.enable_jwt_auth", "expected true or false")
        if not enabled:
            return None
        where = "general_settings.litellm_jwtauth"
        raw = self.mapping(general.get("litellm_jwtauth"), where)
        restricting = sorted(k for k in ("public_allowed_routes", "user_allowed_routes", "user_allowed_email_domain")
                             if raw.get(k) not in (None, [], ""))
        if general.get("role_permissions") not in (None, [], {}):  # LiteLLM's routes and models per JWT role
            restricting.append("general_settings.role_permissions")
        if restricting:
            # They narrow what tokens may do: ignoring them would widen it.
            self.jwt_problem = f"{where}: {', '.join(restricting)} not supported yet"
            return None
        unused = sorted(str(k) for k in raw if k not in self.JWT_KEYS)
        if unused:
            self.warnings.append(f"{where}: not supported by extauthz, ignored: {', '.join(unused)}")
        urls = raw.get("public_key_url") or self.environ.get("JWT_PUBLIC_KEY_URL")
        if isinstance(urls, str):
            urls = [u.strip() for u in urls.split(",") if u.strip()]
        if not urls:  # JWTs asked for, but no keys to check them with: none is accepted
            return None
        if not isinstance(urls, list):
            raise self.error(f"{where}.public_key_url", "expected the identity provider's JWKS URL or OIDC "
                             "discovery document (a list, or comma-separated)")
        issuer = self.string(raw.get("issuer"), f"{where}.issuer")
        sources: list[tuple[str, str]] = []
        for i, entry in enumerate(urls):
            # An entry is a URL, or {url, issuer} for a JWKS URL of its own issuer.
            url, own_issuer = (entry.get("url"), entry.get("issuer")) if isinstance(entry, dict) else (entry, None)
            if not isinstance(url, str) or (own_issuer is not None and not isinstance(own_issuer, str)):
                raise self.error(f"{where}.public_key_url[{i}]", "expected a URL or {url, issuer}")
            problem = providers.base_problem(url) or (None if url.startswith(("https://", "http://127.",
                                                                              "http://localhost")) else "must be https")
            if problem:
                raise self.error(f"{where}.public_key_url[{i}]", problem)
            if url.rstrip("/").endswith(DISCOVERY_SUFFIX):
                source_issuer = url.rstrip("/")[:-len(DISCOVERY_SUFFIX)]
            elif own_issuer or (issuer and len(urls) == 1):
                source_issuer = own_issuer or issuer or ""
            else:
                # A key set without an issuer would admit any token its keys sign, whatever
                # issuer it names (Entra's common key set signs for every tenant).
                self.jwt_problem = (f"{where}.public_key_url[{i}] is a JWKS URL without an issuer: give "
                                    "{url, issuer} (or, with one URL, issuer)")
                return None
            # As configured: Envoy compares "iss" byte for byte (Auth0's ends in "/").
            sources.append((url, source_issuer))
        audience = raw.get("audience") or self.environ.get("JWT_AUDIENCE")
        audiences = [audience] if isinstance(audience, str) else audience or []
        if not isinstance(audiences, list) or not all(isinstance(a, str) and a for a in audiences):
            raise self.error(f"{where}.audience", "expected a string or a list of strings")
        if not audiences:
            # Without one, a token the IdP issued for any other application would do.
            self.jwt_problem = f"{where}.audience is not set: give the audience tokens for this gateway carry"
            return None
        text: dict[str, Any] = {k: self.string(raw.get(k), f"{where}.{k}") for k in (
            "team_id_jwt_field", "team_ids_jwt_field", "team_id_default", "user_id_jwt_field",
            "user_email_jwt_field", "org_id_jwt_field", "roles_jwt_field", "admin_jwt_scope")}
        mappings = []
        for i, m in enumerate(self.sequence(raw.get("role_mappings"), f"{where}.role_mappings")):
            m = self.mapping(m, f"{where}.role_mappings[{i}]")
            role, internal = m.get("role"), m.get("internal_role")
            if not isinstance(role, str) or internal not in self.INTERNAL_ROLES:
                raise self.error(f"{where}.role_mappings[{i}]", "needs 'role' and an 'internal_role' of "
                                 + ", ".join(self.INTERNAL_ROLES))
            mappings.append((role, internal))
        scopes = self.scope_mappings(raw, where)
        flags: dict[str, Any] = {}
        for k in ("enforce_rbac", "team_id_upsert", "user_id_upsert"):
            value = raw.get(k, False)
            if not isinstance(value, bool):
                raise self.error(f"{where}.{k}", "expected true or false")
            flags[k] = value
        skew = raw.get("clock_skew_s", 60)
        if isinstance(skew, bool) or not isinstance(skew, int) or not 0 <= skew <= 600:
            raise self.error(f"{where}.clock_skew_s", "expected seconds, 0 to 600")
        allowed_routes: dict[str, Any] = {}
        for k in ("team_allowed_routes", "admin_allowed_routes"):
            if raw.get(k) is not None:
                problem = route_access.problem(raw[k])
                if problem:  # a restriction that cannot be read would be lifted: no JWT is accepted
                    self.jwt_problem = f"{where}.{k}: {problem}"
                    return None
                allowed_routes[k] = tuple(raw[k])
        ttl = raw.get("public_key_ttl", 120)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 1 <= ttl <= 86400:
            raise self.error(f"{where}.public_key_ttl", "expected seconds, 1 to 86400")
        return JwtAuth(public_key_urls=tuple(u for u, _ in sources), issuers=tuple(i for _, i in sources),
                       issuer=issuer, audiences=tuple(audiences), role_mappings=tuple(mappings),
                       scope_mappings=tuple(scopes), clock_skew_s=skew, public_key_ttl_s=float(ttl),
                       **allowed_routes,
                       **{k: v for k, v in text.items() if k != "user_id_jwt_field"},
                       user_id_jwt_field=text["user_id_jwt_field"] or "sub",
                       user_id_field_set=text["user_id_jwt_field"] is not None,
                       **flags)

    def apply_environment_variables(self, raw: Any) -> None:
        """LiteLLM sets ``environment_variables`` before it reads ``os.environ/`` references
        (and a value set there wins over the process's own); so do references here. The
        process environment itself is left alone."""
        values = self.mapping(raw, "environment_variables")
        if values:
            merged = dict(self.environ)
            for name, value in values.items():
                if isinstance(value, (bool, int, float)):  # (REDIS_PORT: 6379: LiteLLM sets str(value))
                    value = str(value)
                merged[str(name)] = self.string(value, f"environment_variables.{name}", secret=True) or ""
            self.environ = merged

    def unenforced(self, general: dict, jwt_enforced: bool) -> tuple[tuple[str, str], ...]:
        out = []
        if self.jwt_problem:
            out.append(("enable_jwt_auth", f"JWT callers are refused (401): {self.jwt_problem}"))
        for name, effect in ADMITTING_SETTINGS.items():
            if (jwt_enforced or self.jwt_problem) and name in ("enable_jwt_auth", "litellm_jwtauth"):
                continue
            if general.get(name) not in (None, False, "", {}, []):
                out.append((name, effect))
        for name in RESTRICTING_SETTINGS:
            if general.get(name) not in (None, False, "", {}, []):
                out.append((name, "not enforced by extauthz, so every request but /health/ is refused (403) while "
                                  "it is set; remove it, or enforce the rule with keys' and teams' models"))
        return tuple(out)

    @staticmethod
    def unenforced_litellm(section: Any) -> tuple[tuple[str, str], ...]:
        if not isinstance(section, dict):
            return ()
        return tuple((f"litellm_settings.{name}", "a proxy-wide budget is not enforced by extauthz, so every "
                      "request but /health/ is refused (403) while it is set; put the budget on teams or keys "
                      "(max_budget, budget_duration), which are enforced")
                     for name in RESTRICTING_LITELLM_SETTINGS if section.get(name) not in (None, False, "", 0.0))

    def distinct_clusters(self, bases: list[str]) -> None:
        """Envoy routes on the cluster name: two upstreams sharing one would send one's
        credential to the other's host."""
        seen: dict[str, providers.Upstream] = {}
        for base in bases:
            upstream = providers.upstream(base)
            other = seen.setdefault(upstream.cluster, upstream)
            if (other.scheme, other.host, other.port) != (upstream.scheme, upstream.host, upstream.port):
                raise self.error("model_list", f"{other.host!r} and {upstream.host!r} map to one Envoy cluster name "
                                 f"({upstream.cluster}); use one spelling of each host")

    def sequence(self, value: Any, where: str) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(where, f"expected a list, got {type(value).__name__}")
        return value

    def aliases(self, raw: Any, model_names: set[str]) -> tuple[Alias, ...]:
        out = []
        for name, value in self.mapping(raw, "router_settings.model_group_alias").items():
            where = f"router_settings.model_group_alias.{name}"
            hidden = False
            if isinstance(value, dict):
                unknown = sorted(set(value) - {"model", "hidden"})
                if unknown:
                    raise self.error(f"{where}.{unknown[0]}", "unknown key (expected model, hidden)")
                hidden = value.get("hidden", False)
                if not isinstance(hidden, bool):
                    raise self.error(f"{where}.hidden", "expected true or false")
                value = value.get("model")
            if not isinstance(value, str) or value not in model_names:
                raise self.error(where, f"must name a model_name of model_list, got {value!r}")
            if name in model_names:
                raise self.error(where, "an alias cannot have the name of a model in model_list")
            out.append(Alias(str(name), value, hidden))
        return tuple(out)

    def pass_through(self, index: int, entry: Any, deployments: tuple[Deployment, ...]) -> PassThroughConfig:
        where = f"general_settings.pass_through_endpoints[{index}]"
        entry = self.mapping(entry, where)
        for key in entry:
            if key not in ("path", "target", "headers", "include_subpath"):
                self.warnings.append(f"{where}.{key}: not used by extauthz (key authentication is always on)")
        path = self.string(entry.get("path"), f"{where}.path")
        if not path or not path.startswith("/") or "?" in path:
            raise self.error(f"{where}.path", "must be a path starting with '/'")
        path = path.rstrip("/") or "/"
        if path == "/" or classify(path) is not None or classify(path + "/x") is not None:
            raise self.error(f"{where}.path", f"{path!r} overlaps the LLM endpoints, whose model is checked")
        target = self.string(entry.get("target"), f"{where}.target")
        if not target:
            raise self.error(f"{where}.target", "is required")
        problem = providers.base_problem(target)
        if problem:
            raise self.error(f"{where}.target", problem)
        if unsafe_path(providers.upstream(target).base_path):
            raise self.error(f"{where}.target", "must be a plain path: no percent-escapes but of letters, digits, "
                             "'-', '_', '~', no dot or empty segments, ';' or '\\'")
        subpath = entry.get("include_subpath", False)
        if not isinstance(subpath, bool):
            raise self.error(f"{where}.include_subpath", "expected true or false")
        headers = self.mapping(entry.get("headers"), f"{where}.headers")
        pairs = tuple((str(k).lower(), self.header_value(v, f"{where}.headers.{k}")) for k, v in headers.items())
        reached = model_call_reached(target, subpath, deployments)
        # Served, it would forward model calls without checking the model: loaded as
        # unavailable (refused, and reported), the rest of the config serves.
        unavailable = (f"{target!r}{' and its subpaths' if subpath else ''} reach {reached!r}, a model call at a "
                       "provider, and a pass-through forwards without checking the model") if reached else None
        return PassThroughConfig(path, target, pairs, subpath, unavailable)

    def deployment(self, index: int, entry: Any, where: str | None = None) -> Deployment:
        where = where or f"model_list[{index}]"
        entry = self.mapping(entry, where)
        unused = sorted(str(k) for k in entry if k not in MODEL_ENTRY_KEYS)
        if unused:  # LiteLLM reads entry-level tpm, rpm and others; the gateway does not
            self.warnings.append(f"{where}: not used by extauthz: {', '.join(unused)}")
        model_name = self.string(entry.get("model_name"), f"{where}.model_name")
        if not model_name:
            raise self.error(f"{where}.model_name", "is required")
        params = self.mapping(entry.get("litellm_params"), f"{where}.litellm_params")
        ignored = sorted(str(k) for k in params if k not in USED_PARAMS)
        if ignored:
            self.warnings.append(f"{where}.litellm_params: not used by extauthz: {', '.join(ignored)}")
        model = self.plain_string(params.get("model"), f"{where}.litellm_params.model")
        if not model:
            raise self.error(f"{where}.litellm_params.model", "is required (provider/model)")
        provider, _, provider_model = model.partition("/") if "/" in model else ("openai", "", model)
        if provider == "bedrock":
            provider_model = provider_model.removeprefix("invoke/")  # LiteLLM's "use InvokeModel" marker
        if "*" in provider_model and "*" not in model_name:
            raise self.error(f"{where}.litellm_params.model", "a wildcard model needs a wildcard model_name")
        weight = params.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise self.error(f"{where}.litellm_params.weight", "must be a positive number")
        info = self.mapping(entry.get("model_info"), f"{where}.model_info")
        groups = info.get("access_groups", [])
        if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
            raise self.error(f"{where}.model_info.access_groups", "must be a list of non-empty strings")
        prices = {**{k: info[k] for k in PRICE_PARAMS if k in info},
                  **{k: params[k] for k in PRICE_PARAMS if k in params}}  # litellm_params' win, as in LiteLLM
        for name, value in prices.items():
            prices[name] = self.price(value, f"{where}.{'litellm_params' if name in params else 'model_info'}.{name}")
        deployment = Deployment(index=index, model_name=model_name, provider=provider, provider_model=provider_model,
                                api_base="", api_version=None, api_key=None, access_groups=tuple(groups),
                                weight=float(weight), info={**{str(k): v for k, v in info.items()}, **prices})
        try:
            deployment = dataclasses.replace(deployment, **self.route_params(where, provider, provider_model, params))
        except Unroutable as e:  # reported by serve and check-config, with the deployment
            return dataclasses.replace(deployment, unavailable=str(e))
        for name, value in params.items():
            if providers.is_credential(str(name)) and isinstance(value, str) and value.startswith(ENV_PREFIX):
                self.credential_hosts.setdefault(value[len(ENV_PREFIX):], set()).add(
                    providers.upstream(deployment.api_base).cluster)
        return deployment

    def price(self, value: Any, where: str) -> float:
        """A price per token: a number, or a string of one (YAML reads 5e-6 as a string, and
        LiteLLM takes it); anything else would leave spend uncounted, so it is refused."""
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number < 1:
            raise self.error(where, f"must be a price in USD per token (a number from 0 to 1), got {value!r}")
        return float(number)

    def route_params(self, where: str, provider: str, provider_model: str, params: dict) -> dict[str, Any]:
        """What routing needs of a deployment, or ``Unroutable``: the rest of the config
        still loads, and this deployment is reported as unavailable."""
        unsupported = providers.unsupported(provider)
        if unsupported:
            raise Unroutable(unsupported)
        if not provider_model:
            raise Unroutable(f"{provider + '/'!r} names no model (for azure/: the deployment name)")
        if provider == "bedrock":
            return self.bedrock_params(where, provider_model, params)
        if provider in providers.VERTEX:
            return self.vertex_params(where, provider_model, params)
        try:
            api_base = self.string(params.get("api_base"), f"{where}.litellm_params.api_base")
            api_key = self.string(params.get("api_key"), f"{where}.litellm_params.api_key", secret=True)
            api_version = self.string(params.get("api_version"), f"{where}.litellm_params.api_version")
            organization = self.string(params.get("organization"), f"{where}.litellm_params.organization")
        except UnsetVariable as e:
            raise Unroutable(f"environment variable {e.name} ({e.where}) is not set") from None
        api_base = api_base or providers.default_base(provider)
        if not api_base:
            raise Unroutable(f"provider {provider!r} has no default base URL: set litellm_params.api_base")
        problem = providers.base_problem(api_base)
        if problem:
            raise Unroutable(f"litellm_params.api_base: {problem}")
        token, bearer = None, False
        if provider == "azure" and not api_key:
            api_key, token = self.entra(where, params)
            bearer = api_key is not None
        return {"api_base": api_base, "api_key": api_key, "api_version": api_version,
                "organization": organization or None, "token": token, "key_is_bearer": bearer}

    def entra(self, where: str, params: dict) -> tuple[str | None, TokenSpec | None]:
        """Azure without an api_key: a static Entra ID token (azure_ad_token), or a client
        credential whose tokens the sidecar refreshes; else no credential at all."""
        try:
            static = self.string(params.get("azure_ad_token"), f"{where}.litellm_params.azure_ad_token", secret=True)
            tenant, client, secret = (self.string(params.get(k), f"{where}.litellm_params.{k}",
                                                  secret=k == "client_secret")
                                      for k in ("tenant_id", "client_id", "client_secret"))
            authority = self.string(params.get("azure_authority_host"), f"{where}.litellm_params.azure_authority_host")
        except UnsetVariable as e:
            raise Unroutable(f"environment variable {e.name} ({e.where}) is not set") from None
        if static:
            if static.startswith("oidc/"):
                raise Unroutable("azure_ad_token 'oidc/...' (token exchange) is not supported; use a client credential")
            return static, None
        if tenant or client or secret:
            if not (tenant and client and secret):
                raise Unroutable("an Entra ID client credential needs tenant_id, client_id and client_secret")
            problem = missing_library("azure")
            if problem:
                raise Unroutable(problem)
            return None, TokenSpec("azure", tenant_id=tenant, client_id=client, client_secret=secret,
                                   authority=authority)
        return None, None

    def vertex_params(self, where: str, provider_model: str, params: dict) -> dict[str, Any]:
        """Vertex AI: the project and location's endpoint, and a Google OAuth token the
        sidecar refreshes (from vertex_credentials, else application default credentials:
        workload identity, a metadata server, gcloud's)."""
        family, unsupported = providers.vertex_flavour(provider_model)
        if unsupported:
            raise Unroutable(unsupported)
        raw_credentials = params.get("vertex_credentials")
        if isinstance(raw_credentials, dict):  # LiteLLM takes the document itself too
            raw_credentials = json.dumps(raw_credentials)
        try:
            project, location, base = (self.string(params.get(k), f"{where}.litellm_params.{k}")
                                       for k in ("vertex_project", "vertex_location", "api_base"))
            credentials = self.string(raw_credentials, f"{where}.litellm_params.vertex_credentials", secret=True)
        except UnsetVariable as e:
            raise Unroutable(f"environment variable {e.name} ({e.where}) is not set") from None
        if credentials and google_info(credentials) is None:
            raise Unroutable("litellm_params.vertex_credentials is neither a Google credential JSON (service_account, "
                             "authorized_user, external_account) nor a readable file holding one")
        project = project or self.environ.get("VERTEXAI_PROJECT") or self.environ.get("GOOGLE_CLOUD_PROJECT")
        location = location or self.environ.get("VERTEXAI_LOCATION") or "us-central1"
        if not project or not re.fullmatch(r"[a-z][a-z0-9-]{4,61}[a-z0-9]", project):
            raise Unroutable("Vertex AI needs litellm_params.vertex_project (or $VERTEXAI_PROJECT): a project id")
        if not re.fullmatch(r"[a-z]+(-[a-z]+[0-9]*)*|global", location):
            raise Unroutable("litellm_params.vertex_location is not a location name")
        problem = missing_library("google")
        if problem:
            raise Unroutable(problem)
        host = base or ("https://aiplatform.googleapis.com" if location == "global"
                        else f"https://{location}-aiplatform.googleapis.com")
        api_base = f"{host.rstrip('/')}/v1/projects/{project}/locations/{location}"
        problem = providers.base_problem(api_base)
        if problem:
            raise Unroutable(f"litellm_params.api_base: {problem}")
        model = f"google/{provider_model.removeprefix('google/')}" if family == "gemini" else provider_model
        return {"api_base": api_base, "provider_model": model, "token": TokenSpec("google", credentials or None)}

    def bedrock_params(self, where: str, provider_model: str, params: dict) -> dict[str, Any]:
        """Bedrock: the region's runtime endpoint (or the one given), no credential: Envoy
        signs with the AWS credential chain of its own environment."""
        _, unsupported = providers.bedrock_flavour(provider_model)
        if unsupported:
            raise Unroutable(unsupported)
        own = sorted(k for k in AWS_IDENTITY_PARAMS if params.get(k) and params.get(k) != AWS_STANDARD_ENV.get(k))
        if own:
            raise Unroutable(f"litellm_params {', '.join(own)} name an AWS identity of the deployment's own; Envoy "
                             "signs with the AWS identity of its environment (AWS_ACCESS_KEY_ID..., IRSA, an "
                             "instance role): remove them, and give Envoy that identity")
        try:
            region = self.string(params.get("aws_region_name"), f"{where}.litellm_params.aws_region_name")
            endpoint = self.string(params.get("aws_bedrock_runtime_endpoint") or params.get("api_base"),
                                   f"{where}.litellm_params.aws_bedrock_runtime_endpoint")
        except UnsetVariable as e:
            raise Unroutable(f"environment variable {e.name} ({e.where}) is not set") from None
        region = region or next((self.environ[n] for n in AWS_REGION_ENV if self.environ.get(n)), None)
        if not region or not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-[0-9]", region):
            raise Unroutable("Bedrock needs litellm_params.aws_region_name (or $AWS_REGION_NAME / $AWS_REGION): "
                             "a region name like us-east-1")
        api_base = endpoint or f"https://bedrock-runtime.{region}.amazonaws.com"
        problem = providers.base_problem(api_base)
        if problem:
            raise Unroutable(f"litellm_params.aws_bedrock_runtime_endpoint: {problem}")
        try:  # provisioned throughput, custom and imported models are called by their ARN
            model_id = self.string(params.get("model_id"), f"{where}.litellm_params.model_id")
        except UnsetVariable as e:
            raise Unroutable(f"environment variable {e.name} ({e.where}) is not set") from None
        return {"api_base": api_base.rstrip("/"), "region": region,
                **({"provider_model": model_id} if model_id else {})}

    def header_value(self, value: Any, where: str) -> str:
        """A pass-through header; as in LiteLLM, a reference may end a longer value
        (``Bearer os.environ/COHERE_API_KEY``)."""
        if isinstance(value, str) and ENV_PREFIX in value and not value.startswith(ENV_PREFIX):
            start = value.index(ENV_PREFIX)
            return value[:start] + (self.string(value[start:], where, secret=True) or "")
        return self.string(value, where, secret=True) or ""

    def plain_string(self, value: Any, where: str) -> str | None:
        try:
            return self.string(value, where)
        except UnsetVariable as e:
            raise self.error(where, f"environment variable {e.name} is not set") from None

    def settings(self, section: dict) -> tuple[Settings, EnvoySettings]:
        values: dict[str, Any] = {}
        for key, value in section.items():
            if key not in SETTING_FIELDS:
                raise self.error(f"extauthz_settings.{key}",
                                 f"unknown setting (known: {', '.join(sorted(SETTING_FIELDS))})")
            values[key] = self.setting(SETTING_FIELDS[key], value, f"extauthz_settings.{key}")
        for key, env in SETTINGS_ENV.items():
            if env in self.environ:
                values[key] = self.setting(SETTING_FIELDS[key], self.environ[env], f"${env}")
        return tuple(cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
                     for cls in (Settings, EnvoySettings))  # type: ignore[return-value]

    def setting(self, spec: dataclasses.Field, value: Any, where: str) -> Any:
        kind: Any = type(spec.default)  # (every setting has a default: its type is the setting's)
        rules = spec.metadata
        if kind is tuple:  # a list of strings: YAML's list, or the environment's comma-separated text
            items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
                raise self.error(where, "expected a list of strings")
            return tuple(items)
        if isinstance(value, str) and kind not in (str, bool):
            value = self.string(value, where)
            try:
                value = kind(value)
            except ValueError:
                raise self.error(where, f"expected {kind.__name__}, got {value!r}") from None
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise self.error(where, f"expected true or false, got {value!r}")
            value = value.lower() in ("true", "1", "yes")
        if kind is str:
            value = self.string(value, where)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.error(where, f"expected {kind.__name__}, got {type(value).__name__}")
        if rules["choices"] and value not in rules["choices"]:
            raise self.error(where, f"must be {', '.join(rules['choices'][:-1])} or {rules['choices'][-1]}")
        if rules["off"] is not None and value == rules["off"]:
            return value
        low, high = rules["min"], rules["max"]
        if low is not None and value < low:
            must = "must be positive" if low == 1 else "must not be negative"
            raise self.error(where, must + (f" (or {rules['off']}: off)" if rules["off"] is not None else ""))
        if high is not None and value > high:
            raise self.error(where, "not a TCP port" if high == 65535 else f"must be at most {high}")
        return value
