"""splice.lua on its own, in a real Envoy: plans given straight to it (in the gateway
only the sidecar sets one), the body then reaching a fake upstream."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from extauthz.domain.envoy_names import SPLICE_HEADER
from extauthz.check.routing import edits_plan
from extauthz.envoy.render import _splice_filter
from tests.harness import BIN, Proc, http, http_ok, listener_port, ready_file

BODY = b'{"model" : "a", "stream": false, "x": [1, 2]}'


@pytest.fixture(scope="module")
def lua_envoy(workdir: Path, upstream_port: int) -> Iterator[str]:
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": "lua", "http_filters": [_splice_filter(), {"name": "envoy.filters.http.router",
               "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
           "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]}]}}
    boot = {"static_resources": {
        "listeners": [{"name": "ingress", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
        "clusters": [{"name": "upstream", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": "upstream", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}}}]}]}}]},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}}
    name = ready_file(workdir, "lua-envoy").stem
    config, admin_file = workdir / f"{name}.yaml", workdir / f"{name}.admin"
    config.write_text(yaml.safe_dump(boot))
    proc = Proc("envoy", [str(BIN / "envoy"), "-c", str(config), "--disable-hot-restart", "--log-level", "warn",
                          "--admin-address-path", str(admin_file)], workdir / f"{name}.log").start()
    try:
        proc.wait_ready(lambda: admin_file.exists() and admin_file.read_text().strip() != "")
        admin = int(admin_file.read_text().strip().rsplit(":", 1)[1])
        proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"))
        yield f"http://127.0.0.1:{listener_port(admin, 'ingress')}"
    finally:
        proc.stop()


def send(url: str, plan: str, body: bytes = BODY):
    return http("POST", url + "/v1/messages", raw=body, headers={SPLICE_HEADER: plan,
                                                                 "content-type": "application/json"})


def arrived(r) -> bytes:
    assert r.status == 200, r.text
    return base64.b64decode(r.json()["echo"]["raw_body"])


def test_several_edits_apply_together(lua_envoy: str) -> None:
    plan = edits_plan(len(BODY), [(1, 14, BODY[1:14], b'"v": 1'), (14, 31, BODY[14:31], b"")])
    assert arrived(send(lua_envoy, plan)) == b'{"v": 1, "x": [1, 2]}'


@pytest.mark.parametrize("plan", [
    edits_plan(len(BODY), [(1, 14, b'"model" : "b"', b'"v": 1')]),           # the bytes are not those checked
    edits_plan(len(BODY) + 1, [(1, 14, BODY[1:14], b"")]),                  # another body length
    edits_plan(len(BODY), [(14, 31, BODY[14:31], b""), (1, 14, BODY[1:14], b"")]),  # out of order
    edits_plan(len(BODY), [(1, 20, BODY[1:20], b""), (14, 31, BODY[14:31], b"")]),  # overlapping
    edits_plan(len(BODY), [(40, 60, b"", b"")]),                            # past the end
    f"{len(BODY)} * 1,14,{BODY[1:14].hex()},00 junk",                       # trailing garbage
    f"{len(BODY)} * 1,14,{BODY[1:14].hex()},0",                             # odd hex
    f"{len(BODY)} * ",                                                      # no edit
    f"{len(BODY)} *  1,14,{BODY[1:14].hex()},",                             # doubled space
])
def test_a_plan_that_does_not_fit_the_body_refuses_the_request(lua_envoy: str, plan: str) -> None:
    r = send(lua_envoy, plan)
    assert r.status == 500 and r.json()["error"]["code"] == "body_rewrite_failed", r.text
