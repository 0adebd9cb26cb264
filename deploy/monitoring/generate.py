"""Write the dashboards and alert rules in deploy/monitoring/ from one list of panels and
one list of alerts, so Grafana, Cloud Monitoring, the Prometheus Operator and Managed
Service for Prometheus show and alert on the same PromQL.

    python deploy/monitoring/generate.py           # rewrite the files
    python deploy/monitoring/generate.py --check   # exit 1 if a committed file differs

Edit PANELS or ALERTS here, not the generated files (tests/test_monitoring.py checks that
they match this script). Needs PyYAML.

Queries are written once, in Grafana's form: ``{ns}`` stands for the namespace selector
(``namespace=~"$namespace"`` in Grafana, nothing in Cloud Monitoring, which has no
dashboard variables for PromQL here) and ``$__rate_interval`` becomes ``5m`` outside
Grafana. Metric names are the exported ones: counters end in ``_total``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent

#: The subscription of deploy/k8s/deployment.yaml; Grafana asks for it ($subscription).
SUBSCRIPTION = "image-jobs"
#: Pub/Sub's backlog as Managed Service for Prometheus (and Cloud Monitoring's PromQL)
#: names the GCP metric pubsub.googleapis.com/subscription/num_undelivered_messages.
BACKLOG = "pubsub_googleapis_com:subscription_num_undelivered_messages"
NAMESPACE = "image-describer"
GROUP = "image-describer-worker"
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
CM_RATE = "5m"


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str  # Grafana unit id
    targets: tuple[Target, ...]
    description: str
    cm_unit: str = ""  # Cloud Monitoring unitOverride (UCUM)
    max: float | None = None


def _t(expr: str, legend: str) -> Target:
    return Target(" ".join(expr.split()), legend)


def _rate(metric: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{ns}}[$__rate_interval]))"


def _quantile(q: float, metric: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{ns}}[$__rate_interval])))"


PANELS: tuple[Panel, ...] = (
    Panel(
        "Throughput (jobs/s)",
        "short",
        (
            _t(_rate("worker_jobs_received_total"), "received"),
            _t(_rate("worker_jobs_succeeded_total"), "succeeded"),
            _t(_rate("worker_jobs_dead_lettered_total"), "dead-lettered"),
            _t(_rate("worker_jobs_nacked_total"), "nacked (back to Pub/Sub)"),
        ),
        "Jobs taken from the source and their outcomes, all replicas.",
        "1/s",
    ),
    Panel(
        "Job latency, admission to ack",
        "s",
        tuple(
            _t(_quantile(q, "worker_job_latency_seconds"), f"p{int(q * 100)}")
            for q in (0.5, 0.9, 0.99)
        ),
        "End to end inside the worker: from admission to the job's ack or nack.",
        "s",
    ),
    Panel(
        "Model request latency",
        "s",
        tuple(
            _t(_quantile(q, "worker_model_latency_seconds"), f"p{int(q * 100)}")
            for q in (0.5, 0.9, 0.99)
        ),
        "One model request, answer or failure (429s included: they answer fast).",
        "s",
    ),
    Panel(
        "429 share by endpoint",
        "percentunit",
        (
            _t(
                f"{_rate('worker_model_rate_limited_total', 'endpoint')}"
                f" / {_rate('worker_model_requests_total', 'endpoint')}",
                "{{endpoint}}",
            ),
        ),
        "Share of model answers that were 429 / RESOURCE_EXHAUSTED. Under --concurrency "
        "auto a few percent is the limiter probing the quota; alert above 20%.",
        "1",
    ),
    Panel(
        "Concurrency limit by endpoint (all replicas)",
        "short",
        (_t("sum by (endpoint) (worker_concurrency_limit{ns})", "{{endpoint}}"),),
        "Model requests allowed in flight now, summed over replicas; moves under "
        "--concurrency auto (AIMD).",
        "1",
    ),
    Panel(
        "Requests in flight and waiting",
        "short",
        (
            _t("sum by (endpoint) (worker_model_requests_in_flight{ns})", "in flight {{endpoint}}"),
            _t("sum(worker_model_requests_waiting{ns})", "waiting for a model slot"),
            _t("sum(worker_jobs_in_flight{ns})", "jobs admitted"),
        ),
        "Model requests in flight per endpoint, requests waiting for a slot on any endpoint, "
        "and jobs admitted but not finished.",
        "1",
    ),
    Panel(
        "Quota saturation",
        "percentunit",
        (
            _t("worker_quota_saturation{ns}", "{{instance}}"),
            _t("avg(worker_quota_saturation{ns})", "average (KEDA holds replicas above 0.5)"),
        ),
        "Share of the last minute in which jobs waited for a model slot while every endpoint "
        "that could serve them was held back by its quota. Near 1: another replica would not "
        "help.",
        "1",
        max=1,
    ),
    Panel(
        "Replicas by phase",
        "short",
        (
            _t("sum by (phase) (worker_phase{ns})", "{{phase}}"),
            _t("sum(worker_budget_exhausted{ns})", "budget spent (worker_budget_exhausted)"),
        ),
        "Worker processes in each phase: starting, running, budget_exhausted, draining, "
        "stopped; and how many have spent their budget (they stay so while draining).",
        "1",
    ),
    Panel(
        "Queue lag (publish to receipt)",
        "s",
        (_t("max by (instance) (worker_queue_lag_seconds{ns})", "{{instance}}"),),
        "Now minus the publish time of the latest job a replica received, at its receipt.",
        "s",
    ),
    Panel(
        "Subscription backlog (GCP metric)",
        "short",
        (
            _t(
                f'sum by (subscription_id) ({BACKLOG}{{subscription_id=~"$subscription"}})',
                "{{subscription_id}}",
            ),
        ),
        "Pub/Sub's num_undelivered_messages, what KEDA scales on. A GCP metric: it needs a "
        "datasource that can read Cloud Monitoring (Managed Service for Prometheus); a plain "
        "Prometheus shows nothing here.",
        "1",
    ),
    Panel(
        "Acks, nacks and lease extensions (per s)",
        "short",
        (
            _t(_rate("worker_source_acked_total"), "acked"),
            _t(_rate("worker_source_nacked_total"), "nacked"),
            _t(_rate("worker_source_extended_total"), "lease extensions"),
        ),
        "What Pub/Sub confirmed: acks, nacks (modifyAckDeadline 0) and lease extensions sent.",
        "1/s",
    ),
    Panel(
        "Ack failures and expired leases (per s)",
        "short",
        (
            _t(_rate("worker_source_ack_failures_total"), "ack failures"),
            _t(_rate("worker_source_modack_failures_total"), "modack failures"),
            _t(_rate("worker_source_lease_expired_total"), "leases expired (max_lease_s)"),
        ),
        "Acks and lease extensions that failed after retries (those messages come back), and "
        "messages let go at pubsub.max_lease_s. Should be flat at zero.",
        "1/s",
    ),
    Panel(
        "Dead letters by error type, and model errors by code (per s)",
        "short",
        (
            _t(_rate("worker_dead_letters_total", "error_type"), "dead letter {{error_type}}"),
            _t(_rate("worker_jobs_failed_total"), "failed (put nowhere)"),
            _t(
                'sum by (code) (rate(worker_model_requests_total{code!="200",ns}'
                "[$__rate_interval]))",
                "model {{code}}",
            ),
            _t(_rate("worker_model_retries_total"), "retries"),
        ),
        "Dead letters by error.type (the README's error types: bad input, images refused, "
        "schema mismatches, sink rejections) next to model answers by HTTP status.",
        "1/s",
    ),
    Panel(
        "Circuit breakers: replicas with the endpoint out",
        "short",
        (
            _t(
                'sum by (endpoint) (worker_endpoint_circuit_state{state="open",ns})',
                "open {{endpoint}}",
            ),
            _t(
                'sum by (endpoint) (worker_endpoint_circuit_state{state="half_open",ns})',
                "half-open {{endpoint}}",
            ),
            _t(
                "sum by (endpoint) (increase(worker_endpoint_circuit_opened_total{ns}"
                "[$__rate_interval]))",
                "times opened {{endpoint}}",
            ),
        ),
        "Replicas whose circuit for the endpoint is open (out of rotation) or half-open "
        "(probing), and how often circuits opened.",
        "1",
    ),
    Panel(
        "Access token: seconds to expiry",
        "s",
        (_t("min by (instance) (worker_token_expiry_seconds{ns})", "{{instance}}"),),
        "Refreshed at 75% of its life (15 min before expiry for Google's one-hour tokens). "
        "Below 5 min means refreshes are failing.",
        "s",
    ),
    Panel(
        "Token refreshes and failures (per min)",
        "short",
        (
            _t(f"{_rate('worker_token_refreshes_total')} * 60", "refreshes"),
            _t(f"{_rate('worker_token_refresh_failures_total')} * 60", "refresh failures"),
        ),
        "Access-token refreshes (metadata server / ADC) and the ones that failed.",
        "1/min",
    ),
    Panel(
        "Cost (USD/h) by tier",
        "currencyUSD",
        (
            _t(f"{_rate('worker_cost_usd_total', 'tier')} * 3600", "{{tier}}"),
            _t(f"{_rate('worker_cost_usd_total')} * 3600", "total"),
        ),
        "List-price cost of the answers per hour (answers whose price is known).",
        "{USD}/h",
    ),
    Panel(
        "Tokens per second by kind and tier",
        "short",
        (_t(_rate("worker_model_tokens_total", "kind, tier"), "{{kind}} {{tier}}"),),
        "Prompt and completion tokens of the model's answers: what the bill is made of, "
        "counted for models without a price too. Compare with the TPM quota.",
        "1/s",
    ),
    Panel(
        "Budget per replica: spent and --budget-usd",
        "currencyUSD",
        (
            _t("sum by (instance) (worker_cost_usd_total{ns})", "spent {{instance}}"),
            _t("max by (instance) (worker_budget_usd{ns})", "budget {{instance}}"),
        ),
        "The budget is per process: a replica stops admitting jobs once its own spend "
        "reaches it (worker_budget_exhausted = 1).",
        "{USD}",
    ),
    Panel(
        "Result store: hits and duplicates suppressed (per s)",
        "short",
        (
            _t(_rate("worker_store_hits_total"), "answered from the store"),
            _t(_rate("worker_duplicates_suppressed_total"), "duplicates suppressed"),
            _t(_rate("worker_store_errors_total"), "store errors"),
        ),
        "Jobs answered from the result store without a model call, redeliveries answered "
        "with the record already made, and store operations that failed (treated as misses).",
        "1/s",
    ),
    Panel(
        "Sink write p99 and event-loop lag",
        "s",
        (
            _t(
                "histogram_quantile(0.99, sum by (le, sink) "
                "(rate(worker_sink_write_seconds_bucket{ns}[$__rate_interval])))",
                "sink write p99 {{sink}}",
            ),
            _t("max(worker_event_loop_lag_seconds{ns})", "event-loop lag (max)"),
        ),
        "Group-committed writes to the result and dead-letter sinks; how late the loop "
        "watchdog's latest tick was.",
        "s",
    ),
)


@dataclass(frozen=True)
class Alert:
    name: str
    severity: str  # critical | warning
    duration: str  # Prometheus duration
    expr: str
    summary: str
    description: str  # with the runbook hint
    #: Only as a Cloud Monitoring policy (needs a GCP metric no rule evaluator here sees).
    cloud_only: bool = False
    labels: dict[str, str] = field(default_factory=dict)


ALERTS: tuple[Alert, ...] = (
    Alert(
        "WorkerNoProgress",
        "critical",
        "10m",
        """
