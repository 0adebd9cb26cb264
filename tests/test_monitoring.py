"""The dashboards, alert rules, alert policies and KEDA queries in deploy/ name metrics a
live worker really exports: every PromQL expression is taken apart, and each metric it
names must be in the /metrics of a worker run with every feature that adds a metric
family (Pub/Sub source, Google tokens, a budget, a result store). Also: the files parse,
have the structure their tools need, and match deploy/monitoring/generate.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from worker.app import run_worker
from worker.http import METRICS_PATH, serve_http
from worker.metrics import Telemetry
from worker.settings import Settings
from worker.simulator import Simulator

from .fakes.metadata_server import MetadataServer
from .fakes.pubsub_emulator import PubSubEmulator
from .helpers import PROJECT, REPO, http_get, publish_jobs, read_jsonl, wait_until

MONITORING = REPO / "deploy" / "monitoring"
GRAFANA = MONITORING / "grafana-dashboard.json"
CLOUD = MONITORING / "cloud-monitoring-dashboard.json"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
GMP_RULES = MONITORING / "rules.yaml"
POLICIES = MONITORING / "alert-policies"
SCALED_OBJECT = REPO / "deploy" / "k8s" / "scaledobject.yaml"

#: Metrics that are not the worker's: Google Cloud metrics as Managed Service for
#: Prometheus (and Cloud Monitoring's PromQL) name them.
GCP_METRICS = {
    # pubsub.googleapis.com/subscription/num_undelivered_messages: the backlog.
    "pubsub_googleapis_com:subscription_num_undelivered_messages",
}

#: Worker metric families no panel shows, and why.
NOT_ON_THE_DASHBOARD = {
    "worker_jobs_skipped": "only file sources skip (resume); no meaning on Pub/Sub",
    "worker_sink_records": "the same numbers as succeeded / dead-lettered jobs",
}

# PromQL functions and aggregations (Prometheus 2.x / 3.x), and the words of the language.
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "avg", "avg_over_time", "bottomk", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "cos", "cosh", "count", "count_over_time", "count_values", "day_of_month", "day_of_week",
    "day_of_year", "days_in_month", "deg", "delta", "deriv", "exp", "floor", "group",
    "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta",
    "increase", "irate", "label_join", "label_replace", "last_over_time", "limitk",
    "limit_ratio", "ln", "log10", "log2", "mad_over_time", "max", "max_over_time", "min",
    "min_over_time", "minute", "month", "predict_linear", "present_over_time", "quantile",
    "quantile_over_time", "rad", "rate", "resets", "round", "scalar", "sgn", "sin", "sinh",
    "sort", "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt", "stddev",
    "stddev_over_time", "stdvar", "stdvar_over_time", "sum", "sum_over_time", "tan", "tanh",
    "time", "timestamp", "topk", "vector", "year",
}  # fmt: skip
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: selectors written ``name{...}``,
    ``name[...]`` or bare; not functions, keywords, label names or label values."""
    s = _STRING.sub('""', expr)  # label values, label_replace arguments
    s = re.sub(r"\{[^{}]*\}", "{}", s)  # label matchers (and Grafana $variables in them)
    s = re.sub(r"\[[^\[\]]*\]", "[]", s)  # ranges and subqueries ($__rate_interval)
    s = _GROUPING.sub(" ", s)  # by (le, sink), on (), group_left (x): label names
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables elsewhere
    names: set[str] = set()
    for m in _IDENT.finditer(s):
        word = m.group(0)
        if word.lower() in KEYWORDS:
            continue
        if s[m.end() :].lstrip().startswith("("):
            assert word in FUNCTIONS, f"{word!r} is not a PromQL function, in: {expr}"
        else:
            names.add(word)
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("worker_phase", {"worker_phase"}),
        (
            'sum by (phase) (worker_phase{phase="running",namespace=~"$namespace"})',
            {"worker_phase"},
        ),
        (
            'histogram_quantile(0.99, sum by (le, sink) (rate(a_bucket{x=~"$v"}[$__rate_interval])))',
            {"a_bucket"},
        ),
        ("sum(rate(a_total[5m])) / sum(rate(b_total[5m])) > 0.05", {"a_total", "b_total"}),
        ("a == 0 and ignoring (phase) b == 1 and (c > 0 or d > 0)", {"a", "b", "c", "d"}),
        ("x and on () (sum(rate(y[15m])) or vector(0)) == 0", {"x", "y"}),
        ('ns:metric_with_colon{subscription_id="by sum rate"} offset 5m', {"ns:metric_with_colon"}),
        ('label_replace(up, "dst", "$1", "src", "(.*)") * 1e3', {"up"}),
        ("sum(x) by (le) + max without (instance) (y) unless z bool", {"x", "y", "z"}),
        ("rate(x[5m:30s]) * 3600", {"x"}),
    ],
)
def test_the_extractor_finds_metric_names_and_nothing_else(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_the_extractor_refuses_an_unknown_function() -> None:
    with pytest.raises(AssertionError, match="not a PromQL function"):
        metric_names("rates(x[5m])")


# -- the files --------------------------------------------------------------------------


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _rules(path: Path) -> list[dict[str, Any]]:
    (doc,) = _yaml_docs(path)
    return [r for g in doc["spec"]["groups"] for r in g["rules"]]


def _policies() -> dict[str, dict[str, Any]]:
    return {p.name: _json(p) for p in sorted(POLICIES.glob("*.json"))}


def _keda_queries() -> list[str]:
    scaled = next(d for d in _yaml_docs(SCALED_OBJECT) if d["kind"] == "ScaledObject")
    return [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]


def all_queries() -> dict[str, list[str]]:
    """Every PromQL expression in deploy/, by where it is."""
    grafana = _json(GRAFANA)
    out: dict[str, list[str]] = {}
    for panel in grafana["panels"]:
        out[f"grafana: {panel['title']}"] = [t["expr"] for t in panel["targets"]]
    for var in grafana["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"]
            # label_values(metric, label): only the metric is PromQL.
            m = re.fullmatch(r"label_values\((\w+)\s*,\s*\w+\)", query)
            assert m, query
            out[f"grafana variable: {var['name']}"] = [m.group(1)]
    for tile in _json(CLOUD)["mosaicLayout"]["tiles"]:
        widget = tile["widget"]
        out[f"cloud monitoring: {widget['title']}"] = [
            d["timeSeriesQuery"]["prometheusQuery"] for d in widget["xyChart"]["dataSets"]
        ]
    for path in (PROMETHEUS_RULE, GMP_RULES):
        for rule in _rules(path):
            out[f"{path.name}: {rule['alert']}"] = [rule["expr"]]
    for name, policy in _policies().items():
        (condition,) = policy["conditions"]
        out[f"alert policy: {name}"] = [condition["conditionPrometheusQueryLanguage"]["query"]]
    out["keda"] = _keda_queries()
    return out


def test_the_generated_files_are_up_to_date() -> None:
    proc = subprocess.run(
        [sys.executable, str(MONITORING / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_grafana_dashboard_structure() -> None:
    d = _json(GRAFANA)
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    assert d["__inputs"][0]["pluginId"] == "prometheus"
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    titles = [p["title"] for p in d["panels"]]
    assert len(titles) == len(set(titles)), "panel titles are unique"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        assert p["type"] == "timeseries" and p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${DS_PROMETHEUS}"
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    variables = {v["name"] for v in d["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", json.dumps(d["panels"]))) - {"__rate_interval"}
    assert used <= variables, used - variables


def test_cloud_monitoring_dashboard_has_the_same_panels() -> None:
    d = _json(CLOUD)
    assert d["displayName"]
    layout = d["mosaicLayout"]
    tiles = layout["tiles"]
    titles = [t["widget"]["title"] for t in tiles]
    assert len(titles) == len(set(titles))
    assert titles == [p["title"] for p in _json(GRAFANA)["panels"]]
    for tile in tiles:
        assert tile["xPos"] + tile["width"] <= layout["columns"] <= 48
        data_sets = tile["widget"]["xyChart"]["dataSets"]
        assert data_sets
        for ds in data_sets:
            query = ds["timeSeriesQuery"]["prometheusQuery"]
            # No Grafana syntax left over.
            assert "$" not in query, query
    # Same metrics, panel by panel.
    for panel, tile in zip(_json(GRAFANA)["panels"], tiles, strict=True):
        grafana = set().union(*(metric_names(t["expr"]) for t in panel["targets"]))
        cloud = set().union(
            *(
                metric_names(ds["timeSeriesQuery"]["prometheusQuery"])
                for ds in tile["widget"]["xyChart"]["dataSets"]
            )
        )
        assert grafana == cloud, panel["title"]


def test_alert_rules_and_policies_agree() -> None:
    operator = _yaml_docs(PROMETHEUS_RULE)[0]
    gmp = _yaml_docs(GMP_RULES)[0]
    assert operator["apiVersion"] == "monitoring.coreos.com/v1"
    assert operator["kind"] == "PrometheusRule"
    assert gmp["apiVersion"] == "monitoring.googleapis.com/v1" and gmp["kind"] == "Rules"
    assert operator["spec"] == gmp["spec"]
    rules = _rules(PROMETHEUS_RULE)
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and "Runbook" in rule["annotations"]["description"]
    policies = _policies()
    by_rule = {}
    for policy in policies.values():
        (condition,) = policy["conditions"]  # a PromQL policy has exactly one condition
        promql = condition["conditionPrometheusQueryLanguage"]
        assert re.fullmatch(r"\d+s", promql["duration"]) and promql["query"]
        assert policy["severity"] in ("CRITICAL", "WARNING")
        assert policy["documentation"]["content"]
        by_rule[promql["alertRule"]] = policy
    # Every rule is a policy too, with the same query and duration; the one policy that is
    # not a rule needs a GCP metric no in-cluster rule evaluator sees.
    assert set(by_rule) - set(names) == {"WorkerBacklogNotDraining"}
    units = {"s": 1, "m": 60, "h": 3600}
    for rule in rules:
        promql = by_rule[rule["alert"]]["conditions"][0]["conditionPrometheusQueryLanguage"]
        assert promql["query"] == " ".join(rule["expr"].split())
        assert promql["duration"] == f"{int(rule['for'][:-1]) * units[rule['for'][-1]]}s"
        assert promql["labels"]["severity"] == rule["labels"]["severity"]


def test_the_required_alerts_exist() -> None:
    rules = {r["alert"]: r["expr"] for r in _rules(PROMETHEUS_RULE)}
    assert "worker_budget_exhausted == 1" in rules["WorkerBudgetReached"]
    assert "worker_token_refresh_failures_total" in rules["WorkerTokenRefreshFailing"]
    assert "worker_token_expiry_seconds" in rules["WorkerTokenRefreshFailing"]
    assert "worker_model_rate_limited_total" in rules["WorkerRateLimitedShareHigh"]
    assert "worker_jobs_dead_lettered_total" in rules["WorkerDeadLetterRateHigh"]
    assert "worker_queue_lag_seconds" in rules["WorkerQueueLagGrowing"]
    assert 'worker_phase{phase="running"}' in rules["WorkerNoProgress"]


def _keda_formula(formula: str, **metrics: float) -> float:
    """Evaluate the ScaledObject's formula, which uses only names, numbers, * > >= &&
    and one ``cond ? a : b`` (a tiny subset of github.com/expr-lang/expr)."""
    cond, rest = formula.split("?")
    then, otherwise = rest.split(":")
    python = {k: f"({v})" for k, v in (("c", cond), ("t", then), ("o", otherwise))}
    for key, text in python.items():
        assert re.fullmatch(r"[\w\s.*+/<>=&()-]+", text), text
        python[key] = text.replace("&&", " and ")
    env = dict(metrics)
    c = eval(python["c"], {"__builtins__": {}}, env)  # a fixed string, checked above
    return float(eval(python["t" if c else "o"], {"__builtins__": {}}, env))


def test_keda_holds_replicas_when_the_quota_is_saturated_and_follows_the_backlog_otherwise() -> (
    None
):
    scaled = next(d for d in _yaml_docs(SCALED_OBJECT) if d["kind"] == "ScaledObject")
    modifiers = scaled["spec"]["advanced"]["scalingModifiers"]
    triggers = scaled["spec"]["triggers"]
    # Every trigger is named (scalingModifiers needs it), and the formula names only them.
    names = {t["name"] for t in triggers}
    assert names == {"backlog", "saturation", "replicas"}
    assert set(re.findall(r"[A-Za-z_]\w*", modifiers["formula"])) == names
    assert modifiers["metricType"] == "AverageValue"
    target = float(modifiers["target"])
    (pubsub,) = [t for t in triggers if t["type"] == "gcp-pubsub"]
    assert float(pubsub["metadata"]["value"]) == target
    for t in triggers:
        if t["type"] == "prometheus":
            assert t["metadata"]["serverAddress"] == (
                "https://monitoring.googleapis.com/v1/projects/PROJECT_ID/location/global/prometheus"
            )
            assert t["authenticationRef"]["name"] == pubsub["authenticationRef"]["name"]

    def replicas_wanted(backlog: float, saturation: float, replicas: float) -> int:
        value = _keda_formula(
            modifiers["formula"], backlog=backlog, saturation=saturation, replicas=replicas
        )
        return int(-(-value // target))  # the HPA's ceil(value / target) for AverageValue

    # Not quota-bound: one replica per 500 messages.
    assert replicas_wanted(5000, 0.1, 2) == 10
    assert replicas_wanted(5000, 0.0, 0) == 10  # from zero: no worker series at all
    # Quota-bound: keep what is there, never more ...
    assert replicas_wanted(5000, 0.9, 3) == 3
    assert replicas_wanted(5000, 0.5, 4) == 4
    # ... but scale in when the backlog shrinks.
    assert replicas_wanted(600, 0.9, 4) == 2
    assert replicas_wanted(0, 0.9, 4) == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    rules = []
    for i, (where, exprs) in enumerate(sorted(all_queries().items())):
        for j, expr in enumerate(exprs):
            grafana = (
                expr.replace("$__rate_interval", "1m")
                .replace('"$namespace"', '".*"')
                .replace('"$subscription"', '".*"')
            )
            rules.append({"record": f"check:{i}:{j}", "expr": grafana, "labels": {"where": where}})
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "all", "rules": rules}]}))
    proc = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- against a live worker ----------------------------------------------------------------


async def _scrape_a_full_worker(
    sim: Simulator,
    emu: PubSubEmulator,
    metadata: MetadataServer,
    settings: Settings,
    tmp_path: Path,
) -> str:
    """Run the real worker on a Pub/Sub subscription with Google tokens, a budget and a
    result store (each adds metric families), and scrape /metrics once jobs are done."""
    del metadata  # serves the tokens; google-auth finds it through GCE_METADATA_HOST
    settings.model.auth = "google"
    settings.worker.source = f"pubsub:projects/{PROJECT}/subscriptions/work"
    settings.worker.budget_usd = 100.0
    settings.store.uri = f"sqlite:{tmp_path / 'store.db'}"
    settings.validate()
    sink = Path(settings.worker.sink.removeprefix("jsonl:"))
    publish_jobs(emu, 20)
    publish_jobs(emu, 5)  # the same ids again: answered from the store
    emu.publish(PROJECT, "jobs", b'{"id": "bad", "image_uri": "ftp://x/1.png"}')
    dead = sink.with_name("results.dead-letter.jsonl")

    telemetry = Telemetry()
    async with serve_http(telemetry, "127.0.0.1", 0) as server, anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_worker(settings, telemetry=telemetry))
        await wait_until(
            lambda: emu.acked(PROJECT, "work") >= 26 and len(read_jsonl(dead)) >= 1,
            30,
            "every message acked",
        )
        await anyio.sleep(0.5)  # a watchdog tick or two for the gauges
        status, text = await http_get(server.url + METRICS_PATH)
        tg.cancel_scope.cancel()
    assert status == 200
    return text


