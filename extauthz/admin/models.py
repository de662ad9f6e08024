"""What a caller may call: /model/info, /v1/model/info, /model_group/info, /v1/models, /v1/models/{id}."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from extauthz.admin.access import (
    Acting,
)
from extauthz.check import listing
from extauthz.check.jwt_callers import teams_visible

if TYPE_CHECKING:
    pass
from extauthz.admin.base import (
    AdminBase,
    ApiError,
    acting,
)


class ModelRoutes(AdminBase):
    async def model_info(self, request: web.Request) -> web.Response:
        """The deployments: every one for an admin, those of the models it may call for a
        key or a user acting for itself (LiteLLM's filter)."""
        names: set[str] | None = None
        if request.get("self_reader") is not None:
            names = set(await self.visible(request))
        elif acting(request) is not None:
            names = await self.acting_models(acting(request))  # type: ignore[arg-type]
        data = [{"model_name": d.model_name,
                 "litellm_params": {"model": f"{d.provider}/{d.provider_model}", "api_base": d.api_base or None,
                                    "api_version": d.api_version, "weight": d.weight},
                 "model_info": {"id": d.name, "db_model": d.model_id is not None,
                                "access_groups": list(d.access_groups), "routable": d.routable,
                                **({"reason": d.unavailable} if not d.routable else {})}}
                for d in self.runtime().config.deployments if names is None or d.model_name in names]
        return web.json_response({"data": data})

    async def acting_models(self, who: Acting) -> set[str]:
        """The models a user acting for itself may call through any of its teams."""
        teams = [t for t in [await self.records.get_team(team_id) for team_id in who.teams] if t is not None]
        return set(teams_visible(who.user_id, who.user_id, None, teams, self.runtime().catalog))

    async def model_group_info(self, request: web.Request) -> web.Response:
        """The model groups the calling key may use (the same list as /v1/models), with
        their mode, pricing and access groups, as LiteLLM's /model_group/info gives them."""
        return web.json_response(listing.group_info(self.runtime().catalog, await self.visible(request)))

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(listing.models_page(self.runtime().catalog, await self.visible(request)))

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model_id"]
        if name not in await self.visible(request):
            raise ApiError(404, "model_not_found", f"The model {name!r} does not exist or this key cannot use it.")
        return web.json_response(listing.model_entry(self.runtime().catalog, name))
