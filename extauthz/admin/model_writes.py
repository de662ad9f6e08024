"""Models managed at runtime, as LiteLLM's: /model/new, /model/update, PATCH
/model/{model_id}/update, /model/delete (general_settings.store_model_in_db).

A runtime model is read as a model_list entry is (config.runtime_deployment): an entry
the config would refuse is refused (400); one that cannot be served (an unknown provider,
a variable this sidecar does not have) is stored and reported unroutable with the reason.
The config stays the source for its own names: a runtime model may not take the name of
a config model or alias (docs/runtime-models.md). Credentials are sealed before they are
stored (records/sealed.py) and never shown. Only the master key and proxy admins reach
these routes (admin/access.py); every change has its audit entry.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import uuid
from typing import Any

from aiohttp import web

from extauthz.admin.base import AdminBase, ApiError
from extauthz.config import ConfigError, Deployment, UnsetVariable, name_taken, runtime_deployment
from extauthz.domain import providers
from extauthz.domain.providers import ENV_PREFIX, is_credential
from extauthz.domain.record import now_iso
from extauthz.records.models import sealed_params, shown_params
from extauthz.records.sealed import Sealer
from extauthz.records.store import NotFound

log = logging.getLogger("extauthz.admin")

# LiteLLM's answer when models are not stored (its status, its words).
NOT_STORED = ("Set `'STORE_MODEL_IN_DB='True'` in your env to enable this feature.")
MODEL_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
ENTRY_FIELDS = {"model_name", "litellm_params", "model_info"}
ENTRY_MAX_BYTES = 16 * 1024   # a model's whole entry (LiteLLM's are well under 2 KiB)
MAX_RUNTIME_MODELS = 1000   # each change rebuilds the runtime on every replica


def _where(params: dict[str, Any]) -> tuple[Any, Any, Any]:
    """What decides where a model's calls go: its provider, base URL and region."""
    return params.get("model", "").partition("/")[0] if isinstance(params.get("model"), str) else None, \
        params.get("api_base"), params.get("aws_region_name")