async def test_every_metric_the_monitoring_files_name_is_exported_by_a_live_worker(
    sim: Simulator,
    emu: PubSubEmulator,
    metadata: MetadataServer,
    fast_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emu.host_port)
    text = await _scrape_a_full_worker(sim, emu, metadata, fast_settings, tmp_path)
    families = list(text_string_to_metric_families(text))
    # Names as they appear in the exposition (counters with _total, histograms with
    # _bucket/_sum/_count), only those with at least one sample.
    exported = {s.name: f for f in families for s in f.samples}
    missing: dict[str, set[str]] = {}
    named: set[str] = set()
    for where, exprs in all_queries().items():
        for expr in exprs:
            for name in metric_names(expr):
                named.add(name)
                if name not in exported and name not in GCP_METRICS:
                    missing.setdefault(name, set()).add(where)
    assert not missing, f"named but not exported: {missing}"
    # Names the way PromQL sees them: a counter only with _total, a histogram's buckets.
    for name in named - GCP_METRICS:
        family = exported[name]
        if family.type == "counter":
            assert name == family.name + "_total", name
        if family.type == "histogram":
            assert name == family.name + "_bucket", f"{name}: quantiles come from buckets"
    # The other way round: every family the worker exports is on the dashboard, unless
    # listed (with the reason) in NOT_ON_THE_DASHBOARD.
    grafana = {
        n for w, exprs in all_queries().items() if w.startswith("grafana") for e in exprs
        for n in metric_names(e)
    }  # fmt: skip
    on_dashboard = {exported[n].name for n in grafana if n in exported}
    worker_families = {f.name for f in families if f.name.startswith("worker_") and f.samples}
    assert worker_families - on_dashboard == set(NOT_ON_THE_DASHBOARD)
