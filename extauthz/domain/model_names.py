"""LiteLLM's special entries of an allowed-models list: names that are not models."""

from __future__ import annotations

# Entries of an allowed-models list that are not model or group names.
ALL_MODELS = frozenset({"*", "all-proxy-models"})
ALL_TEAM_MODELS = "all-team-models"
# LiteLLM's entry for "no model of its own": a list holding only it admits nothing (a
# user who may call its teams' models only; a team created by team_id_upsert).
NO_DEFAULT_MODELS = "no-default-models"
SPECIAL_ENTRIES = ALL_MODELS | {ALL_TEAM_MODELS, NO_DEFAULT_MODELS}