class ModelWriteRoutes(AdminBase):
    async def model_new(self, request: web.Request) -> web.Response:
        self.stored_models_on()
        body = await self.body(request)
        model_info = self.mapping(body, "model_info")
        model_id = model_info.get("id") or str(uuid.uuid4())
        self.valid_id(model_id)
        if sum(d.model_id is not None for d in self.runtime().config.deployments) >= MAX_RUNTIME_MODELS:
            raise ApiError(400, "limit_reached", f"This gateway holds {MAX_RUNTIME_MODELS} runtime models, the most "
                           "it serves; delete one, or move models into the config.")
        if any(d.name == model_id for d in self.runtime().config.deployments):
            raise ApiError(400, "invalid_request", f"A model with id {model_id!r} already exists.", "model_info.id")
        params = self.mapping(body, "litellm_params")
        entry = {"model_name": body.get("model_name"), "litellm_params": params,
                 "model_info": {**model_info, "id": model_id}}
        deployment = self.checked(model_id, entry)
        who = self.changed_by(request)
        now = now_iso()
        doc = {"model_id": model_id, "model_name": entry["model_name"],
               "litellm_params": self.sealed(model_id, params), "model_info": entry["model_info"],
               "created_at": now, "created_by": who, "updated_at": now, "updated_by": who}
        await self.writer(request).create_model(doc)
        await self.served_now()
        return web.json_response(self.shown(doc, deployment))

    async def model_update(self, request: web.Request) -> web.Response:
        """POST /model/update: model_info.id names the model; given fields replace those
        stored (a litellm_params or model_info member given null keeps the stored one)."""
        self.stored_models_on()
        body = await self.body(request)
        model_id = self.mapping(body, "model_info").get("id")
        if not isinstance(model_id, str) or not model_id:
            raise ApiError(400, "invalid_request", "model_info.id not provided", "model_info.id")
        return await self.update(request, model_id, body)

    async def model_patch(self, request: web.Request) -> web.Response:
        """PATCH /model/{model_id}/update."""
        self.stored_models_on()
        return await self.update(request, request.match_info["model_id"], await self.body(request))

    async def model_delete(self, request: web.Request) -> web.Response:
        self.stored_models_on()
        body = await self.body(request)
        model_id = body.get("id")
        if not isinstance(model_id, str) or not model_id:
            raise ApiError(400, "invalid_request", "'id' must be the model's id", "id")
        self.not_config_model(model_id)
        try:
            await self.writer(request).delete_model(model_id)
        except NotFound as e:
            raise ApiError(400, "invalid_request", str(e), "id") from None
        await self.served_now()
        return web.json_response({"message": f"Model: {model_id} deleted successfully"})

    # -- the steps ----------------------------------------------------------------------

    async def update(self, request: web.Request, model_id: str, body: dict[str, Any]) -> web.Response:
        unknown = sorted(set(body) - ENTRY_FIELDS)
        if unknown:
            raise ApiError(400, "invalid_request", f"Unknown field {unknown[0]!r}.", unknown[0])
        self.not_config_model(model_id)
        params, info = self.mapping(body, "litellm_params"), self.mapping(body, "model_info")
        if info.get("id") not in (None, model_id):
            raise ApiError(400, "invalid_request", "A model's id cannot change.", "model_info.id")
        shown: dict[str, Any] = {}

        def change(doc: dict[str, Any]) -> dict[str, Any]:
            stored = doc.get("litellm_params", {})
            given = {k: v for k, v in params.items() if v is not None}
            if _where({**stored, **given}) != _where(stored):
                # A stored credential goes only where it was given for: an admin cannot read it
                # by pointing the model at a host of its own. Moved, the model keeps none of them.
                if not any(is_credential(k) for k in given):
                    raise ApiError(400, "invalid_request", "The model's host or provider changes: give its "
                                   "credential again in the same update.", "litellm_params")
                stored = {k: v for k, v in stored.items() if not is_credential(k)}
            merged_params = {**stored, **given}
            merged_info = {**doc.get("model_info", {}), **{k: v for k, v in info.items() if v is not None},
                           "id": model_id}
            name = body.get("model_name") or doc.get("model_name")
            # Checked as a whole (a stored credential, sealed, stands for itself).
            shown["deployment"] = self.checked(model_id, {"model_name": name, "litellm_params": merged_params,
                                                          "model_info": merged_info})
            doc.update(model_name=name, litellm_params=self.sealed(model_id, merged_params), model_info=merged_info,
                       updated_at=now_iso(), updated_by=self.changed_by(request))
            return doc

        try:
            doc = await self.writer(request).update_model(model_id, change)
        except NotFound:
            raise ApiError(400, "invalid_request", "model not found", "model_info.id") from None
        await self.served_now()
        return web.json_response(self.shown(doc, shown["deployment"]))

    async def served_now(self) -> None:
        """This replica serves the change before it answers; the change itself is committed,
        so a failure to read the models again is logged, not answered (the invalidation
        channel brings it, as to the other replicas)."""
        try:
            await self.models_changed()
        except Exception:
            log.exception("runtime models not reloaded after a change (committed; the next change or the "
                          "invalidation channel reloads them)")

    def stored_models_on(self) -> None:
        if not self.runtime().config.store_model_in_db:
            raise ApiError(500, "store_model_in_db_off", NOT_STORED)

    def mapping(self, body: dict[str, Any], name: str) -> dict[str, Any]:
        value = body.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ApiError(400, "invalid_request", f"'{name}' must be an object.", name)
        return value

    def valid_id(self, model_id: Any) -> None:
        if not isinstance(model_id, str) or not MODEL_ID.fullmatch(model_id):
            raise ApiError(400, "invalid_request", "model_info.id must be 1-128 letters, digits, '.', '_' or '-'.",
                           "model_info.id")

    def not_config_model(self, model_id: str) -> None:
        if any(d.model_id is None and d.name == model_id for d in self.runtime().config.deployments):
            raise ApiError(400, "invalid_request", "Can't edit model. Model in config. Store model in db via "
                           "`/model/new`. to edit.", "model_info.id")

    def checked(self, model_id: str, entry: dict[str, Any]) -> Deployment:
        """The entry as the gateway would serve it; 400 for one the config would refuse, or one
        that would reach past what a runtime model may (module docstring)."""
        config = self.runtime().config
        name = entry.get("model_name")
        if isinstance(name, str):
            taken = name_taken(config, name)
            if taken is not None:
                raise ApiError(400, "invalid_request", f"{taken}: the config is the source for its own models; "
                               "give the runtime model another model_name.", "model_name")
        if isinstance(entry.get("model_info"), dict) and entry["model_info"].get("team_id") is not None:
            # LiteLLM's team models: a model only that team may call. Stored as a model for all,
            # it would be open to every key: refused until it is built.
            raise ApiError(400, "invalid_request", "Team models (model_info.team_id) are not supported: a runtime "
                           "model is for every caller its access rules admit.", "model_info.team_id")
        if len(json.dumps(entry, default=str)) > ENTRY_MAX_BYTES:
            # (each replica keeps every model, and Redis holds them: bounded, with the count)
            raise ApiError(400, "invalid_request", f"The model's entry is over {ENTRY_MAX_BYTES} bytes.")
        params = entry.get("litellm_params") or {}
        self.environment_only_for_credentials(entry)
        for param, value in params.items():
            if is_credential(param) and value is not None and not isinstance(value, str):
                raise ApiError(400, "invalid_request", f"litellm_params.{param} must be a string.",
                               f"litellm_params.{param}")
        try:
            deployment = runtime_deployment(config, model_id, entry)
        except UnsetVariable as e:  # (refused below: a variable the config's models do not use)
            deployment = runtime_deployment(config, model_id, entry, unavailable=e.problem)
        except ConfigError as e:
            raise ApiError(400, "invalid_request", f"{e.yaml_path}: {e.problem}") from None
        except (ValueError, TypeError, OverflowError) as e:
            raise ApiError(400, "invalid_request", f"model {model_id}: {type(e).__name__} reading the entry") from None
        self.within_reach(deployment, params)
        return deployment

    def environment_only_for_credentials(self, entry: Any, where: str = "") -> None:
        """``os.environ/NAME`` only as a credential parameter's value: anywhere else (a model
        name, api_version, model_info) the variable's value would be shown to every caller."""
        items = entry.items() if isinstance(entry, dict) else enumerate(entry) if isinstance(entry, list) else ()
        for key, value in items:
            path = f"{where}.{key}" if where else str(key)
            if isinstance(value, (dict, list)):
                self.environment_only_for_credentials(value, path)
            elif isinstance(value, str) and value.startswith(ENV_PREFIX) and not (
                    path.startswith("litellm_params.") and path.count(".") == 1 and is_credential(str(key))):
                raise ApiError(400, "invalid_request", f"{path}: only a credential parameter may name the "
                               "environment (os.environ/...).", path)

    def within_reach(self, deployment: Deployment, params: dict[str, Any]) -> None:
        """What a runtime model may send where: a variable only to the hosts the config's own
        models send it to (an admin choosing the host would otherwise read any secret of the
        sidecar's environment); never the gateway's own cloud identity; a Bedrock region
        Envoy signs for; no link-local host (a cloud's metadata service)."""
        config = self.runtime().config
        cluster = providers.upstream(deployment.api_base).cluster if deployment.api_base else None
        for param, value in params.items():
            if isinstance(value, str) and value.startswith(ENV_PREFIX):
                variable = value[len(ENV_PREFIX):]
                if cluster is None or cluster not in config.credential_hosts.get(variable, ()):
                    raise ApiError(400, "invalid_request", f"litellm_params.{param}: {variable} is not a credential "
                                   "the config's models send to this host; give the credential itself, or add the "
                                   "model to the config.", f"litellm_params.{param}")
        if deployment.token is not None:
            raise ApiError(400, "invalid_request", "A runtime model cannot use a token the gateway fetches with its "
                           "own cloud identity (Vertex AI, Entra ID): add it to the config.", "litellm_params")
        if deployment.region is not None and deployment.region not in {
                d.region for d in config.deployments if d.model_id is None and d.region}:
            raise ApiError(400, "invalid_request", f"Envoy signs Bedrock requests for the regions of the config's "
                           f"models only, not {deployment.region!r}: add the model to the config.", "litellm_params")
        if deployment.api_base:
            host = providers.upstream(deployment.api_base).host
            try:
                link_local = ipaddress.ip_address(host).is_link_local
            except ValueError:
                link_local = False
            if link_local:
                raise ApiError(400, "invalid_request", f"{host} is a link-local address (a cloud's metadata "
                               "service, say), not a provider.", "litellm_params.api_base")

    def sealed(self, model_id: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            return sealed_params(model_id, params, Sealer.from_environment(self.runtime().config.master_key))
        except ValueError as e:
            raise ApiError(400, "invalid_request", str(e), "litellm_params") from None

    def changed_by(self, request: web.Request) -> str:
        actor = request["audit"].actor
        return actor.user_id or actor.key_hash or actor.kind

    def shown(self, doc: dict[str, Any], deployment: Deployment) -> dict[str, Any]:
        """LiteLLM's model row, credentials never shown, with whether the gateway routes it
        (as this replica serves it now, when it does: its Envoy may not know the host)."""
        deployment = next((d for d in self.runtime().config.deployments if d.model_id == doc["model_id"]),
                          deployment)
        routable = {"routable": deployment.routable, **({"reason": deployment.unavailable}
                                                         if not deployment.routable else {})}
        return {**doc, "litellm_params": shown_params(doc.get("litellm_params") or {}),
                "model_info": {**(doc.get("model_info") or {}), "db_model": True, **routable}}