(increase(worker_jobs_succeeded_total[15m]) + increase(worker_jobs_dead_lettered_total[15m])) == 0
and ignoring (phase) worker_phase{phase="running"} == 1
and (increase(worker_jobs_received_total[15m]) > 0 or worker_jobs_in_flight > 0)
""",
        "A running worker took or holds jobs but finished none in 15 minutes.",
        "Runbook: check worker_model_requests_total by code (is the model answering?), the "
        "circuit-breaker panel, and the pod's logs for job_nacked / sink_write_failed; jobs "
        "nacked over and over come back until the subscription dead-letters them.",
    ),
    Alert(
        "WorkerDeadLetterRateHigh",
        "warning",
        "15m",
        """
sum by (cluster, namespace) (rate(worker_jobs_dead_lettered_total[15m]))
/ (sum by (cluster, namespace) (rate(worker_jobs_succeeded_total[15m]))
   + sum by (cluster, namespace) (rate(worker_jobs_dead_lettered_total[15m])))
> 0.05
and sum by (cluster, namespace) (rate(worker_jobs_dead_lettered_total[15m])) * 60 > 1
""",
        "More than 5% of finished jobs (and over one a minute) go to the dead-letter sink.",
        "Runbook: see which error_type grows (worker_dead_letters_total, the dashboard's "
        "dead-letter panel), then read those records or the job_dead_lettered log events: "
        "bad input from a producer, images the model refuses, or a schema that answers no "
        "longer match.",
    ),
    Alert(
        "WorkerRateLimitedShareHigh",
        "warning",
        "15m",
        """
