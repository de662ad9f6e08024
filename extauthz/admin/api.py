"""The admin HTTP API, compatible with LiteLLM's key, team, user, team-member and model routes.

Every route but /v1/models, /model_group/info and /health/* needs the master key, or a
caller access.py lets act (a JWT's user through the check, a virtual key by its owner's
role). Errors use the same JSON shape as the gateway's denies.
"""

from __future__ import annotations

from aiohttp import web

from extauthz.admin.audit_trail import AuditRoutes
from extauthz.admin.base import MAX_BODY_BYTES
from extauthz.admin.explain import ExplainRoutes
from extauthz.admin.health import HealthRoutes
from extauthz.admin.keys import KeyRoutes
from extauthz.admin.model_writes import ModelWriteRoutes
from extauthz.admin.models import ModelRoutes
from extauthz.admin.teams import TeamRoutes
from extauthz.admin.users import UserRoutes


class AdminApi(KeyRoutes, TeamRoutes, UserRoutes, AuditRoutes, ExplainRoutes, ModelRoutes, ModelWriteRoutes,
               HealthRoutes):
    """The admin API: every resource's routes on one aiohttp application."""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self.count, self.errors, self.auth])
        post, get = app.router.add_post, app.router.add_get
        post("/key/generate", self.key_generate)
        post("/key/update", self.key_update)
        post("/key/delete", self.key_delete)
        post("/key/block", self.key_block)
        post("/key/unblock", self.key_unblock)
        post("/key/regenerate", self.key_regenerate)
        post("/key/{key}/regenerate", self.key_regenerate)
        get("/key/info", self.key_info)
        get("/key/list", self.key_list)
        post("/team/new", self.team_new)
        post("/team/update", self.team_update)
        post("/team/delete", self.team_delete)
        post("/team/block", self.team_block)
        post("/team/unblock", self.team_unblock)
        get("/team/info", self.team_info)
        get("/team/list", self.team_list)
        post("/team/member_add", self.team_member_add)
        post("/team/member_update", self.team_member_update)
        post("/team/member_delete", self.team_member_delete)
        post("/user/new", self.user_new)
        post("/user/update", self.user_update)
        post("/user/delete", self.user_delete)
        get("/user/info", self.user_info)
        get("/user/list", self.user_list)
        get("/audit", self.audit_trail)
        post("/access/explain", self.explain)
        get("/model/info", self.model_info)
        get("/v1/model/info", self.model_info)  # LiteLLM serves both (its CLI calls this one)
        get("/v2/model/info", self.model_info)
        post("/model/new", self.model_new)
        post("/model/update", self.model_update)
        app.router.add_patch("/model/{model_id}/update", self.model_patch)
        post("/model/delete", self.model_delete)
        get("/model_group/info", self.model_group_info)
        for prefix in ("/v1", ""):
            get(f"{prefix}/models", self.models)
            get(prefix + "/models/{model_id:.+}", self.model)
        post("/internal/usage/release", self.release)
        get("/health/liveliness", self.liveliness)
        get("/health/readiness", self.readiness)
        return app
