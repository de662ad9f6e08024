"""What a loaded config turns into: the catalog (with its routes and their pre-encoded
answers), the pass-through paths, the master key's hash and each route's price, built once."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Mapping

from extauthz.check.catalog import Catalog
from extauthz.check.request import PassThroughPaths
from extauthz.check.routing import AdminRoute, Proxy, Route
from extauthz.config import Config, setting_path
from extauthz.domain.deny import Deny
from extauthz.domain.record import hash_token
from extauthz.tokens import NO_TOKENS, Tokens
from extauthz.usage.prices import Price, free_of_charge, price_of

MISSING = object()


@dataclass(frozen=True)
class Runtime:
    config: Config
    catalog: Catalog
    master_hash: str | None
    pass_through: PassThroughPaths
    # Set while the config holds a setting that restricts callers and is not enforced:
    # every LLM request gets this refusal instead of being let through past the rule.
    refusal: Deny | None = None
    # A JWT admin's way into the admin API (None without a master key).
    admin_route: AdminRoute | None = field(default=None, repr=False)
    # Route id -> USD per token (None: unpriced, or a wildcard route's, priced per model).
    prices: Mapping[str, Price | None] = field(default_factory=dict, repr=False)
    wildcard_routes: Mapping[str, Route] = field(default_factory=dict, repr=False)
    wildcard_prices: dict[tuple[str, str], Price | None] = field(default_factory=dict, repr=False)
    # Routes whose deployment the config prices at zero (self-hosted, say): budgets do not
    # apply to their calls, as LiteLLM skips its budget checks for zero-cost models.
    free_routes: frozenset[str] = frozenset()

    @classmethod
    def of(cls, config: Config, tokens: Tokens = NO_TOKENS) -> "Runtime":
        master = hash_token(config.master_key) if config.master_key else None
        catalog = Catalog(config.deployments, config.aliases, config.pass_through, tokens,
                          Proxy(config.settings.upstream_authority, config.settings.body_rewrite))
        paths = PassThroughPaths(tuple((c.path, c.include_subpath) for c in config.pass_through))
        refusal = None
        if config.refuses_all:
            names = ", ".join(setting_path(n) for n in config.refuses_all)
            refusal = Deny(403, "unenforced_setting", f"This gateway's config sets {names}, which it does not "
                           "enforce; every request is refused until the operator removes it.")
        admin = AdminRoute.of(config.master_key) if config.master_key else None
        prices = {r.route_id: price_of(r.deployment.provider, r.deployment.provider_model, r.deployment.info)
                  for r in catalog.routes.values()}
        wildcards = {r.route_id: r for r in catalog.routes.values() if "*" in r.deployment.provider_model}
        free = frozenset(r.route_id for r in catalog.routes.values() if free_of_charge(r.deployment.info))
        return cls(config, catalog, master, paths, refusal, admin, prices, wildcards, {}, free)

    def price(self, route_id: str, model: str) -> Price | None:
        """A settled call's price: its route's; a wildcard route's (``openai/*``) is the
        price of the provider model the request named (``openai/gpt-4o`` -> ``gpt-4o``)."""
        route = self.wildcard_routes.get(route_id)
        if route is None:
            return self.prices.get(route_id)
        found = self.wildcard_prices.get((route_id, model), MISSING)
        if found is MISSING:
            resolution = self.catalog.resolve(model)
            capture = resolution.capture if resolution is not None else None
            d = route.deployment
            found = price_of(d.provider, route.provider_model(capture), d.info) if capture is not None \
                else price_of(d.provider, d.provider_model, d.info)   # only its own price, if any
            if len(self.wildcard_prices) < 10_000:  # bounded: the models requested are the client's choice
                self.wildcard_prices[(route_id, model)] = found
        return found  # type: ignore[return-value]

    def is_master(self, token_hash: str) -> bool:
        # Comparing digests in constant time keeps the master key's prefix from leaking by timing.
        return self.master_hash is not None and hmac.compare_digest(token_hash, self.master_hash)