sum by (cluster, namespace, endpoint) (rate(worker_model_rate_limited_total[10m]))
/ sum by (cluster, namespace, endpoint) (rate(worker_model_requests_total[10m]))
> 0.2
""",
        "Over 20% of an endpoint's model answers are 429 for 15 minutes.",
        "Runbook: with --concurrency auto this means the limiter cannot settle (a fixed "
        "--concurrency above the quota, many replicas starting at once, or a quota just cut); "
        "check the concurrency-limit panel, lower max_concurrency or ask for more quota.",
    ),
    Alert(
        "WorkerTokenRefreshFailing",
        "critical",
        "5m",
        """
increase(worker_token_refresh_failures_total[10m]) > 0
or worker_token_expiry_seconds < 300
""",
        "Access-token refreshes fail, or the token held expires in under 5 minutes.",
        "Runbook: tokens are refreshed 15 min before expiry, so this is the metadata server "
        "or Workload Identity failing: check the pod's service-account binding "
        "(iam.gke.io/gcp-service-account, roles/iam.workloadIdentityUser) and the "
        "token_refresh_failed log events.",
    ),
    Alert(
        "WorkerBudgetReached",
        "warning",
        "1m",
        "worker_budget_exhausted == 1",
        "A replica spent its --budget-usd and admits no more jobs.",
        "Runbook: the replica reports not ready and waits for SIGTERM (messages it held went "
        "back to the subscription). The budget is per process: raise worker.budget_usd and "
        "restart the rollout, or leave it stopped on purpose.",
    ),
    Alert(
        "WorkerQueueLagGrowing",
        "warning",
        "15m",
        """
