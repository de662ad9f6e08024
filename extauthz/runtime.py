"""What a loaded config turns into: the catalog and the master key's hash, built once."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from extauthz.catalog import Catalog
from extauthz.config import Config
from extauthz.records import hash_token


@dataclass(frozen=True)
class Runtime:
    config: Config
    catalog: Catalog
    master_hash: str | None

    @classmethod
    def of(cls, config: Config) -> "Runtime":
        master = hash_token(config.master_key) if config.master_key else None
        return cls(config, Catalog(config.deployments), master)

    def is_master(self, token_hash: str) -> bool:
        # Comparing digests in constant time keeps the master key's prefix from leaking by timing.
        return self.master_hash is not None and hmac.compare_digest(token_hash, self.master_hash)
