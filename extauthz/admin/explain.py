"""Why a key gets what it gets: POST /access/explain, the check's own decision with its steps,
calling nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from extauthz.admin import schema
from extauthz.check import explain
from extauthz.check.facts import Facts
from extauthz.domain.endpoints import classify
from extauthz.domain.model_names import ALL_TEAM_MODELS
from extauthz.domain.record import (
    KeyRecord,
)
from extauthz.records.lookup import lookup
from extauthz.records.store import (
    NotFound,
)

if TYPE_CHECKING:
    pass
from extauthz.admin.base import (
    AdminBase,
    ApiError,
    explained_body,
    token_hash_of,
)


class ExplainRoutes(AdminBase):
    async def explain(self, request: web.Request) -> web.Response:
        """The decision the gateway would make now for a key (raw or hash) or a team's
        member, a model and an endpoint, and the steps behind it; nothing is called and no
        rate limit is taken."""
        self.require_admin(request, "explain decisions")
        if self.check is None:
            raise ApiError(503, "store_unavailable", "The check service is not running in this process.")
        body = await self.body(request)
        schema.reject_unknown(body, {"key", "team_id", "model", "endpoint", "max_tokens"})
        model = schema.expect(body, "model", str, nullable=False)
        max_tokens = schema.expect(body, "max_tokens", int)
        if max_tokens is not None and not 0 < max_tokens <= 10_000_000:
            raise ApiError(400, "invalid_request", "'max_tokens' must be a positive number of tokens", "max_tokens")
        path = schema.expect(body, "endpoint", str) or "/v1/chat/completions"
        if not path.startswith("/"):
            raise ApiError(400, "invalid_request", "'endpoint' must be a path such as /v1/chat/completions", "endpoint")
        runtime = self.runtime()
        if ("key" in body) == ("team_id" in body):
            raise ApiError(400, "invalid_request", "Give either 'key' (a key or its hash) or 'team_id'.", "key")
        if "key" in body:  # read as the check reads a presented key
            key, team, owner = await lookup(None, self.records, runtime.is_master,
                                            token_hash=token_hash_of(body["key"]))
        else:
            owner = None
            team_id = schema.expect(body, "team_id", str, nullable=False)
            team = await self.records.get_team(team_id)
            if team is None:
                raise NotFound(f"team_id {team_id!r} does not exist")
            # A member of the team: decided as the team's JWT callers are (its list decides).
            key = KeyRecord(f"team:{team_id}", None, (ALL_TEAM_MODELS,), team.team_id, None, False,
                            f"a member of team {team_id}")
        endpoint = runtime.pass_through.match(path) or classify(path)
        content_type, payload = explained_body(endpoint, model, max_tokens)
        facts = Facts(token="explain", model=None, path=path, endpoint=endpoint,
                      headers={"content-type": content_type})
        decision = await self.check.keys.decide_key(facts, payload, runtime, key, team, owner, peek=True)
        if key is None:
            return web.json_response({**explain.outcome_view(decision),
                                      "steps": [{"step": "caller", "found": False}]})
        return web.json_response(explain.explain(decision, key, team, owner, runtime.catalog, model, endpoint))