worker_queue_lag_seconds > 600
and deriv(worker_queue_lag_seconds[15m]) > 0
""",
        "Jobs arrive more than 10 minutes after they were published, and the lag keeps growing.",
        "Runbook: the fleet does not keep up: check the backlog and replicas panels (KEDA at "
        "maxReplicaCount? replicas held because quota saturation is high?) and the 429 share.",
    ),
    Alert(
        "WorkerBacklogNotDraining",
        "critical",
        "15m",
        f"""
sum by (subscription_id) ({BACKLOG}{{subscription_id="{SUBSCRIPTION}"}}) > 0
and on () ((sum(rate(worker_jobs_succeeded_total[15m])) + sum(rate(worker_jobs_dead_lettered_total[15m]))) or vector(0)) == 0
""",
        "The subscription has a backlog and no replica finished a job in 15 minutes.",
        "Runbook: also fires when there are no replicas at all: check the KEDA ScaledObject "
        "(kubectl describe scaledobject -n image-describer image-describer-worker) and its "
        "operator's Workload Identity, then the WorkerNoProgress runbook.",
        cloud_only=True,
    ),
)


# -- rendering -------------------------------------------------------------------------


def grafana_expr(expr: str) -> str:
    return expr.replace(",ns}", ',namespace=~"$namespace"}').replace(
        "{ns}", '{namespace=~"$namespace"}'
    )


def cloud_expr(expr: str) -> str:
    out = expr.replace(",ns}", "}").replace("{ns}", "")
    out = out.replace('subscription_id=~"$subscription"', f'subscription_id="{SUBSCRIPTION}"')
    return out.replace("$__rate_interval", CM_RATE)


def _flat(expr: str) -> str:
    return re.sub(r"\s+", " ", expr).strip()


def grafana_dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    width, height = 6, 8
    for i, p in enumerate(PANELS):
        defaults: dict[str, Any] = {"unit": p.unit, "min": 0}
        if p.max is not None:
            defaults["max"] = p.max
        defaults["custom"] = {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": p.title,
                "description": p.description,
                "datasource": DS,
                "gridPos": {"h": height, "w": width, "x": (i % 4) * width, "y": (i // 4) * height},
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": {
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"},
                },
                "targets": [
                    {
                        "refId": chr(ord("A") + j),
                        "datasource": DS,
                        "expr": grafana_expr(t.expr),
                        "legendFormat": t.legend,
                        "range": True,
                    }
                    for j, t in enumerate(p.targets)
                ],
            }
        )
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "description": "The Prometheus (or Managed Service for Prometheus) datasource "
                "that scrapes the workers' /metrics",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
        ],
        "id": None,
        "uid": "image-describer-worker",
        "title": "Image describer worker",
        "description": "Throughput, latency, quota, Pub/Sub, tokens, cost and store of the "
        "image-describer worker. Generated by deploy/monitoring/generate.py.",
        "tags": ["image-describer-worker"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-3h", "to": "now"},
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "namespace",
                    "label": "namespace",
                    "type": "query",
                    "datasource": DS,
                    "definition": "label_values(worker_phase, namespace)",
                    "query": {
                        "query": "label_values(worker_phase, namespace)",
                        "refId": "namespace",
                    },
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "refresh": 2,
                    "sort": 1,
                    "current": {},
                },
                {
                    "name": "subscription",
                    "label": "Pub/Sub subscription (backlog panel)",
                    "type": "textbox",
                    "query": SUBSCRIPTION,
                    "current": {"text": SUBSCRIPTION, "value": SUBSCRIPTION},
                },
            ]
        },
        "panels": panels,
    }


def cloud_dashboard() -> dict[str, Any]:
    tiles = []
    width, height = 12, 16
    for i, p in enumerate(PANELS):
        data_sets = []
        for t in p.targets:
            query: dict[str, Any] = {"prometheusQuery": cloud_expr(t.expr)}
            if p.cm_unit:
                query["unitOverride"] = p.cm_unit
            data_sets.append({"plotType": "LINE", "targetAxis": "Y1", "timeSeriesQuery": query})
        tiles.append(
            {
                "xPos": (i % 4) * width,
                "yPos": (i // 4) * height,
                "width": width,
                "height": height,
                "widget": {
                    "title": p.title,
                    "xyChart": {
                        "chartOptions": {"mode": "COLOR"},
                        "dataSets": data_sets,
                        "yAxis": {"scale": "LINEAR"},
                    },
                },
            }
        )
    return {
        "displayName": "Image describer worker",
        "labels": {"image-describer-worker": ""},
        "mosaicLayout": {"columns": 48, "tiles": tiles},
    }


def _rule(a: Alert) -> dict[str, Any]:
    return {
        "alert": a.name,
        "expr": _block(a.expr),
        "for": a.duration,
        "labels": {"severity": a.severity, **a.labels},
        "annotations": {"summary": a.summary, "description": a.description},
    }


def _block(expr: str) -> str:
    lines = [ln for ln in expr.strip().splitlines() if ln.strip()]
    return "\n".join(lines) + ("\n" if len(lines) > 1 else "")


def prometheus_rule() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": GROUP,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": GROUP},
        },
        "spec": {
            "groups": [
                {
                    "name": GROUP,
                    "interval": "30s",
                    "rules": [_rule(a) for a in ALERTS if not a.cloud_only],
                }
            ]
        },
    }


def gmp_rules() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.googleapis.com/v1",
        "kind": "Rules",
        "metadata": {
            "name": GROUP,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": GROUP},
        },
        "spec": {
            "groups": [
                {
                    "name": GROUP,
                    "interval": "30s",
                    "rules": [_rule(a) for a in ALERTS if not a.cloud_only],
                }
            ]
        },
    }


def _seconds(duration: str) -> str:
    units = {"s": 1, "m": 60, "h": 3600}
    return f"{int(duration[:-1]) * units[duration[-1]]}s"


def alert_policy(a: Alert) -> dict[str, Any]:
    return {
        "displayName": f"{GROUP}/{a.name}",
        "documentation": {
            "content": f"{a.summary}\n\n{a.description}",
            "mimeType": "text/markdown",
            "subject": f"{a.name}: {a.summary}",
        },
        "userLabels": {"severity": a.severity, "app": GROUP},
        "severity": a.severity.upper(),
        "combiner": "OR",
        "conditions": [
            {
                "displayName": a.name,
                "conditionPrometheusQueryLanguage": {
                    "query": _flat(a.expr),
                    "duration": _seconds(a.duration),
                    "evaluationInterval": "30s",
                    "labels": {"severity": a.severity},
                    "ruleGroup": GROUP,
                    "alertRule": a.name,
                },
            }
        ],
        "alertStrategy": {"autoClose": "1800s"},
        "enabled": True,
    }


def policy_filename(a: Alert) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", a.name.removeprefix("Worker")).lower() + ".json"


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def _yaml(doc: dict[str, Any], header: str) -> str:
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    return header + body


def _json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


RULES_HEADER = """\
# Generated by deploy/monitoring/generate.py: edit ALERTS there, then regenerate.
# Alert rules for the Prometheus Operator (kube-prometheus-stack):
#   kubectl apply -f deploy/monitoring/prometheusrule.yaml
# Your Prometheus must select it: add the labels its ruleSelector wants (often
# release: <helm release name>) to metadata.labels.
"""

GMP_HEADER = """\
# Generated by deploy/monitoring/generate.py: edit ALERTS there, then regenerate.
# Alert rules for Google Cloud Managed Service for Prometheus (managed rule evaluation):
#   kubectl apply -f deploy/monitoring/rules.yaml
# A namespaced Rules object only sees series from its own namespace (image-describer),
# which is where the workers run. Alerts go to the Alertmanager configured for Managed
# Prometheus (the alertmanager Secret in gmp-public); or use the Cloud Monitoring alert
# policies in alert-policies/ instead, which need no Alertmanager.
"""


def outputs() -> dict[Path, str]:
    files = {
        HERE / "grafana-dashboard.json": _json(grafana_dashboard()),
        HERE / "cloud-monitoring-dashboard.json": _json(cloud_dashboard()),
        HERE / "prometheusrule.yaml": _yaml(prometheus_rule(), RULES_HEADER),
        HERE / "rules.yaml": _yaml(gmp_rules(), GMP_HEADER),
    }
    for a in ALERTS:
        files[HERE / "alert-policies" / policy_filename(a)] = _json(alert_policy(a))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.relative_to(HERE))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print("out of date (run deploy/monitoring/generate.py):", *stale, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
