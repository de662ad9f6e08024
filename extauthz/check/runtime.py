"""What a loaded config turns into: the catalog and the master key's hash, built once."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from extauthz.check.catalog import Catalog
from extauthz.config import Config
from extauthz.records.record import hash_token
from extauthz.check.request import PassThroughPaths
from extauthz.check.responses import allow_prefix


@dataclass(frozen=True)
class Runtime:
    config: Config
    catalog: Catalog
    master_hash: str | None
    pass_through: PassThroughPaths
    # Route id -> the serialized CheckResponse part every allow to that route shares.
    allow_prefixes: dict[str, bytes]

    @classmethod
    def of(cls, config: Config) -> "Runtime":
        master = hash_token(config.master_key) if config.master_key else None
        catalog = Catalog(config.deployments, config.aliases, config.pass_through)
        paths = PassThroughPaths(tuple((c.path, c.include_subpath) for c in config.pass_through))
        routes = [*catalog.routes.values(), *catalog.pass_through]
        prefixes = {r.route_id: allow_prefix(r.headers, r.headers_to_remove) for r in routes}
        return cls(config, catalog, master, paths, prefixes)

    def is_master(self, token_hash: str) -> bool:
        # Comparing digests in constant time keeps the master key's prefix from leaking by timing.
        return self.master_hash is not None and hmac.compare_digest(token_hash, self.master_hash)
