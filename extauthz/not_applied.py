"""The LiteLLM settings a config may carry that the gateway does not apply, each with what a
LiteLLM user loses (check-config and the sidecar's start-up warnings say it per setting).

Settings that decide who may call what are not here: those the gateway does not enforce
refuse requests instead (config.ADMITTING_SETTINGS, RESTRICTING_SETTINGS), and are errors.
"""
from __future__ import annotations

_FALLBACKS = "a failed call is not retried on another model: the client gets the provider's error"
_RETRIES = "the gateway does not retry or time out a call itself: Envoy's route timeout applies (retries: " \
           "the client's SDK retries)"
_CACHE = "responses are not cached: every call reaches the provider and is counted"
_CALLBACKS = "no logging or alerting callbacks: use the decision log, Envoy's access log and the Prometheus " \
             "metrics (docs/observability.md)"
_PARAMS = "request bodies are not adapted to a provider: it reads what the client sent (the model's name " \
          "aside)"
_LOGGING = "logging is set with `extauthz serve --log-level` and extauthz_settings.log_format"
_DATABASE = "no database is read: keys, teams, users and runtime models (store_model_in_db) live in Redis " \
            "(models kept in LiteLLM's database must be written into model_list or added again with /model/new)"
_ALERTS = "no alerts are sent: the shipped Prometheus rules alert on the gateway (deploy/monitoring)"
_SPEND_LOGS = "no per-call spend log: spend is counted in Redis at once; the decision log records each call"
_ROUTER_REDIS = "the gateway's Redis is extauthz_settings.redis_url"
_COOLDOWN = "failing deployments are not cooled down: use Envoy's outlier detection on the provider's cluster"
_STRATEGY = "deployments of one model are chosen at random by their weight (litellm_params.weight)"
_UI = "there is no admin UI: the admin API and LiteLLM's CLI (lite) work"

# Per section: setting -> what is lost. A setting in none of these is reported as "not
# read by extauthz".
NOT_APPLIED: dict[str, dict[str, str]] = {
    "": {  # top-level sections
        "guardrails": "no guardrails run: the gateway decides who may call which model, not what a prompt says",
        **dict.fromkeys(("mcp_servers", "mcp_aliases"), "MCP servers are not served through the gateway"),
        "credential_list": "credentials are given per deployment (litellm_params.api_key: os.environ/NAME)",
        "callback_settings": _CALLBACKS,
        **dict.fromkeys(("search_tools", "vector_store_registry", "files_settings", "finetune_settings",
                         "assistant_settings", "prompts"),
                        "LiteLLM's own endpoints for these are not served; the provider's own are routed as "
                        "any call (docs/access-rules.md)"),
        "include": "included files are not read: put their model_list entries in this file",
        "model_group_settings": _STRATEGY,
    },
    "litellm_settings": {
        **dict.fromkeys(("fallbacks", "context_window_fallbacks", "content_policy_fallbacks", "default_fallbacks"),
                        _FALLBACKS),
        **dict.fromkeys(("num_retries", "request_timeout", "retry_policy", "allowed_fails", "timeout"), _RETRIES),
        **dict.fromkeys(("cache", "cache_params", "enable_caching_on_provider_specific_optional_params"), _CACHE),
        **dict.fromkeys(("success_callback", "failure_callback", "callbacks", "service_callback",
                         "input_callback", "turn_off_message_logging", "redact_user_api_key_info"), _CALLBACKS),
        **dict.fromkeys(("drop_params", "modify_params", "default_internal_user_params"), _PARAMS),
        **dict.fromkeys(("set_verbose", "json_logs"), _LOGGING),
    },
    "general_settings": {
        **dict.fromkeys(("database_url", "database_connection_pool_limit",
                         "database_connection_timeout", "allow_requests_on_db_unavailable",
                         "disable_prisma_schema_update"), _DATABASE),
        **dict.fromkeys(("alerting", "alert_types", "alerting_threshold", "alerting_args", "alert_to_webhook_url",
                         "spend_report_frequency"), _ALERTS),
        **dict.fromkeys(("proxy_batch_write_at", "disable_spend_logs", "disable_error_logs",
                         "store_prompts_in_spend_logs", "maximum_spend_logs_retention_period"), _SPEND_LOGS),
        **dict.fromkeys(("ui_access_mode", "disable_adding_master_key_hash_to_db", "ui_username", "ui_password"), _UI),
        **dict.fromkeys(("background_health_checks", "health_check_interval", "health_check_details"),
                        "the providers are not health-checked by the gateway: Envoy's outlier detection and "
                        "the provider's own errors apply"),
        "infer_model_from_keys": "a key's models are its models list (and its team's)",
    },
    "router_settings": {
        **dict.fromkeys(("fallbacks", "context_window_fallbacks", "content_policy_fallbacks", "default_fallbacks"),
                        _FALLBACKS),
        **dict.fromkeys(("num_retries", "timeout", "retry_policy", "retry_after", "stream_timeout"), _RETRIES),
        **dict.fromkeys(("allowed_fails", "cooldown_time", "allowed_fails_policy", "disable_cooldowns"), _COOLDOWN),
        **dict.fromkeys(("routing_strategy", "routing_strategy_args", "enable_pre_call_checks"), _STRATEGY),
        **dict.fromkeys(("redis_host", "redis_port", "redis_password", "redis_url"), _ROUTER_REDIS),
        "cache_responses": _CACHE,
    },
}


def not_applied(section: str, name: str) -> str:
    """The warning for ``section.name``, a setting the gateway does not apply."""
    lost = NOT_APPLIED.get(section, {}).get(name)
    where = f"{section}.{name}" if section else name
    return f"{where}: not applied by extauthz: {lost}" if lost else f"{where}: not read by extauthz"
