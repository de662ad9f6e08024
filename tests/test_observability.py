"""Metrics scraped after a scripted run, decision logs, and no secret in either."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from tests import harness
from tests.harness import MASTER_KEY, Sidecar, check_request, http, wait_until

SERVICE = {"grpc_type": "unary", "grpc_service": "envoy.service.auth.v3.Authorization", "grpc_method": "Check"}


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = http("GET", f"http://127.0.0.1:{port}/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def run_script(side: Sidecar) -> tuple[str, dict[str, int]]:
    """A fixed mix of decisions; returns the key used and how many of each were made."""
    key = http("POST", side.admin + "/key/generate", {"models": ["gpt-4"], "key_alias": f"obs-{side.grpc_port}"},
               {"Authorization": f"Bearer {MASTER_KEY}"}).json()["key"]
    http("POST", side.admin + "/key/generate", {"models": ["nope"]}, {"Authorization": f"Bearer {MASTER_KEY}"})
    http("GET", side.admin + "/team/list", headers={"Authorization": "Bearer wrong"})
    plan = [("allow", "ok", key, "gpt-4")] * 7 + [("deny", "model_not_allowed", key, "gpt-4o")] * 3 + \
           [("deny", "invalid_api_key", "sk-nope", "gpt-4")] * 2 + [("deny", "missing_api_key", "", "gpt-4")]
    with grpc.insecure_channel(f"127.0.0.1:{side.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for i, (_, _, k, model) in enumerate(plan):
            headers = {"x-request-id": f"req-{i}", **({"authorization": f"Bearer {k}"} if k else {})}
            stub.Check(check_request(headers, json.dumps({"model": model}).encode()), timeout=5)
    counts: dict[str, int] = {}
    for outcome, code, _, _ in plan:
        counts[f"{outcome}/{code}"] = counts.get(f"{outcome}/{code}", 0) + 1
    return key, counts


def test_metrics_and_decision_logs(workdir: Path, config_path: Path, redis_port: int) -> None:
    side = harness.start_sidecar(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0",
                                 {"EXTAUTHZ_LOG_ALLOWED": "true"})
    try:
        key, counts = run_script(side)
        # Per-request counts reach the Prometheus metrics once a second.
        wait_until(lambda: value(scrape(side.metrics_port), "grpc_server_handled_total", **SERVICE, grpc_code="OK") == 13)
        samples = scrape(side.metrics_port)
        for outcome_code, n in counts.items():
            outcome, code = outcome_code.split("/")
            assert value(samples, "extauthz_decisions_total", outcome=outcome, code=code) == n, outcome_code
        assert value(samples, "grpc_server_handled_total", **SERVICE, grpc_code="OK") == 13
        assert value(samples, "grpc_server_handling_seconds_count", **SERVICE) == 13
        assert value(samples, "extauthz_decision_seconds_count") == 13
        assert value(samples, "extauthz_admin_requests_total", route="/key/generate", status="200") == 1
        assert value(samples, "extauthz_admin_requests_total", route="/key/generate", status="400") == 1
        assert value(samples, "extauthz_admin_requests_total", route="/team/list", status="401") == 1
        # Cache counters are copied once a second.
        wait_until(lambda: value(scrape(side.metrics_port), "extauthz_cache_events_total", event="hit") >= 1)
        assert value(scrape(side.metrics_port), "extauthz_cache_events_total", event="miss") >= 2

        def decisions() -> list[dict]:  # the decision log is written in batches, at most 0.2 s late
            entries = [json.loads(line) for line in side.proc.log_text().splitlines() if line.startswith("{")]
            return [e for e in entries if e["logger"] == "extauthz.decision"]

        wait_until(lambda: len(decisions()) == 13)
        by_request = {e["request_id"]: e for e in decisions()}
        denied = by_request["req-7"]
        assert denied["outcome"] == "deny" and denied["code"] == "model_not_allowed" and denied["status"] == 403
        assert denied["key_alias"] == f"obs-{side.grpc_port}" and len(denied["key_hash"]) == 12
        assert denied["model"] == "gpt-4o" and denied["latency_ms"] >= 0
        allowed = by_request["req-0"]
        assert allowed["outcome"] == "allow" and allowed["deployment"] == "1:gpt-4"
        assert by_request["req-12"]["code"] == "missing_api_key"
        everything = side.proc.log_text() + http("GET", f"http://127.0.0.1:{side.metrics_port}/metrics").text
        for secret in (key, MASTER_KEY, "sk-upstream-gpt-4"):
            assert secret not in everything
    finally:
        side.proc.stop()


def test_metrics_sum_over_workers(workdir: Path, config_path: Path, redis_port: int) -> None:
    side = harness.start_sidecar(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0",
                                 extra_args=["--workers", "2"])
    try:
        request = check_request({"authorization": f"Bearer {MASTER_KEY}"}, b'{"model": "gpt-4"}')
        for _ in range(8):  # separate connections, spread over the workers
            with grpc.insecure_channel(f"127.0.0.1:{side.grpc_port}",
                                       options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                for _ in range(25):
                    stub.Check(request, timeout=5)
        wait_until(lambda: value(scrape(side.metrics_port), "extauthz_decisions_total", outcome="allow", code="ok") == 200)
    finally:
        side.proc.stop()


def test_tracing_continues_the_callers_trace(workdir: Path, config_path: Path, redis_port: int) -> None:
    side = harness.start_sidecar(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0",
                                 {"EXTAUTHZ_TRACING": "console"})
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        headers = {"authorization": "Bearer sk-unknown-for-tracing", "traceparent": f"00-{trace_id}-{parent_id}-01"}
        with grpc.insecure_channel(f"127.0.0.1:{side.grpc_port}") as channel:
            external_auth_pb2_grpc.AuthorizationStub(channel).Check(
                check_request(headers, b'{"model": "gpt-4"}'), timeout=5)
        wait_until(lambda: '"redis GET"' in side.proc.log_text())
        spans = [json.loads(line) for line in side.proc.log_text().splitlines()
                 if line.startswith("{") and '"trace_id"' in line]
        check = next(s for s in spans if s["name"] == "envoy.service.auth.v3.Authorization/Check")
        redis_get = next(s for s in spans if s["name"] == "redis GET")
        assert check["context"]["trace_id"] == "0x" + trace_id and check["parent_id"] == "0x" + parent_id
        assert redis_get["context"]["trace_id"] == "0x" + trace_id
        assert redis_get["parent_id"] == check["context"]["span_id"]
    finally:
        side.proc.stop()


def test_reading_a_config_does_not_import_the_metrics_library() -> None:
    # --workers sets prometheus_client's multiprocess directory after the config is read;
    # imported before, the workers' values would never reach the supervisor's /metrics.
    import subprocess
    import sys
    code = ("import sys; from extauthz import config; config.load('examples/config.yaml', environ={}, "
            "require_secrets=False); print('prometheus_client' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=harness.ROOT, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
