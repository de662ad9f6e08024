"""The model catalog: model groups, access groups and wildcard resolution.

A *model group* is every deployment sharing one ``model_name``. A requested name
resolves to the group of that exact name, or else to the single most specific
wildcard group (``*`` is the only metacharacter; everything else is literal and the
whole name must match). More specific means a longer literal prefix, then a longer
pattern, then earlier in the config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from extauthz.config import Alias, Deployment, PassThroughConfig
from extauthz.memo import Memo
from extauthz.routing import PassThroughRoute, Route

# Entries of an allowed-models list that are not model or group names.
ALL_MODELS = frozenset({"*", "all-proxy-models"})
ALL_TEAM_MODELS = "all-team-models"
SPECIAL_ENTRIES = ALL_MODELS | {ALL_TEAM_MODELS}


@lru_cache(maxsize=4096)
def wildcard(pattern: str) -> re.Pattern[str]:
    """Compile a ``*`` pattern; every other character matches only itself."""
    return re.compile("(.*)".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def matches(pattern: str, name: str) -> bool:
    return wildcard(pattern).fullmatch(name) is not None


@dataclass(frozen=True)
class ModelGroup:
    name: str
    deployments: tuple[Deployment, ...]
    access_groups: frozenset[str]

    @property
    def is_pattern(self) -> bool:
        return "*" in self.name


@dataclass(frozen=True)
class Resolution:
    """A requested name and the group that serves it; ``capture`` is what ``*`` matched."""

    requested: str
    group: ModelGroup
    capture: str | None = None
    alias_of: str | None = None  # the model group an alias named


class Catalog:
    def __init__(self, deployments: tuple[Deployment, ...], aliases: tuple[Alias, ...] = (),
                 pass_through: tuple[PassThroughConfig, ...] = ()) -> None:
        by_name: dict[str, list[Deployment]] = {}
        for d in deployments:
            by_name.setdefault(d.model_name, []).append(d)
        self.groups: dict[str, ModelGroup] = {
            name: ModelGroup(name, tuple(ds), frozenset(g for d in ds for g in d.access_groups))
            for name, ds in by_name.items()
        }
        order = {name: i for i, name in enumerate(self.groups)}
        self.patterns: tuple[ModelGroup, ...] = tuple(sorted(
            (g for g in self.groups.values() if g.is_pattern),
            key=lambda g: (-len(g.name.split("*", 1)[0]), -len(g.name), order[g.name]),
        ))
        members: dict[str, list[str]] = {}
        for group in self.groups.values():
            for access_group in sorted(group.access_groups):
                members.setdefault(access_group, []).append(group.name)
        self.access_groups: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in members.items()}
        self.aliases: dict[str, Alias] = {a.name: a for a in aliases}
        self.routes: dict[int, Route] = {d.index: Route.of(d) for d in deployments}
        self.pass_through: tuple[PassThroughRoute, ...] = tuple(PassThroughRoute.of(c) for c in pass_through)
        self.resolve = lru_cache(maxsize=65536)(self._resolve)
        self.visible: Memo[tuple[str, ...]] = Memo(4096)  # (key models, team models) -> visible names

    def _resolve(self, name: str) -> Resolution | None:
        group = self.groups.get(name)
        if group is not None:
            return Resolution(name, group)
        alias = self.aliases.get(name)
        if alias is not None:
            return Resolution(name, self.groups[alias.target], alias_of=alias.target)
        for group in self.patterns:
            m = wildcard(group.name).fullmatch(name)
            if m is not None:
                return Resolution(name, group, m.group(1))
        return None

    def model_names(self) -> list[str]:
        return list(self.groups)

    def knows_entry(self, entry: str) -> bool:
        """Whether an allowed-models entry means something here (admin API validation)."""
        return (entry in SPECIAL_ENTRIES or entry in self.access_groups or "*" in entry
                or self.resolve(entry) is not None)
