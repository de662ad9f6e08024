"""Teams and their members: /team/new, /team/update, /team/block, /team/unblock, /team/delete, /team/info,
/team/list, /team/member_add, /team/member_update, /team/member_delete."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from extauthz.admin import schema
from extauthz.admin.access import (
    ROUTE_REFUSED,
    Refused,
)
from extauthz.domain import budgets
from extauthz.domain.record import (
    MEMBER_TERMS,
    TeamRecord,
    format_time,
    membership_entries,
    new_team_doc,
    new_user_doc,
    team_members,
)
from extauthz.records.store import MissingTeam, NotFound
from extauthz.records.writer import RedisWriter

if TYPE_CHECKING:
    pass
from extauthz.admin.base import (
    MAX_MEMBERS_PER_CALL,
    MEMBER_TERMS_NOT_ENFORCED,
    OWN_TERMS,
    AdminBase,
    ApiError,
    acting,
    applying,
)


class TeamRoutes(AdminBase):
    async def team_new(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        fields = schema.team_fields(body, self.runtime().catalog, {"team_id"})
        members = fields.pop("members_with_roles", [])
        if len(members) > MAX_MEMBERS_PER_CALL:
            raise ApiError(400, "invalid_request", f"Give at most {MAX_MEMBERS_PER_CALL} members.",
                           "members_with_roles")
        doc = new_team_doc(schema.expect(body, "team_id", str) or str(uuid.uuid4()), **fields)
        await self.writer(request).create_team(doc)
        if members:
            doc, _ = await self.add_members(self.writer(request), doc["team_id"], members)
        return web.json_response(dict(doc, not_enforced=schema.not_enforced(doc)))

    async def team_update(self, request: web.Request) -> web.Response:
        return await self.update_team(request)

    async def team_block(self, request: web.Request) -> web.Response:
        return await self.update_team(request, {"blocked": True})

    async def team_unblock(self, request: web.Request) -> web.Response:
        return await self.update_team(request, {"blocked": False})

    async def team_delete(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        schema.reject_unknown(body, {"team_ids"})
        team_ids = schema.expect(body, "team_ids", list, nullable=False)
        if not team_ids or not all(isinstance(t, str) for t in team_ids):
            raise ApiError(400, "invalid_request", "'team_ids' must be a non-empty list of strings", "team_ids")
        deleted_keys = 0
        for team_id in team_ids:
            deleted_keys += await self.writer(request).delete_team(team_id)
        return web.json_response({"deleted_teams": team_ids, "deleted_keys": deleted_keys})

    async def team_info(self, request: web.Request) -> web.Response:
        team_id = request.query.get("team_id", "")
        who = acting(request)
        if who is not None:  # a member sees its team; the keys it may touch only
            who.check_team(team_id, manage=False)
        doc = await self.store.team_doc(team_id) if team_id else None
        if doc is None:
            raise NotFound(f"team_id {team_id!r} does not exist")
        keys = await self.store.list_keys(team_id)
        if who is not None:
            keys = [k for k in keys if who.owns(k)]
        memberships = await self.memberships(doc)
        (doc,) = await self.with_use([doc], "team", "team_id")
        return web.json_response({"team_id": team_id, "team_info": doc,
                                  "keys": [self.key_view(k) for k in keys], "team_memberships": memberships})

    async def memberships(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        """A team's members with terms of their own, in LiteLLM's shape, with their spend
        this budget period."""
        try:
            members = TeamRecord.from_document(doc).members or {}
        except (KeyError, TypeError):
            return []
        now = time.time()
        counters = [budgets.spend_counters(m.spend_scope, m.budget, None, now)[0] for m in members.values()]
        spent = await self.counters.spent([c.suffix for c in counters]) if counters else []
        stored = {m.get("user_id"): m for m in membership_entries(doc)}
        return [{"user_id": m.user_id, "team_id": m.team_id, "spend": amount, "litellm_budget_table": {
                    "max_budget": m.budget.max if m.budget else None,
                    "budget_duration": stored.get(m.user_id, {}).get("budget_duration"),
                    "allowed_models": list(m.models),
                    "budget_reset_at": format_time(c.reset_at) if c.reset_at not in (None, float("inf")) else None}}
                for m, c, amount in zip(members.values(), counters, spent, strict=False)]

    async def team_list(self, request: web.Request) -> web.Response:
        """The teams; LiteLLM's ``user_id`` filter names a member. A user acting for itself
        lists its own teams (``user_id`` itself, or none), as in LiteLLM."""
        user_id, who = request.query.get("user_id"), acting(request)
        if who is not None:
            if user_id not in (None, who.user_id):
                raise Refused("A user lists its own teams only (user_id: itself).", ROUTE_REFUSED, param="user_id")
            mine = set(who.teams) | who.admin_teams
            teams = [t for t in await self.store.team_docs(sorted(mine)) if t is not None]
        else:
            teams = await self.store.list_teams()
        if user_id:  # LiteLLM's filter: the teams this user is a member of
            teams = [t for t in teams if any(m.get("user_id") == user_id for m in team_members(t))]
        return web.json_response(await self.with_use(teams, "team", "team_id"))

    async def add_members(self, writer: RedisWriter, team_id: str, given: list[dict[str, Any]],
                          terms: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
        """Add members (each with ``terms``, its own in the team, when given); one named by
        e-mail only is the one user with that e-mail, or a new one. Returns the team and the
        members' user ids."""
        by_email: dict[str, list[str]] = {}
        if any(m["user_id"] is None for m in given):
            for u in await self.store.list_users():
                if isinstance(u.get("user_email"), str):
                    by_email.setdefault(u["user_email"], []).append(u["user_id"])
        team: dict[str, Any] = {}
        ids = []
        for member in given:
            if member["user_id"] is None:
                known = by_email.get(member["user_email"], [])
                if len(known) > 1:
                    raise ApiError(400, "invalid_request", f"Several users have the e-mail {member['user_email']!r}: "
                                   "name the member by user_id.", "member")
                member = dict(member, user_id=known[0] if known else str(uuid.uuid4()))
            user = new_user_doc(member["user_id"], user_email=member["user_email"])
            team = await writer.add_member(team_id, member, user, terms)
            ids.append(member["user_id"])
        return team, ids

    async def team_member_add(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        schema.reject_unknown(body, {"team_id", "member", *MEMBER_TERMS})
        team_id = schema.expect(body, "team_id", str, nullable=False)
        terms = schema.member_terms(body, self.runtime().catalog)
        who = acting(request)
        if who is not None:
            who.check_team(team_id, manage=True)
        given = body.get("member")
        members = [schema.member(m) for m in (given if isinstance(given, list) else [given])]
        if not members or len(members) > MAX_MEMBERS_PER_CALL:
            raise ApiError(400, "invalid_request", f"Give 1 to {MAX_MEMBERS_PER_CALL} members.", "member")
        if who is not None:
            members = await self.addable_by_team_admin(members)
            if terms and any(m["user_id"] == who.user_id for m in members):
                raise Refused(OWN_TERMS, param="member")
        team = await self.store.team_doc(team_id)
        if team is None:
            raise MissingTeam(f"team_id {team_id!r} does not exist")
        default = team.get("default_team_member_models")
        if "allowed_models" not in terms and isinstance(default, list) and default:
            terms["allowed_models"] = default  # LiteLLM's fallback for a member given no models of its own
        doc, ids = await self.add_members(self.writer(request), team_id, members, terms)
        users = [u for u in [await self.store.user_doc(i) for i in dict.fromkeys(ids)] if u is not None]
        if who is not None:  # who they are in this team, not the rest of their records
            users = [{"user_id": u["user_id"]} for u in users]
        return web.json_response(dict(doc, updated_users=users))

    async def addable_by_team_admin(self, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A team admin adds existing internal users by user_id, and learns nothing of users
        outside its teams: one that does not exist and one it may not add (an admin) get
        the same answer; no user record is created; no e-mail is read or claimed."""
        if any(m["user_id"] is None for m in members):
            # By e-mail, a team admin would look users up across every team (and pull them in).
            raise Refused("A team admin adds members by user_id.", param="member")
        for m in members:
            user = await self.store.user_doc(m["user_id"])
            if user is None or user.get("user_role") in ("proxy_admin", "proxy_admin_viewer"):
                raise NotFound(f"No user a team admin may add has the user_id {m['user_id']!r}: a team admin adds "
                               "existing users (an admin creates them with /user/new).")
        return [dict(m, user_email=None) for m in members]

    async def team_member_update(self, request: web.Request) -> web.Response:
        """A member's role and its own terms in the team (LiteLLM's /team/member_update)."""
        body = await self.body(request)
        unsupported = sorted(k for k in body if k in MEMBER_TERMS_NOT_ENFORCED and body[k] not in (None, {}))
        if unsupported:  # restricting terms are enforced or refused, never stored unread
            raise ApiError(400, "invalid_request", f"{', '.join(unsupported)} on a team member is not enforced by "
                           "this gateway: set limits on the member's keys instead.", unsupported[0])
        schema.reject_unknown(body, {"team_id", "user_id", "user_email", "role", *MEMBER_TERMS,
                                     *MEMBER_TERMS_NOT_ENFORCED})
        team_id = schema.expect(body, "team_id", str, nullable=False)
        who = acting(request)
        if who is not None:
            who.check_team(team_id, manage=True)
        role = schema.expect(body, "role", str)
        if role is not None and role not in schema.MEMBER_ROLES:
            raise ApiError(400, "invalid_request", f"'role' must be one of {list(schema.MEMBER_ROLES)}, got {role!r}",
                           "role")
        terms = schema.member_terms(body, self.runtime().catalog)
        user_id = await self.member_named(team_id, body)
        if who is not None and terms and user_id == who.user_id:
            raise Refused(OWN_TERMS, param="user_id")
        team = await self.writer(request).update_member(team_id, user_id, role, terms)
        return web.json_response({"team_id": team_id, "user_id": user_id, "role": next(
            (m.get("role") for m in team_members(team) if m.get("user_id") == user_id), None),
            **next((m for m in membership_entries(team) if m.get("user_id") == user_id), {})})

    async def member_named(self, team_id: str, body: dict[str, Any]) -> str:
        """The member a body names by user_id, or by user_email among the team's members."""
        user_id, email = schema.expect(body, "user_id", str), schema.expect(body, "user_email", str)
        if user_id:
            return user_id
        team = await self.store.team_doc(team_id)
        if team is None:
            raise MissingTeam(f"team_id {team_id!r} does not exist")
        found = [m["user_id"] for m in team_members(team) if email and m.get("user_email") == email]
        if not found:
            raise NotFound(f"no member of team {team_id!r} with that user_id or user_email")
        return found[0]

    async def team_member_delete(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        schema.reject_unknown(body, {"team_id", "user_id", "user_email"})
        team_id = schema.expect(body, "team_id", str, nullable=False)
        who = acting(request)
        if who is not None:
            who.check_team(team_id, manage=True)
        user_id = await self.member_named(team_id, body)
        team, deleted, blocked = await self.writer(request).remove_member(team_id, user_id)
        return web.json_response(dict(team, deleted_keys=deleted, blocked_keys=blocked))

    async def update_team(self, request: web.Request, fixed: dict[str, Any] | None = None) -> web.Response:
        body = await self.body(request)
        team_id = schema.expect(body, "team_id", str, nullable=False)
        changes = fixed if fixed is not None else schema.team_fields(body, self.runtime().catalog, {"team_id"})
        if "members_with_roles" in changes:
            raise ApiError(400, "invalid_request", "Change members with /team/member_add and /team/member_delete.",
                           "members_with_roles")
        doc = await self.writer(request).update_team(team_id, applying(changes))
        return web.json_response(dict(doc, not_enforced=schema.not_enforced(doc)))
