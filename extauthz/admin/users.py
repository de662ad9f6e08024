"""Users: /user/new, /user/update, /user/delete, /user/info, /user/list."""

from __future__ import annotations

import math
import secrets
import uuid
from typing import TYPE_CHECKING

from aiohttp import web

from extauthz.admin import key_params, schema
from extauthz.domain.record import (
    new_key_doc,
    new_user_doc,
)
from extauthz.records.store import (
    NotFound,
)

if TYPE_CHECKING:
    pass
from extauthz.admin.base import (
    AdminBase,
    ApiError,
    acting,
    applying,
)


class UserRoutes(AdminBase):
    async def user_new(self, request: web.Request) -> web.Response:
        """A user, and (LiteLLM's default, ``auto_create_key``) a personal key for it."""
        body = await self.body(request)
        fields = schema.user_fields(body, self.runtime().catalog, {"user_id", "auto_create_key"})
        for name in ("key_alias", "duration", "auto_create_key"):
            fields.pop(name, None)
        user_id = schema.expect(body, "user_id", str) or str(uuid.uuid4())
        doc = new_user_doc(user_id, **fields)
        key = raw_key = None
        if schema.expect(body, "auto_create_key", bool) is not False:  # checked before anything is written
            config = self.runtime().config  # (the key a user gets is bound as any key minted)
            key_body = key_params.bounded(key_params.with_defaults(
                {k: body[k] for k in ("key_alias", "duration") if body.get(k) is not None},
                tuple((k, v) for k, v in config.key_defaults if k not in ("user_id", "team_id"))),
                config.key_upperbounds, fill=True)
            raw_key = "sk-" + secrets.token_urlsafe(24)
            key = new_key_doc(raw_key, user_id=user_id, secret_holders=[user_id],
                              **schema.key_fields(key_body, self.runtime().catalog))  # (its alias: a new owner's)
        await self.writer(request).create_user(doc)
        out = dict(doc, not_enforced=schema.not_enforced(doc, user=True))
        if key is not None:
            await self.writer(request).create_key(key, self.check_team)
            out.update(key=raw_key, token=key["token"], key_name=key["key_name"], expires=key["expires"])
        return web.json_response(out)

    async def user_update(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        user_id = schema.expect(body, "user_id", str, nullable=False)
        changes = schema.user_fields(body, self.runtime().catalog, {"user_id"})
        if "teams" in changes:
            raise ApiError(400, "invalid_request", "Change a user's teams with /team/member_add and "
                           "/team/member_delete.", "teams")
        changes.pop("key_alias", None)
        changes.pop("duration", None)
        doc = await self.writer(request).update_user(user_id, applying(changes))
        return web.json_response(dict(doc, not_enforced=schema.not_enforced(doc, user=True)))

    async def user_delete(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        schema.reject_unknown(body, {"user_ids"})
        user_ids = schema.expect(body, "user_ids", list, nullable=False)
        if not user_ids or not all(isinstance(u, str) and u for u in user_ids):
            raise ApiError(400, "invalid_request", "'user_ids' must be a non-empty list of strings", "user_ids")
        missing = [u for u in user_ids if await self.store.user_doc(u) is None]
        if missing:  # all of them or none
            raise NotFound(f"user_id(s) {missing} do not exist")
        deleted_keys = 0
        for user_id in user_ids:
            deleted_keys += await self.writer(request).delete_user(user_id)
        return web.json_response({"deleted_users": user_ids, "deleted_keys": deleted_keys})

    async def user_info(self, request: web.Request) -> web.Response:
        who = acting(request)
        user_id = request.query.get("user_id") or (who.user_id if who is not None else "")
        if who is not None and user_id != who.user_id:
            raise NotFound("user not found")
        doc = await self.store.user_doc(user_id) if user_id else None
        if doc is None:
            raise NotFound(f"user_id {user_id!r} does not exist")
        keys = await self.store.list_keys(user_id=user_id)
        teams = [t for t in [await self.store.team_doc(t) for t in doc.get("teams") or []] if t is not None]
        (doc,) = await self.with_use([doc], "user", "user_id")  # (its spend: its personal keys')
        for name in ("rpm_used", "tpm_used"):  # (a user has no rate windows of its own)
            doc.pop(name, None)
        return web.json_response({"user_id": user_id,
                                  "user_info": dict(doc, not_enforced=schema.not_enforced(doc, user=True)),
                                  "keys": [self.key_view(k) for k in keys], "teams": teams})

    async def user_list(self, request: web.Request) -> web.Response:
        users = await self.store.list_users()
        role = request.query.get("role")
        if role:
            users = [u for u in users if u.get("user_role") == role]
        wanted = request.query.get("user_ids")
        if wanted:
            ids = set(wanted.split(","))
            users = [u for u in users if u["user_id"] in ids]
        page, size = self.paging(request, "page_size")
        return web.json_response({"users": users[(page - 1) * size: page * size], "total": len(users),
                                  "page": page, "page_size": size,
                                  "total_pages": max(1, math.ceil(len(users) / size))})
