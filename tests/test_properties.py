"""Property: whatever a client sends, the answer is an allow the rules admit or a
well-formed deny, and nothing raises. Runs the real parsing, decision and encoding
in-process (the pure core; the gRPC and Redis edges are covered elsewhere)."""

from __future__ import annotations

import json
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extauthz.check.decision import Allow
from extauthz.check.policy import allowed_by, decide
from extauthz.check.request import body_of, facts_from_check, with_body
from extauthz.check.responses import allow_bytes, deny_bytes
from extauthz.check.runtime import Runtime
from extauthz.config import from_dict
from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2
from extauthz.domain.record import MASTER, KeyRecord, TeamRecord, hash_token
from tests.lanes import examples

RUNTIME = Runtime.of(from_dict({
    "model_list": [
        {"model_name": "gpt-4", "litellm_params": {"model": "openai/gpt-4", "api_key": "sk-p"},
         "model_info": {"access_groups": ["beta"]}},
        {"model_name": "claude", "litellm_params": {"model": "anthropic/claude-x", "api_key": "sk-a"}},
        {"model_name": "az", "litellm_params": {"model": "azure/dep", "api_base": "https://x.azure.com",
                                                "api_version": "1", "api_key": "k"}},
        {"model_name": "openai/*", "litellm_params": {"model": "openai/*", "api_key": "sk-w"}},
    ],
    "general_settings": {"master_key": "sk-master", "pass_through_endpoints": [
        {"path": "/v1/rerank", "target": "https://rerank.example/v1/rerank"}]},
}))
TEAM = TeamRecord("t1", "team", ("gpt-4", "openai/*"), False)
KEYS = {
    "sk-beta": KeyRecord(hash_token("sk-beta"), "beta", ("beta",), None, None, False),
    "sk-team": KeyRecord(hash_token("sk-team"), None, (), "t1", None, False),
    "sk-blocked": KeyRecord(hash_token("sk-blocked"), None, (), None, None, True),
    "sk-expired": KeyRecord(hash_token("sk-expired"), None, (), None, 1.0, False),
}
TOKENS = st.sampled_from([*KEYS, "sk-master", "sk-unknown", "", " ", "sk-beta\r\n"])
MODELS = st.one_of(st.sampled_from(["gpt-4", "claude", "az", "openai/gpt-4o", "openai/", "nope", "GPT-4"]),
                   st.text(max_size=300), st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=2))
PATHS = st.one_of(st.sampled_from([
    "/v1/chat/completions", "/chat/completions", "/v1/messages", "/v1/embeddings", "/v1/audio/transcriptions",
    "/openai/deployments/az/chat/completions?api-version=1", "/openai/deployments/gpt-4/embeddings",
    "/v1beta/models/gpt-4:generateContent", "/v1/rerank", "/v1/rerank/x", "/v1/files", "/"]),
    st.text(max_size=60).map(lambda s: "/" + s))


def body_strategy() -> st.SearchStrategy[bytes]:
    as_json = st.fixed_dictionaries({"model": MODELS}, optional={"messages": st.just([]), "x": st.text()}).map(
        lambda d: json.dumps(d).encode())
    duplicated = st.tuples(MODELS, MODELS).map(
        lambda m: ('{"model": %s, "model": %s}' % (json.dumps(m[0]), json.dumps(m[1]))).encode())
    return st.one_of(as_json, duplicated, st.binary(max_size=200), st.just(b""), st.just(b"[" * 5000))


@settings(max_examples=examples(1500), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token=TOKENS, header=st.sampled_from(["authorization", "x-api-key", "api-key", "x-goog-api-key"]),
       scheme=st.sampled_from(["Bearer ", "bearer ", "Basic ", ""]), path=PATHS, body=body_strategy(),
       extra=st.dictionaries(st.sampled_from(["x-api-key", "content-encoding", "x-envoy-auth-partial-body",
                                              "x-extauthz-cluster", "anthropic-version", "content-type"]),
                             st.text(max_size=30), max_size=3))
def test_every_check_request_gets_an_admitted_allow_or_a_well_formed_deny(
        token: str, header: str, scheme: str, path: str, body: bytes, extra: dict[str, str]) -> None:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.path, http.method, http.raw_body = path, "POST", body
    http.headers.update({**extra, header: (scheme if header == "authorization" else "") + token})

    facts = with_body(facts_from_check(request, RUNTIME.pass_through), body_of(request))
    key = MASTER if facts.token == "sk-master" else KEYS.get(facts.token or "")
    team = TEAM if key is not None and key.team_id == "t1" else None
    decision = decide(facts, key, team, RUNTIME.catalog, time.time(), 0.5)

    if isinstance(decision, Allow):
        response = external_auth_pb2.CheckResponse.FromString(
            allow_bytes(decision))
        assert response.status.code == 0 and response.HasField("ok_response")
        assert key is not None and not key.blocked and key.expires_at is None
        if decision.route_id.startswith("pass_through:"):
            return
        resolution = RUNTIME.catalog.resolve(facts.model)
        assert resolution is not None and allowed_by(key, team, resolution)
        sent = {h.header.key: h.header.value for h in response.ok_response.headers}
        assert sent["x-extauthz-cluster"] and sent[":path"].startswith("/")
        assert facts.token not in json.dumps(sent)
    else:
        response = external_auth_pb2.CheckResponse.FromString(deny_bytes(decision))
        assert response.status.code != 0 and response.HasField("denied_response")
        assert response.denied_response.status.code in (400, 401, 403, 404, 413, 415)
        error = json.loads(response.denied_response.body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
