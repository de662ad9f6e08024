"""What a loaded config turns into: the catalog (with its routes and their pre-encoded
answers), the pass-through paths and the master key's hash, built once."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from extauthz.check.catalog import Catalog
from extauthz.check.decision import Deny
from extauthz.tokens import NO_TOKENS, Tokens
from extauthz.config import Config
from extauthz.records.record import hash_token
from extauthz.check.request import PassThroughPaths
from extauthz.check.routing import AdminRoute


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

    @classmethod
    def of(cls, config: Config, tokens: Tokens = NO_TOKENS) -> "Runtime":
        master = hash_token(config.master_key) if config.master_key else None
        catalog = Catalog(config.deployments, config.aliases, config.pass_through, tokens)
        paths = PassThroughPaths(tuple((c.path, c.include_subpath) for c in config.pass_through))
        refusal = None
        if config.refuses_all:
            names = ", ".join(f"general_settings.{n}" for n in config.refuses_all)
            refusal = Deny(403, "unenforced_setting", f"This gateway's config sets {names}, which it does not "
                           "enforce; every request is refused until the operator removes it.")
        admin = AdminRoute.of(config.master_key) if config.master_key else None
        return cls(config, catalog, master, paths, refusal, admin)

    def is_master(self, token_hash: str) -> bool:
        # Comparing digests in constant time keeps the master key's prefix from leaking by timing.
        return self.master_hash is not None and hmac.compare_digest(token_hash, self.master_hash)
