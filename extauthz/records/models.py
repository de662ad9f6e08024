"""Runtime models in Redis (``general_settings.store_model_in_db``): one document per model,
``<p>model:<id>``, and the set of ids ``<p>models``; written atomically with the audit
entry of the change (records/write_base.py), read whole by every replica when one changes
(the invalidation channel reports the change: records/invalidation.py).

A document is LiteLLM's model row: ``model_id``, ``model_name``, ``litellm_params`` (each
credential sealed: records/sealed.py), ``model_info``, ``created_at``/``created_by``,
``updated_at``/``updated_by``.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from extauthz.domain.providers import ENV_PREFIX, is_credential
from extauthz.records.sealed import Sealer, SealError, is_sealed
from extauthz.records.store import REDIS_ERRORS, Conflict, Doc, NotFound, StoreUnavailable, text
from extauthz.records.write_base import Tx, WriterBase

MODEL_PREFIX = "model:"
REDACTED = "[redacted]"


def sealed_params(model_id: str, params: dict[str, Any], sealer: Sealer | None) -> dict[str, Any]:
    """litellm_params as stored: each credential given literally sealed (a reference to the
    environment is kept, and read where the model is served). ValueError when there is a
    credential to seal and no key to seal it with."""
    out = {}
    for name, value in params.items():
        if is_credential(name) and isinstance(value, str) and not value.startswith(ENV_PREFIX) \
                and not is_sealed(value):
            if sealer is None:
                raise ValueError(f"litellm_params.{name}: a credential needs a key to be stored with: set "
                                 "general_settings.master_key or LITELLM_SALT_KEY, or give it as os.environ/NAME")
            value = sealer.seal(value, f"{model_id}/{name}")
        out[name] = value
    return out


def shown_params(params: dict[str, Any]) -> dict[str, Any]:
    """litellm_params as the API shows them: a credential's value never (a reference to the
    environment is no secret, and is shown)."""
    return {name: REDACTED if is_credential(name) and not (isinstance(value, str) and value.startswith(ENV_PREFIX))
            else value for name, value in params.items()}


def opened_entry(doc: Any, sealer: Sealer | None, model_id: str = "?") -> tuple[str, Doc, str | None]:
    """A stored model as a model_list entry, its credentials opened, and why it cannot be
    served (a credential that does not open, a document written by hand that no model can
    be made of) or None."""
    if not isinstance(doc, dict) or not isinstance(doc.get("litellm_params"), dict) \
            or not isinstance(doc.get("model_info", {}) or {}, dict):
        return model_id, {"model_name": None}, "the stored document is not a model (written by hand?)"
    model_id = str(doc.get("model_id") or model_id)
    params, problem = {}, None
    for name, value in doc["litellm_params"].items():
        if is_sealed(value):
            try:
                if sealer is None:
                    raise SealError("a sealed credential, and no master key or LITELLM_SALT_KEY to open it with")
                value = sealer.open(value, f"{model_id}/{name}")
            except SealError as e:
                problem = f"litellm_params.{name}: {e}"
                continue
        params[name] = value
    return model_id, {"model_name": doc.get("model_name"), "litellm_params": params,
                      "model_info": doc.get("model_info") or {}}, problem


def _json(raw: Any) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


class ModelWrites(WriterBase):
    def model_key(self, model_id: str) -> str:
        return f"{self.prefix}{MODEL_PREFIX}{model_id}"

    @property
    def models_index(self) -> str:
        return f"{self.prefix}models"

    async def create_model(self, doc: Doc) -> Doc:
        async def body(tx: Tx) -> Doc:
            if await tx.pipe.exists(self.model_key(doc["model_id"])):
                raise Conflict(f"a model with id {doc['model_id']!r} already exists")
            tx.pipe.multi()
            tx.put(self.model_key(doc["model_id"]), doc)
            tx.pipe.sadd(self.models_index, doc["model_id"])
            return doc

        return await self._transact(body, self.model_key(doc["model_id"]))

    async def update_model(self, model_id: str, change: Callable[[Doc], Doc]) -> Doc:
        async def body(tx: Tx) -> Doc:
            old = await tx.read(self.model_key(model_id))
            if old is None:
                raise NotFound(f"Model with id={model_id} not found in db")
            new = change(dict(old))
            tx.pipe.multi()
            tx.put(self.model_key(model_id), new)
            return new

        return await self._transact(body, self.model_key(model_id))

    async def delete_model(self, model_id: str) -> Doc:
        async def body(tx: Tx) -> Doc:
            old = await tx.read(self.model_key(model_id))
            if old is None:
                raise NotFound(f"Model with id={model_id} not found in db")
            tx.pipe.multi()
            tx.drop(self.model_key(model_id))
            tx.pipe.srem(self.models_index, model_id)
            return old

        return await self._transact(body, self.model_key(model_id))

    async def get_model(self, model_id: str) -> Doc | None:
        try:
            raw = await self.redis.get(self.model_key(model_id))
        except REDIS_ERRORS as e:
            raise StoreUnavailable(type(e).__name__) from None
        return None if raw is None else json.loads(raw)

    async def models(self) -> list[tuple[str, Any]]:
        """Every runtime model's (id, document), by id (an id in the index whose document is
        gone is skipped: a delete in progress; one that is no JSON is None)."""
        try:
            ids = sorted(text(m) for m in await self.redis.smembers(self.models_index))
            raws = await self.redis.mget([self.model_key(i) for i in ids]) if ids else []
        except REDIS_ERRORS as e:
            raise StoreUnavailable(type(e).__name__) from None
        return [(i, _json(raw)) for i, raw in zip(ids, raws, strict=True) if raw is not None]
