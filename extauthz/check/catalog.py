"""The model catalog: model groups, access groups and wildcard resolution.

A *model group* is every deployment sharing one ``model_name``. A requested name
resolves to the group of that exact name, or else to the single most specific
wildcard group (``*`` is the only metacharacter; everything else is literal and the
whole name must match). More specific means a longer literal prefix, then a longer
pattern, then earlier in the config.

A name that differs from another only in letter case or by a repeated leading path
segment (``openai/O1-mini``, ``openai/openai/o1-mini``) must not reach a less
restricted group than the name it imitates; ``Catalog.variant_of`` finds such names so
the decision can refuse them.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping

from extauthz.check.memo import Memo
from extauthz.check.routing import PassThroughRoute, Proxy, Route
from extauthz.config import Alias, Deployment, PassThroughConfig
from extauthz.domain import providers
from extauthz.domain.model_names import SPECIAL_ENTRIES
from extauthz.domain.wildcard import capture, matches
from extauthz.tokens import NO_TOKENS, Tokens


def canonical_name(name: str) -> str:
    """The form a name's case and separator variants share: compatibility-normalized
    (full-width ``ｏ1`` is ``o1``), casefolded, and without leading path segments that
    repeat the next one (``OpenAI/openai/x`` -> ``openai/x``)."""
    if not name.isascii():
        name = unicodedata.normalize("NFKC", name)
    segments = name.casefold().split("/")
    first = 0
    while first + 1 < len(segments) and segments[first] == segments[first + 1]:
        first += 1
    return "/".join(segments[first:])


@dataclass(frozen=True)
class ModelGroup:
    name: str
    deployments: tuple[Deployment, ...]
    access_groups: frozenset[str]
    routable_deployments: tuple[Deployment, ...] = ()
    # API format -> the routable deployments that read it (a group may mix, say, OpenAI
    # and Bedrock deployments); built at load, read on every allow.
    by_format: Mapping[str, tuple[Deployment, ...]] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, name: str, deployments: tuple[Deployment, ...]) -> "ModelGroup":
        routable = tuple(d for d in deployments if d.routable)
        by_format = {fmt: readers for fmt in providers.API_FORMATS
                     if (readers := tuple(d for d in routable
                                          if providers.provider(d.provider, d.provider_model).reads(fmt)))}
        return cls(name, deployments, frozenset(g for d in deployments for g in d.access_groups), routable, by_format)

    @property
    def is_pattern(self) -> bool:
        return "*" in self.name

    def serving(self, api_format: str) -> tuple[Deployment, ...]:
        """The routable deployments that read requests of ``api_format``; all routable ones
        when none does (routing then says why the request cannot be sent)."""
        return self.by_format.get(api_format) or self.routable_deployments


@dataclass(frozen=True)
class Resolution:
    """A requested name and the group that serves it; ``capture`` is what ``*`` matched."""

    requested: str
    group: ModelGroup
    capture: str | None = None
    alias_of: str | None = None  # the model group an alias named


class Catalog:
    def __init__(self, deployments: tuple[Deployment, ...], aliases: tuple[Alias, ...] = (),
                 pass_through: tuple[PassThroughConfig, ...] = (), tokens: Tokens = NO_TOKENS,
                 proxy: Proxy = Proxy()) -> None:
        by_name: dict[str, list[Deployment]] = {}
        for d in deployments:
            by_name.setdefault(d.model_name, []).append(d)
        self.groups: dict[str, ModelGroup] = {
            name: ModelGroup.of(name, tuple(ds))
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
        self.routes: dict[int, Route] = {d.index: Route.of(d, tokens, proxy) for d in deployments if d.routable}
        self.pass_through: tuple[PassThroughRoute, ...] = tuple(PassThroughRoute.of(c, proxy) for c in pass_through)
        self.resolve = lru_cache(maxsize=65536)(self._resolve)
        # Case-insensitive views for variant_of: a casefolded name can stand for several
        # groups or aliases that differ only in case, so each maps to every group it names.
        folded: dict[str, list[str]] = {}
        for name in self.groups:
            folded.setdefault(name.casefold(), []).append(name)
        for alias in self.aliases.values():
            folded.setdefault(alias.name.casefold(), []).append(alias.target)
        self.folded_names: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in folded.items()}
        self.folded_patterns: tuple[tuple[str, ModelGroup], ...] = tuple(
            (g.name.casefold(), g) for g in self.patterns)
        self.variant_of = lru_cache(maxsize=65536)(self._variant_of)
        self.same_model = lru_cache(maxsize=65536)(self._same_model)
        self.visible: Memo[tuple[str, ...]] = Memo(4096)  # (key models, team models) -> visible names

    def _resolve(self, name: str) -> Resolution | None:
        group = self.groups.get(name)
        if group is not None:
            return Resolution(name, group)
        alias = self.aliases.get(name)
        if alias is not None:
            return Resolution(name, self.groups[alias.target], alias_of=alias.target)
        for group in self.patterns:
            if matches(group.name, name):
                return Resolution(name, group, capture(group.name, name))
        return None

    def _same_model(self, name: str) -> frozenset[str]:
        """Every name a per-model limit or budget (``model_rpm_limit``, ``model_max_budget``)
        may give the model ``name`` asks for: a model group and its aliases are one model,
        whichever of them a limit names and a call asks for. A name a pattern serves is a
        model of its own."""
        resolution = self.resolve(name)
        if resolution is None or resolution.capture is not None:
            return frozenset((name,))
        group = resolution.alias_of or resolution.group.name
        return frozenset((name, group, *(a.name for a in self.aliases.values() if a.target == group)))

    def _variant_of(self, name: str) -> str | None:
        """The model group serving ``name``'s canonical form, when ``resolve(name)``
        reached a different one through a pattern; else None.

        Such a name is a case or separator variant of a name served elsewhere
        (``openai/O1-mini`` reaching ``openai/*`` while ``openai/o1-mini`` belongs to
        ``openai/o1-*``), and the decision refuses it. Only pattern resolutions count:
        an exact model group or alias is a name the config spells out, and its own access
        groups apply. An unknown name, or a canonical form nothing serves, is not a
        variant of anything. Patterns whose names differ only in case all serve the
        canonical form, so a name that one of them matches as spelled is not a variant.
        """
        resolution = self.resolve(name)
        if resolution is None or resolution.capture is None:
            return None  # unknown, or a group or alias the config names exactly
        canonical = canonical_name(name)
        servers = self.folded_names.get(canonical)
        if servers is None:
            # The most specific matching pattern, in _resolve's order, and its case twins.
            first = next((folded for folded, _ in self.folded_patterns if matches(folded, canonical)), None)
            if first is None:
                return None
            servers = tuple(g.name for folded, g in self.folded_patterns if folded == first)
        return None if resolution.group.name in servers else servers[0]

    def model_names(self) -> list[str]:
        return list(self.groups)

    def knows_entry(self, entry: str) -> bool:
        """Whether an allowed-models entry means something here (admin API validation)."""
        return (entry in SPECIAL_ENTRIES or entry in self.access_groups or "*" in entry
                or self.resolve(entry) is not None)
