"""What a loaded config turns into: the catalog (with its routes and their pre-encoded
answers), the pass-through paths and the master key's hash, built once."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from extauthz.check.catalog import Catalog
from extauthz.config import Config
from extauthz.records.record import hash_token
from extauthz.check.request import PassThroughPaths


@dataclass(frozen=True)
class Runtime:
    config: Config
    catalog: Catalog
    master_hash: str | None
    pass_through: PassThroughPaths

    @classmethod
    def of(cls, config: Config) -> "Runtime":
        master = hash_token(config.master_key) if config.master_key else None
        catalog = Catalog(config.deployments, config.aliases, config.pass_through)
        paths = PassThroughPaths(tuple((c.path, c.include_subpath) for c in config.pass_through))
        return cls(config, catalog, master, paths)

    def is_master(self, token_hash: str) -> bool:
        # Comparing digests in constant time keeps the master key's prefix from leaking by timing.
        return self.master_hash is not None and hmac.compare_digest(token_hash, self.master_hash)
