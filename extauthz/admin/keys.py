"""Keys: /key/generate, /key/update, /key/block, /key/unblock, /key/delete, /key/regenerate, /key/info, /key/list."""

from __future__ import annotations

import math
import secrets
import time
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web

from extauthz.admin import key_params, schema
from extauthz.admin.access import (
    Acting,
    Refused,
    holders_of_new_value,
)
from extauthz.domain.record import (
    KeyRecord,
    masked_key,
    new_key_doc,
    now_iso,
)
from extauthz.records.store import (
    NotFound,
)

if TYPE_CHECKING:
    pass
from extauthz.admin.base import (
    SELF_ONLY,
    USER_GRACE_MAX_S,
    AdminBase,
    ApiError,
    acting,
    applying,
    holder_of,
    holding,
    raw_hash,
    refuse_acting_fields,
    token_hash_of,
)


class KeyRoutes(AdminBase):
    async def key_generate(self, request: web.Request) -> web.Response:
        config = self.runtime().config
        body = key_params.bounded(key_params.with_defaults(await self.body(request), config.key_defaults),
                                  config.key_upperbounds, fill=True)
        fields = schema.key_fields(body, self.runtime().catalog, {"key"})
        raw_key = schema.expect(body, "key", str) or "sk-" + secrets.token_urlsafe(24)
        if len(raw_key) < 8:
            raise ApiError(400, "invalid_request", "'key' must be at least 8 characters", "key")
        if self.runtime().is_master(raw_hash(raw_key, "key")):
            raise ApiError(400, "invalid_request", "'key' must not be the master key.", "key")
        doc = new_key_doc(raw_key)
        doc.update(fields)
        who = acting(request)
        if who is not None:  # its own key, in one of its teams (anyone's, in a team it administers)
            if "key" in body:
                # A secret the admin blocked or let expire must not come back through delete and create.
                raise Refused("A user does not choose the key: one is generated.", param="key")
            who.check_new_key(doc, body.get("user_id"))
            if doc.get("team_id") is None:
                refused = await self.personal_key_refusal(who)
                if refused is not None:
                    raise refused
            doc["user_id"] = doc.get("user_id") or who.user_id
            doc["created_by"] = who.user_id
        doc["secret_holders"] = holders_of_new_value(holder_of(request), doc.get("user_id"))
        if await self.store.key_doc(doc["token"]) is not None:
            raise ApiError(409, "conflict", "This key already exists.", "key")
        check = self.check_team
        if who is not None:
            def check(key: dict[str, Any], team: dict[str, Any] | None) -> None:
                who.check_owner(key, team)
                self.check_team(key, team)
        await self.writer(request).create_key(doc, check, self.runtime().config.settings.max_keys_per_user
                                              if who is not None else 0)
        return web.json_response(self.key_view(doc, raw_key))

    async def key_update(self, request: web.Request) -> web.Response:
        return await self.update_key(request)

    async def key_block(self, request: web.Request) -> web.Response:
        return await self.update_key(request, {"blocked": True})

    async def key_unblock(self, request: web.Request) -> web.Response:
        return await self.update_key(request, {"blocked": False})

    async def key_delete(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        schema.reject_unknown(body, {"keys", "key_aliases"})
        keys = schema.expect(body, "keys", list) or []
        aliases = schema.expect(body, "key_aliases", list) or []
        if not keys and not aliases:
            raise ApiError(400, "invalid_request", "Give 'keys' or 'key_aliases' to delete.", "keys")
        hashes = [token_hash_of(k) for k in keys]
        who = acting(request)
        for alias in aliases:
            found = await self.store.alias_keys(alias) if isinstance(alias, str) else []
            if who is not None:
                found = [h for h in found if who.owns(await self.store.key_doc(h))]
            if not found:
                raise NotFound("no such key of this user" if who is not None else f"no key with key_alias {alias!r}")
            if len(found) > 1:  # (aliases are unique per owner)
                raise ApiError(409, "conflict", f"Several keys have the key_alias {alias!r}, each of another owner: "
                               "name the one to delete in 'keys' (its hash, from /key/list).", "key_aliases")
            hashes.append(found[0])
        if who is not None:  # all of them its own, or none is deleted (one answer: no oracle)
            for h in hashes:
                doc = await self.store.key_doc(h)
                if doc is None or not who.owns(doc):
                    raise NotFound("no such key of this user")
                who.check_member_route(doc.get("team_id"), "/key/delete")
        deleted = [h for h in hashes if await self.writer(request).delete_key(h)]
        if not deleted:
            raise NotFound("none of the given keys exist")
        return web.json_response({"deleted_keys": deleted})

    async def key_regenerate(self, request: web.Request) -> web.Response:
        """A new key in place of one (LiteLLM's /key/regenerate and /key/{key}/regenerate):
        the same record under the new key, with any field updates the body gives, and the
        same counters (spend, rate windows). The old key stops at once, or at the end of
        ``grace_period``. Repeated with the same ``new_key``, it answers as the first time."""
        body = key_params.bounded(await self.body(request), self.runtime().config.key_upperbounds, fill=False)
        in_path = request.match_info.get("key")
        if in_path is not None and body.get("key") not in (None, in_path):
            raise ApiError(400, "invalid_request", "The key in the path and the body's 'key' differ.", "key")
        old_hash = token_hash_of(in_path if in_path is not None else body.get("key"))
        if body.get("new_master_key") is not None:
            raise ApiError(400, "invalid_request", "The master key is general_settings.master_key in the config; "
                           "change it there (see docs/operations.md).", "new_master_key")
        changes = schema.key_fields(body, self.runtime().catalog, {"key", "new_key", "grace_period",
                                                                  "new_master_key"})
        given = schema.expect(body, "new_key", str)
        if given is not None and len(given) < 8:
            raise ApiError(400, "invalid_request", "'new_key' must be at least 8 characters", "new_key")
        raw_key = given or "sk-" + secrets.token_urlsafe(24)
        new_hash = raw_hash(raw_key, "new_key")
        if new_hash == old_hash or self.runtime().is_master(new_hash):
            raise ApiError(400, "invalid_request", "'new_key' must be a new key (not this one, not the master key).",
                           "new_key")
        grace = schema.grace_seconds(schema.expect(body, "grace_period", str))
        if grace and grace > USER_GRACE_MAX_S and acting(request) is not None:
            # An old value kept for long by its own user would outlive what an admin does to the key.
            raise ApiError(400, "invalid_request", f"A user's grace_period is at most {USER_GRACE_MAX_S // 3600}h.",
                           "grace_period")
        grace_until = time.time() + grace if grace else None
        changes.update(key_name=masked_key(raw_key), regenerated_at=now_iso())
        change, check = applying(changes), self.check_team
        who = acting(request)
        if who is not None:  # its own key (or one of a team it administers), as /key/update allows
            if given is not None:
                raise Refused("A user does not choose the key: one is generated.", param="new_key")
            refuse_acting_fields(body, frozenset({"grace_period"}))
            change, check = self.acting_key_rules(who, changes, "/key/regenerate",
                                                  await self.personal_key_refusal(who))
        holder = holder_of(request)

        def regenerated(doc: dict[str, Any]) -> dict[str, Any]:  # a new value: only who it was returned to holds it
            new = change(doc)
            new["secret_holders"] = holders_of_new_value(holder, new.get("user_id"))
            return new

        doc, old_key_expires = await self.writer(request).rotate_key(
            old_hash, new_hash, regenerated, check, grace_until,
            self.runtime().config.settings.max_keys_per_user if who is not None else 0)
        return web.json_response(dict(self.key_view(doc, raw_key), old_key_expires=old_key_expires))

    async def key_info(self, request: web.Request) -> web.Response:
        """A key's record with its use; a key calling without ``?key=`` gets its own, as in
        LiteLLM (client tools read their remaining budget so)."""
        reader: KeyRecord | None = request.get("self_reader")
        given = request.query.get("key")
        if given is None and reader is not None:
            token_hash = reader.token_hash
        else:
            token_hash = token_hash_of(given)
        doc = await self.store.key_doc(token_hash)
        who = acting(request)
        if reader is not None and token_hash in (reader.token_hash, reader.account):
            who = None  # (itself; a replaced key in its grace period reads its line's first)
        elif who is SELF_ONLY:
            doc = None
        if doc is None or (who is not None and not who.owns(doc)):
            raise NotFound("key not found")
        (doc,) = await self.with_use([doc], "key", "token")
        return web.json_response({"key": token_hash, "info": self.key_view(doc)})

    async def key_list(self, request: web.Request) -> web.Response:
        """LiteLLM's filters, each an exact match on the stored field. The keys are first
        narrowed by an index (an alias, a hash, a team's or a user's set, an acting user's own
        and its teams'), so a page of a million keys reads one page of documents; only a filter
        no index answers (organization_id) reads every candidate."""
        query, who = request.query, acting(request)
        wanted: dict[str, str] = {field: query[param] for param, field in (
            ("team_id", "team_id"), ("key_alias", "key_alias"), ("key_hash", "token"), ("user_id", "user_id"),
            ("organization_id", "organization_id")) if query.get(param)}
        if "token" in wanted:
            hashes = [wanted["token"]]
        elif "key_alias" in wanted:
            hashes = await self.store.alias_keys(wanted["key_alias"])
        elif "team_id" in wanted or "user_id" in wanted:
            hashes = await self.store.key_hashes(wanted.get("team_id"), wanted.get("user_id"))
        elif who is not None:  # its own keys and those of the teams it administers
            mine = set(await self.store.key_hashes(user_id=who.user_id))
            for team_id in who.admin_teams:
                mine.update(await self.store.key_hashes(team_id=team_id))
            hashes = sorted(mine)
        else:
            hashes = await self.store.key_hashes()

        def selected(doc: dict[str, Any]) -> bool:
            return all(doc.get(field) == value for field, value in wanted.items()) and (who is None or who.owns(doc))

        page, size = self.paging(request)
        if set(wanted) - {"team_id", "user_id"} or len(wanted) > 1 or who is not None:
            docs = [d for d in await self.store.key_docs(hashes) if selected(d)]  # every candidate read
            total, chunk = len(docs), docs[(page - 1) * size: page * size]
        else:  # the index answered the filter: only the page is read
            total = len(hashes)
            chunk = [d for d in await self.store.key_docs(hashes[(page - 1) * size: page * size]) if selected(d)]
        if query.get("return_full_object", "").lower() == "true":
            chunk = await self.with_use(chunk, "key", "token")
            keys: list[Any] = [self.key_view(d) for d in chunk]
        else:
            keys = [d["token"] for d in chunk]
        return web.json_response({"keys": keys, "total_count": total, "current_page": page,
                                  "total_pages": max(1, math.ceil(total / size))})

    async def update_key(self, request: web.Request, fixed: dict[str, Any] | None = None) -> web.Response:
        body = key_params.bounded(await self.body(request), self.runtime().config.key_upperbounds, fill=False)
        token_hash = token_hash_of(body.get("key"))
        changes = fixed if fixed is not None else schema.key_fields(body, self.runtime().catalog, {"key"})
        change, check = applying(changes), self.check_team
        who = acting(request)
        if who is not None:
            if fixed is None:
                refuse_acting_fields(body)
            change, check = self.acting_key_rules(who, changes, "/key/update", await self.personal_key_refusal(who))
        named_by_value = token_hash != body.get("key")
        doc = await self.writer(request).update_key(
            token_hash, holding(change, holder_of(request), named_by_value), check,
            self.runtime().config.settings.max_keys_per_user if who is not None else 0)
        return web.json_response(self.key_view(doc))

    def acting_key_rules(self, who: Acting, changes: dict[str, Any], route: str,
                         personal_refused: Refused | None) -> tuple[
            Callable[[dict[str, Any]], dict[str, Any]], Callable[..., None]]:
        """An acting user's change of a key by ``route`` and the check of the result; both
        run in the transaction, on the stored key before and after (a key left without a
        team is a personal key: ``personal_refused`` says why the user may not have one)."""
        def change(doc: dict[str, Any]) -> dict[str, Any]:
            if not who.owns(doc):  # the same answer as a missing key
                raise NotFound("key not found")
            who.check_member_route(doc.get("team_id"), route)
            return applying(dict(changes, updated_by=who.user_id))(doc)

        def check(key: dict[str, Any], team: dict[str, Any] | None) -> None:
            if not who.owns(key):
                raise Refused("The key would leave the caller's keys.", param="user_id")
            who.check_new_key(key, key.get("user_id"), route)
            if key.get("team_id") is None and personal_refused is not None:
                raise personal_refused
            if "user_id" in changes:
                who.check_owner(key, team)
            self.check_team(key, team)

        return change, check

