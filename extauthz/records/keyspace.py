"""Where each record and counter lives in Redis: the one place names are made.

Standalone and sentinel (``<p>`` the configured prefix, ``extauthz:`` by default):

- records, their indexes and the audit trail: ``<p>key:<hash>``, ``<p>team:<id>``,
  ``<p>alias:<alias>``, ``<p>keys``, ``<p>audit``, ... (records/store.py lists them);
- counters: ``<p><kind>:<scope>[:...]``, scope ``key:<hash>`` or ``team:<id>`` (its id
  percent-encoded, domain/limits.scope): rate windows, in-flight sets, spend, settled marks.

Cluster: the same names with hash tags, so that every script and transaction touches one
slot while the load spreads over the primaries:

- records, indexes and the audit trail share one slot, ``{<p>}key:<hash>``: an admin write
  reads and writes a key, its team, its user, the alias and listing indexes and appends its
  audit entry in one WATCH/MULTI, which Redis runs on one primary only;
- each caller's counters share the slot of their scope, ``<p>rpm:{key:<hash>}:<minute>``:
  the counters a request takes and settles are spread over the cluster by key and by team.
  A scope's id is percent-encoded, so it holds no brace of its own and no team id can
  choose another's slot or tag.

Records are not spread: they are small (under 1 KiB a key), read once per cache miss and
written by admins. docs/redis.md gives the figures and the limit this sets.
"""

from __future__ import annotations


class Keyspace:
    """Names in Redis (see the module's doc and docs/redis.md)."""

    def __init__(self, prefix: str, cluster: bool = False) -> None:
        if cluster and (not prefix or "{" in prefix or "}" in prefix):
            raise ValueError(f"key_prefix {prefix!r} is empty or holds a brace: in a Redis Cluster the records' "
                             "hash tag is the prefix; choose a non-empty one without { and }")
        self.cluster = cluster
        self.counter_prefix = prefix
        self.prefix = "{" + prefix + "}" if cluster else prefix  # records, indexes, audit

    def counter(self, suffix: str) -> str:
        """A counter's name from its suffix (``rpm:key:<hash>:<minute>``, ...)."""
        return self.counter_prefix + (tagged(suffix) if self.cluster else suffix)

    def settled_mark(self, usage_id: str, scope: str | None) -> str:
        """The suffix of the mark that a report's settlement in this scope was made (a
        cluster settles each scope on its own slot: one mark each; elsewhere one for all)."""
        return f"settled:{scope}:{usage_id}" if self.cluster and scope else f"settled:{usage_id}"

    def hold_record(self, usage_id: str, scope: str | None) -> str:
        """The suffix of the record of what a call held at admission, read back by its
        settlement (in a cluster one per scope's slot, as the settled marks)."""
        return f"hold:{scope}:{usage_id}" if self.cluster and scope else f"hold:{usage_id}"

    def key_id(self, token_hash: str) -> str:
        return f"{self.prefix}key:{token_hash}"

    def team_id(self, team_id: str) -> str:
        return f"{self.prefix}team:{team_id}"

    def alias_id(self, alias: str) -> str:
        """The index of the keys holding an alias: a hash, owner (user_id, "" for none) to key hash."""
        return f"{self.prefix}alias_of:{alias}"

    def legacy_alias_id(self, alias: str) -> str:
        """Where a record from before per-owner aliases named the one key of an alias (read only)."""
        return f"{self.prefix}alias:{alias}"

    def team_keys_id(self, team_id: str) -> str:
        return f"{self.prefix}team_keys:{team_id}"

    def user_id(self, user_id: str) -> str:
        return f"{self.prefix}user:{user_id}"

    def user_keys_id(self, user_id: str) -> str:
        return f"{self.prefix}user_keys:{user_id}"

    @property
    def retired_id(self) -> str:
        """Keys in their grace period, by when Redis drops their records (records/store.py)."""
        return f"{self.prefix}retired"


def scope_of(suffix: str) -> str | None:
    """The scope a counter suffix counts for (``key:<hash>``, ``team:<id>``, ``user:<id>``),
    or None."""
    parts = suffix.split(":", 3)
    return f"{parts[1]}:{parts[2]}" if len(parts) >= 3 and parts[1] in ("key", "team", "user") else None


def tagged(suffix: str) -> str:
    """A counter suffix with its scope as the hash tag: ``rpm:{key:<hash>}:<minute>``."""
    where = scope_of(suffix)
    return suffix if where is None else suffix.replace(where, "{" + where + "}", 1)
