"""Command line: ``extauthz serve``, ``extauthz check-config`` and ``extauthz envoy-config``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from typing import Any

from extauthz import config as config_module
from extauthz.config import Config, ConfigError, setting_path
from extauthz.domain import providers
from extauthz.records import connection
from extauthz.telemetry import logs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="extauthz", description="LLM model access control for Envoy.")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the ext_authz gRPC service and the admin API")
    serve.add_argument("--config", required=True, help="config.yaml (LiteLLM format)")
    serve.add_argument("--redis-url", help="overrides extauthz_settings.redis_url and $EXTAUTHZ_REDIS_URL")
    serve.add_argument("--grpc-port", type=int, help="Check and health service port (default 9000)")
    serve.add_argument("--admin-port", type=int, help="admin API port (default 4001)")
    serve.add_argument("--workers", type=int, help="processes sharing the ports (SO_REUSEPORT; default 1)")
    serve.add_argument("--ready-file", help="once serving, write the bound ports there as JSON (with port 0: "
                                            "any free port)")
    serve.add_argument("--log-level", default="INFO")

    check = sub.add_parser("check-config", help="load the config and report what the gateway makes of it")
    check.add_argument("--config", required=True)
    check.add_argument("--strict", action="store_true",
                       help="also exit 1 on a warning or a deployment that is not routable")

    render = sub.add_parser("envoy-config", help="print an Envoy bootstrap for this config")
    render.add_argument("--config", required=True)
    render.add_argument("--listen-port", type=int)
    render.add_argument("--listen-host", help="the address Envoy's listener binds (default 0.0.0.0)")
    render.add_argument("--authz-port", type=int)
    render.add_argument("--admin-port", type=int)
    render.add_argument("--envoy-admin-port", type=int)

    splice = sub.add_parser("istio-envoyfilter", help="print the EnvoyFilter that runs the model splice on an Istio "
                                                      "gateway (deploy/istio/splice-envoyfilter.yaml)")
    splice.add_argument("--namespace", default="istio-system")
    splice.add_argument("--selector", default="istio=ingressgateway", help="the gateway pods' label, key=value")

    mesh = sub.add_parser("istio-mesh-config", help="merge extauthz's extension providers into a mesh config read "
                                                    "on stdin, keeping every other provider")
    mesh.add_argument("--providers", required=True,
                      help="deploy/istio/mesh-config.yaml (or a file of extensionProviders)")
    mesh.add_argument("--format", default="mesh", choices=("mesh", "helm", "istiooperator"),
                      help="what stdin is: the istio ConfigMap's mesh (default), istiod's Helm values, an "
                           "IstioOperator")
    mesh.add_argument("--configmap-patch", action="store_true",
                      help="print a merge patch of the istio ConfigMap (kubectl patch --type merge)")
    return p


def with_overrides(config: Config, **overrides: object) -> Config:
    given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(config, settings=dataclasses.replace(config.settings, **given)) if given else config


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("istio-envoyfilter", "istio-mesh-config"):
        return istio_command(args)
    try:
        # Rendering Envoy's config needs no credentials; serving and checking read them.
        config = config_module.load(args.config, require_secrets=args.command != "envoy-config")
    except ConfigError as e:
        print(f"extauthz: invalid config: {e}", file=sys.stderr)
        return 2
    logs.setup(getattr(args, "log_level", "WARNING"), config.settings.log_format)
    log = logging.getLogger("extauthz")
    if args.command == "check-config":
        return check_config(config, args.strict)
    for warning in config.warnings:
        log.warning("config: %s", warning)

    if args.command == "envoy-config":
        from extauthz.envoy.render import render_yaml
        try:
            rendered = render_yaml(config, listen_port=args.listen_port, authz_port=args.authz_port,
                                   admin_port=args.admin_port, envoy_admin_port=args.envoy_admin_port,
                                   listen_host=args.listen_host)
        except (OSError, ValueError) as e:  # an identity provider's discovery document unreachable or wrong
            print(f"extauthz: cannot render the Envoy config: {e}", file=sys.stderr)
            return 2
        sys.stdout.write(rendered)
        return 0

    config = with_overrides(config, redis_url=args.redis_url, grpc_port=args.grpc_port, admin_port=args.admin_port,
                            workers=args.workers)
    s = config.settings
    if s.workers > 1 and (not s.grpc_port or not s.admin_port or args.ready_file):
        print("extauthz: --workers needs fixed gRPC and admin ports (the workers share them) and no --ready-file",
              file=sys.stderr)
        return 2
    if config.settings.workers > 1:
        from extauthz.workers import supervise
        return supervise(config)
    from extauthz.app import StartupError, serve
    try:
        asyncio.run(serve(config, ready_file=args.ready_file))
    except StartupError as e:
        log.error("cannot start: %s", e)  # one line, no traceback: the cause is all there is to say
        return exit_now(1)
    return exit_now(0)


def check_config(config: Config, strict: bool) -> int:
    """One line per deployment, the access groups, then what is not used or enforced."""
    out = sys.stdout
    out.write(f"config {config.path}: loads\n")
    for d in config.deployments:
        where = providers.upstream(d.api_base).authority if d.routable else "-"
        state = "routable" if d.routable else f"NOT ROUTABLE: {d.unavailable}"
        out.write(f"deployment {d.name}  provider={d.provider}  upstream={where}  {state}\n")
    for p in config.pass_through:
        state = "served" if p.routable else f"NOT SERVED: {p.unavailable}"
        out.write(f"pass-through {p.path}  target={p.target}  {state}\n")
    groups: dict[str, list[str]] = {}
    for d in config.deployments:
        for g in d.access_groups:
            if d.model_name not in groups.setdefault(g, []):
                groups[g].append(d.model_name)
    for g, names in sorted(groups.items()):
        out.write(f"access group {g}: {', '.join(names)}\n")
    if config.jwt is not None:
        j = config.jwt
        out.write(f"jwt: keys from {', '.join(j.public_key_urls)}; audience {list(j.audiences) or 'any'}; "
                  f"teams from {j.team_ids_jwt_field or j.team_id_jwt_field or '-'}"
                  f"{f' (default {j.team_id_default})' if j.team_id_default else ''}; roles from "
                  f"{j.roles_jwt_field or '-'} {dict(j.role_mappings) or ''}\n")
    for alias in config.aliases:
        out.write(f"alias {alias.name} -> {alias.target}{' (hidden)' if alias.hidden else ''}\n")
    try:
        out.write(f"redis: {connection.target(config.settings).describe()}\n")
        unusable = None
    except ValueError as e:  # (another parser's message may quote the URL: only ours are shown)
        unusable = str(e) if isinstance(e, connection.UnusableTarget) else f"{type(e).__name__} reading redis_url"
        out.write(f"error: redis: {unusable} (the sidecar would not start)\n")
    for warning in [*config.warnings, *renamed_calls(config)]:
        out.write(f"warning: {warning}\n")
    unpriced = unpriced_deployments(config)
    budgets = budgets_in_settings(config)
    for d in unpriced if budgets else ():
        out.write(f"warning: deployment {d.name} ({d.provider}/{d.provider_model}) has no price, and keys get a budget "
                  f"from {budgets}: a caller with a budget is refused its calls (403 unpriced_model); set "
                  "input_cost_per_token and output_cost_per_token in its model_info\n")
    if unpriced and not budgets:
        out.write(f"note: {len(unpriced)} deployments have no price ({', '.join(d.name for d in unpriced)}): a "
                  "key, team or user with a max_budget is refused their calls (403 unpriced_model)\n")
    for setting, effect in config.unenforced:
        out.write(f"error: {setting_path(setting)} is not enforced by extauthz: {effect}\n")
    unavailable = sum(not d.routable for d in config.deployments)
    unserved = sum(not p.routable for p in config.pass_through)
    out.write(f"{len(config.deployments)} deployments, {unavailable} not routable, "
              + (f"{unserved} pass-through endpoints not served, " if unserved else "")
              + f"{len(config.unenforced)} settings not enforced\n")
    # An error line is a config that will refuse what it was meant to allow (or not start):
    # a CI job running this fails on it; --strict fails on warnings and unroutable too.
    errors = unusable is not None or bool(config.unenforced)
    warned = bool(config.warnings) or bool(renamed_calls(config)) or bool(unavailable or unserved) \
        or bool(budgets and unpriced)
    return 1 if errors or (strict and warned) else 0


def unpriced_deployments(config: Config) -> list[config_module.Deployment]:
    """Routable deployments with no price, their own or LiteLLM's table's (a wildcard's
    price is the model called's, known only then)."""
    from extauthz.usage.prices import price_of
    return [d for d in config.routable if "*" not in d.model_name
            and price_of(d.provider, d.provider_model, d.info) is None]


def budgets_in_settings(config: Config) -> str | None:
    """The config's settings that give keys a budget, named, or None."""
    named = [f"litellm_settings.{section}.max_budget" for section, params in (
        ("default_key_generate_params", config.key_defaults),
        ("upperbound_key_generate_params", config.key_upperbounds))
        if dict(params).get("max_budget") is not None]
    return " and ".join(named) or None


def exit_now(code: int) -> int:
    """Every part has been stopped and awaited: exit without the interpreter's teardown,
    where gRPC's C threads can keep a process alive (seen as a hang after SIGTERM)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def renamed_calls(config: Config) -> list[str]:
    """With body_rewrite off, the calls that will be refused: their provider knows the
    model by another name, which would have to be written into the body."""
    if config.settings.body_rewrite:
        return []
    from extauthz.domain import providers
    renamed = [d.model_name for d in config.routable if d.model_name != d.provider_model
               and not providers.provider(d.provider, d.provider_model).model_in_path]
    aliases = [a.name for a in config.aliases]
    if not renamed and not aliases:
        return []
    return [f"body_rewrite is off: calls to {', '.join(sorted(set(renamed + aliases)))} are refused (400 "
            "model_rewrite_unavailable): their provider knows them by another name, which the proxy cannot write "
            "into the body"]


def istio_command(args: argparse.Namespace) -> int:
    """The Istio helpers: no config to load, YAML in and out."""
    import yaml

    from extauthz.envoy import istio
    if args.command == "istio-envoyfilter":
        key, sep, value = args.selector.partition("=")
        if not sep or not key or not value:
            print("extauthz: --selector must be key=value", file=sys.stderr)
            return 2
        class Literal(yaml.SafeDumper):  # the Lua code as a block operators can read
            pass

        Literal.add_representer(str, lambda d, v: d.represent_scalar(
            "tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))
        sys.stdout.write(yaml.dump(istio.splice_envoy_filter(args.namespace, {key: value}), Dumper=Literal,
                                   sort_keys=False))
        return 0
    try:
        with open(args.providers, encoding="utf-8") as f:  # an IstioOperator, or a list of providers
            doc = yaml.safe_load(f)
        providers = ((doc.get("spec") or {}).get("meshConfig") or {}).get("extensionProviders") \
            or doc["extensionProviders"]
        if args.configmap_patch and args.format != "mesh":
            raise ValueError("--configmap-patch patches the istio ConfigMap: it takes --format mesh")
        merged = istio.merge_providers(yaml.safe_load(sys.stdin.read()) or {}, providers, args.format)
    except (OSError, AttributeError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
        print(f"extauthz: cannot merge the mesh config: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    text = yaml.safe_dump(merged, sort_keys=False)
    sys.stdout.write(istio.configmap_patch(text) + "\n" if args.configmap_patch else text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
