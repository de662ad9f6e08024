"""The audit trail: GET /audit, newest first, filtered and paged."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from extauthz.admin import schema
from extauthz.domain.record import (
    hash_token,
)
from extauthz.records import audit

if TYPE_CHECKING:
    pass
from extauthz.admin.base import (
    AUDIT_PAGE,
    AUDIT_SCAN_MAX,
    STREAM_ID,
    AdminBase,
    ApiError,
)


class AuditRoutes(AdminBase):
    async def audit_trail(self, request: web.Request) -> web.Response:
        """The audit trail, newest first: ``target`` (a key, its hash or alias, a team or user
        id), ``actor`` (master_key, system, a user id or a key hash), ``role``, ``since`` (ISO 8601),
        ``limit`` (1..1000) and ``before`` (the ``next`` of the previous page)."""
        self.require_admin(request, "read the audit trail")
        query = request.query
        try:
            limit = int(query.get("limit", "100"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            raise ApiError(400, "invalid_request", "'limit' must be an integer within 1..1000", "limit")
        before = query.get("before") or "+"
        if before != "+" and not STREAM_ID.fullmatch(before):
            raise ApiError(400, "invalid_request", "'before' must be the 'next' of a previous page", "before")
        since_ms = 0
        if query.get("since"):
            try:
                since_ms = int(schema.parse_time(query["since"]) * 1000)  # type: ignore[operator]
            except (ValueError, TypeError, OverflowError):
                raise ApiError(400, "invalid_request", "'since' must be an ISO 8601 time", "since") from None
        target = query.get("target") or None
        targets = {target, hash_token(target)} if target else set()
        actor, role = query.get("actor") or None, query.get("role") or None
        entries: list[dict[str, Any]] = []
        cursor, scanned, more = before, 0, True
        while len(entries) < limit and scanned < AUDIT_SCAN_MAX:
            page = await self.store.audit_entries(cursor, AUDIT_PAGE)
            if not page:
                more = False
                break
            for stream_id, entry in page:
                cursor, scanned = stream_id, scanned + 1
                if int(stream_id.partition("-")[0]) < since_ms:
                    more = False
                    break
                if (not targets or any(t in targets for t in audit.targets(entry))) \
                        and audit.selected(entry, None, actor, role):
                    entries.append({"id": stream_id, **entry})
                    if len(entries) == limit:
                        break
            else:
                continue
            break
        return web.json_response({"entries": entries, "next": cursor if more and cursor != "+" else None})
