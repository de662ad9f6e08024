"""The report: the table, the targets met or missed, and warnings about the run itself."""

from __future__ import annotations

from typing import Any


from bench.shape import CACHE_SAMPLE, TARGETS

def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def table(results: dict[str, Any]) -> str:
    floor, noop = results["floor"], results["envoy_noop"]
    rows = [("case", "rate/s", "x floor", "p50 ms", "p99 ms", "authz cpu µs/check", "x floor", "redis GET/check")]
    for name, label in (("floor", "gRPC no-op server (floor)"), ("warm", "gRPC sidecar, warm cache"),
                        ("cold", "gRPC sidecar, no cache")):
        m = results[name]
        rows.append((label, f"{m['checks_per_s']:.0f}", f"{ratio(m['checks_per_s'], floor['checks_per_s']):.2f}",
                     f"{m['p50_ms']:.2f}", f"{m['p99_ms']:.2f}", f"{m['cpu_us_per_check']:.0f}",
                     f"{ratio(m['cpu_us_per_check'], floor['cpu_us_per_check']):.2f}",
                     f"{m['redis_gets_per_check']:.2f}"))
    for name, label in (("envoy_direct", "Envoy, no ext_authz"), ("envoy_noop", "Envoy + no-op server (floor)"),
                        ("envoy_sidecar", "Envoy + sidecar, warm cache"),
                        ("envoy_sidecar_untracked", "  the same, spend_tracking off"),
                        ("envoy_sidecar_stream", "Envoy + sidecar, streamed"),
                        ("envoy_sidecar_untracked_stream", "  the same, spend_tracking off")):
        m = results[name]
        cpu = m.get("authz_cpu_us_per_request")
        rows.append((label, f"{m['rps']:.0f}", f"{ratio(m['rps'], noop['rps']):.2f}", f"{m['p50_ms']:.2f}",
                     f"{m['p99_ms']:.2f}", "-" if cpu is None else f"{cpu:.0f}",
                     "-" if cpu is None else f"{ratio(cpu, noop['authz_cpu_us_per_request']):.2f}",
                     f"{m['redis_gets_per_request']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(5, "-" * len(lines[0]))
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> dict[str, Any]:
    warm_x = ratio(results["warm"]["cpu_us_per_check"], results["floor"]["cpu_us_per_check"])
    rps_x = ratio(results["envoy_sidecar"]["rps"], results["envoy_noop"]["rps"])
    rss = results["sidecar_rss_mb_100k_keys"]
    hit_share = results["memory_pass"]["cache_hit_share_after"]
    out = {
        "warm_cpu_x_floor": {"value": warm_x, "limit": f"<= {TARGETS['warm_cpu_x_floor_max']}",
                             "pass": warm_x is not None and warm_x <= TARGETS["warm_cpu_x_floor_max"],
                             "per_rep": [ratio(w, f) for w, f in zip(results["warm"]["cpu_us_per_check_per_rep"],
                                                                      results["floor"]["cpu_us_per_check_per_rep"])]},
        "envoy_sidecar_rps_x_envoy_noop": {
            "value": rps_x, "limit": f">= {TARGETS['envoy_sidecar_rps_x_noop_min']}",
            "pass": rps_x is not None and rps_x >= TARGETS["envoy_sidecar_rps_x_noop_min"],
            "per_rep": [ratio(s, n) for s, n in zip(results["envoy_sidecar"]["rps_per_rep"],
                                                    results["envoy_noop"]["rps_per_rep"])]},
        "sidecar_rss_mb_100k_keys": {"value": rss, "limit": f"<= {TARGETS['rss_mb_max']}",
                                     "pass": hit_share >= 0.99 and rss <= TARGETS["rss_mb_max"]},
    }
    held = results["holds"]["budgeted_cpu_x_limited"]
    out["budgeted_cpu_x_limited"] = {"value": held, "limit": f"<= {TARGETS['budgeted_cpu_x_limited_max']}",
                                     "pass": held <= TARGETS["budgeted_cpu_x_limited_max"]}
    for kind in ("json", "stream"):
        measured = results["accounting"][kind]
        out[f"accounting_rps_x_without_{kind}"] = {
            "value": measured["rps_on_x_off"], "limit": f">= {TARGETS['accounting_rps_x_without_min']}",
            "pass": measured["rps_on_x_off"] >= TARGETS["accounting_rps_x_without_min"],
            "per_rep": measured["per_rep_x"]}
    counted = results["instructions"]
    for kind in ("allowed", "denied"):
        value = counted[f"{kind}_x_floor"]
        out[f"instructions_{kind}_x_floor"] = {"value": value, "limit": f"<= {TARGETS['instructions_x_floor_max']}",
                                               "pass": value <= TARGETS["instructions_x_floor_max"]}
    through = counted["envoy_sidecar_throughput_x_floor"]
    out["envoy_instructions_throughput_x_floor"] = {
        "value": through, "limit": f">= {TARGETS['envoy_instructions_throughput_x_floor_min']}",
        "pass": through >= TARGETS["envoy_instructions_throughput_x_floor_min"]}
    if hit_share < 0.99:
        out["sidecar_rss_mb_100k_keys"]["invalid"] = (
            f"the cache did not hold the keys: after the pass only {hit_share:.0%} of a sample of "
            f"{CACHE_SAMPLE} keys was answered without reading Redis; estimate with every key cached: "
            f"{results['sidecar_rss_mb_100k_keys_estimate']['mb']} MiB")
    return out


def warnings(results: dict[str, Any]) -> list[str]:
    out = []
    losses = results["warm_sidecar_invalidation_channel_losses"]
    for name, field in (("warm", "redis_gets_per_check"), ("envoy_sidecar", "redis_gets_per_request")):
        if results[name][field] > 0.05:
            out.append(f"{name}: the warm sidecar read Redis {results[name][field]:.2f} times per check: its cache "
                       f"was not holding (its invalidation channel was lost {losses['count']} times in "
                       f"{losses['uptime_s']:.0f} s; each loss empties the cache)")
    if results["memory_pass"]["unavailable"]:
        out.append(f"memory pass: {results['memory_pass']['unavailable']} checks were answered 'unavailable' "
                   f"(a Redis read slower than redis_timeout_ms, then the fail-fast window); asked again")
    if "invalid" in results["targets"]["sidecar_rss_mb_100k_keys"]:
        out.append("sidecar_rss_mb_100k_keys: " + results["targets"]["sidecar_rss_mb_100k_keys"]["invalid"])
    share = results["envoy_sidecar"]["denied_share"] - results["envoy_sidecar"]["expected_denied_share"]
    if abs(share) > 0.01:
        out.append(f"envoy_sidecar: denied share {results['envoy_sidecar']['denied_share']:.1%}, the population "
                   f"says {results['envoy_sidecar']['expected_denied_share']:.1%}")
    for name, measured in results["instructions"].items():
        if isinstance(measured, dict) and measured.get("spread", 0) > 0.01:
            out.append(f"instructions {name}: the last repetitions differ by {measured['spread']:.1%} "
                       f"({measured['repetitions']} repetitions): something else ran in the process")
    cal = results["machine_calibration_ms"]
    if cal["max"] > 1.3 * cal["min"]:
        out.append(f"the machine's speed varied during the run (a fixed loop took {cal['min']}-{cal['max']} ms): "
                   f"other load on the host; the ratios, measured in alternation, are steadier than the rates")
    return out
