"""``worker describe | run | simulate``: arguments -> Settings -> run.

The flags are a fixed interface (scripts outside the project drive them). Every flag maps
onto a settings key, so a flag, an env var ``WORKER_<SECTION>__<KEY>`` and a config file
line all mean the same thing; flags win.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any, get_args

import anyio

from .errors import ConfigError
from .settings import (
    TIERS,
    AuthMode,
    EndpointSettings,
    ImageBackend,
    ImageUrlForm,
    InlineMode,
    LogFormat,
    LogLevel,
    ProvisionedMode,
    Settings,
    StoreKey,
    load_settings,
    resolve_endpoints,
)

__all__ = ["build_parser", "main"]

# flag dest -> settings key
_MODEL_FLAGS = {
    "base_url": "model.base_url",
    "model": "model.model",
    "project": "model.project",
    "location": "model.location",
    "auth": "model.auth",
    "api_key_env": "model.api_key_env",
    "prompt": "model.prompt",
    "max_tokens": "model.max_tokens",
    "timeout_s": "model.timeout_s",
    "image_url_form": "model.image_url_form",
    "locations": "model.locations",
    "tier": "model.tier",
    "provisioned": "model.provisioned",
    "flex_timeout_s": "model.flex_timeout_s",
    "budget_usd": "worker.budget_usd",
    "temperature": "model.temperature",
    "top_p": "model.top_p",
    "seed": "model.seed",
    "stop": "model.stop",
    "response_schema": "model.response_schema",
    "store": "store.uri",
    "store_key": "store.key",
    "store_ttl_s": "store.ttl_s",
    "bq_create_table": "sinks.bigquery.create_table",
    "log_format": "log.format",
    "log_level": "log.level",
}
_RUN_FLAGS = {
    "source": "worker.source",
    "sink": "worker.sink",
    "dead_letter": "worker.dead_letter",
    "concurrency": "worker.concurrency",
    "min_concurrency": "worker.min_concurrency",
    "max_concurrency": "worker.max_concurrency",
    "rpm": "worker.rpm",
    "tpm": "worker.tpm",
    "shutdown_grace_s": "worker.shutdown_grace_s",
    "http_port": "http.port",
    "stall_timeout_s": "http.stall_timeout_s",
    "progress": "log.progress",
}
# Image flags, on describe and run.
_IMAGE_FLAGS = {
    "allow_file_root": "worker.allow_file_root",
    "inline_images": "images.inline_images",
    "image_backend": "images.backend",
    "allow_private_networks": "images.allow_private_networks",
    "allow_http": "images.allow_http",
    "max_image_bytes": "images.max_image_bytes",
}
# The limiter and retry flags `loadtest` shares with `run`.
_LOADTEST_FLAGS = {
    k: _RUN_FLAGS[k] for k in ("concurrency", "min_concurrency", "max_concurrency", "rpm", "tpm")
}


SINK_HELP = (
    "jsonl:PATH, stdout:, gs://BUCKET/PREFIX, bq:PROJECT.DATASET.TABLE or "
    "pubsub:projects/P/topics/T"
)


def _add_image_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images")
    g.add_argument("--allow-file-root", help="local image files are read only below this directory")
    g.add_argument(
        "--inline-images",
        choices=get_args(InlineMode),
        help="fetch images and send them inline (auto: all but gs:// and data: for Vertex AI)",
    )
    g.add_argument(
        "--image-backend",
        choices=get_args(ImageBackend),
        help="what --inline-images auto takes the backend to be (auto: from the base URL)",
    )
    g.add_argument(
        "--allow-private-networks",
        action="store_true",
        default=None,
        help="let image URLs reach loopback and private addresses (not link-local/metadata)",
    )
    g.add_argument(
        "--allow-http", action="store_true", default=None, help="fetch plain http:// image URLs"
    )
    g.add_argument(
        "--max-image-bytes", type=int, help="largest image fetched or inlined (default 7 MiB)"
    )


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and auth")
    g.add_argument("--config", help="TOML settings file (see config/default.toml)")
    g.add_argument("--base-url", help="OpenAI-compatible base URL (overrides --project/--location)")
    g.add_argument("--model", help="model name (default google/gemini-2.0-flash-001)")
    g.add_argument(
        "--project", help="Google Cloud project; with --location builds the Vertex AI URL"
    )
    g.add_argument("--location", help="Vertex AI location, e.g. us-central1 or global")
    g.add_argument(
        "--auth", choices=get_args(AuthMode), help="how to authenticate (default google)"
    )
    g.add_argument(
        "--api-key-env", help="env var holding the key for --auth api-key (default OPENAI_API_KEY)"
    )
    g.add_argument(
        "--prompt", help="text part of the request (default 'Describe the following image:')"
    )
    g.add_argument("--max-tokens", type=int, help="max tokens of the answer (default: not sent)")
    g.add_argument("--timeout-s", type=float, help="per-request timeout in seconds (default 120)")
    g.add_argument(
        "--image-url-form", choices=get_args(ImageUrlForm), help="shape of the image_url part"
    )
    q = p.add_argument_group("endpoints, tiers and cost")
    q.add_argument(
        "--endpoint",
        action="append",
        metavar="URL",
        help="an OpenAI-compatible base URL; repeat for several (replaces --base-url)",
    )
    q.add_argument(
        "--locations",
        help="comma-separated Vertex AI locations, one endpoint each (with --project)",
    )
    q.add_argument(
        "--tier",
        choices=TIERS,
        help="Vertex AI consumption tier of jobs that name none (default standard)",
    )
    q.add_argument(
        "--provisioned",
        choices=get_args(ProvisionedMode),
        help="Provisioned Throughput: first (auto), only, or never (default auto)",
    )
    q.add_argument("--flex-timeout-s", type=float, help="timeout of flex requests (default 1200)")
    q.add_argument(
        "--budget-usd",
        type=float,
        help="stop admitting jobs once this much has been spent (list prices; default none)",
    )
    gen = p.add_argument_group("generation and structured output")
    gen.add_argument(
        "--temperature", type=float, help="sampling temperature, 0..2 (default: not sent)"
    )
    gen.add_argument("--top-p", type=float, help="nucleus sampling, (0, 1] (default: not sent)")
    gen.add_argument("--seed", type=int, help="sampling seed (default: not sent)")
    gen.add_argument("--stop", help="a stop sequence (default: none)")
    gen.add_argument(
        "--response-schema",
        metavar="FILE.json",
        help="answer with JSON matching this JSON Schema (validated; record field 'output')",
    )
    st = p.add_argument_group("result store (reuse, exactly-once)")
    st.add_argument("--store", metavar="URI", help="none, sqlite:PATH or redis://HOST:PORT/DB")
    st.add_argument(
        "--store-key",
        choices=get_args(StoreKey),
        help="know an image by its content (default) or by its URI alone",
    )
    st.add_argument("--store-ttl-s", type=float, help="stored answers lapse after this (0: never)")
    sk = p.add_argument_group("sinks")
    sk.add_argument(
        "--bq-create-table",
        action="store_true",
        default=None,
        help="bq: sinks: create the table (partitioned by finished_at) if it is missing",
    )
    g.add_argument("--log-format", choices=get_args(LogFormat), help="stderr log format")
    g.add_argument("--log-level", choices=get_args(LogLevel), help="log level")


def _add_rate_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--rpm", type=float, help="hard ceiling: model requests per minute (default: none)"
    )
    p.add_argument(
        "--tpm",
        type=float,
        help="hard ceiling: model tokens per minute, estimated and corrected from usage",
    )


def _add_progress_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    # Two flags, one setting (log.progress): "on" or "off"; neither leaves it to auto.
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--progress",
        action="store_const",
        const="on",
        help="show the live progress line on stderr even off a terminal or with JSON logs",
    )
    g.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const="off",
        help="no progress line, nor progress events in JSON logs (default: auto, the line "
        "when stderr is a terminal and logs are text)",
    )


def _add_loadtest_parser(sub: Any) -> None:
    # "resolve": the simulator's own --max-concurrency (a server-side limit) would clash
    # with the worker's; it is offered as --sim-max-concurrency instead.
    lt = sub.add_parser(
        "loadtest",
        help="drive synthetic jobs through the real pipeline and report throughput",
        conflict_handler="resolve",
    )
    g = lt.add_argument_group("load")
    size = g.add_mutually_exclusive_group(required=True)
    size.add_argument("--jobs", type=int, help="number of jobs to send")
    size.add_argument("--duration-s", type=float, help="send jobs for this many seconds")
    g.add_argument(
        "--target",
        choices=("sim",),
        help="sim: start the bundled simulator in-process (knobs below); else use --base-url",
    )
    g.add_argument(
        "--source",
        dest="lt_source",
        help="read jobs from a real source (e.g. a Pub/Sub subscription); default: memory",
    )
    g.add_argument(
        "--publish-to",
        help="first publish the --jobs synthetic jobs to this sink (e.g. a Pub/Sub topic)",
    )
    g.add_argument("--report", help="write the report as JSON to this file")
    g.add_argument("--chart", help="write a PNG chart (needs the 'chart' extra: matplotlib)")
    g.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "off"),
        default="auto",
        help="live display on stderr (auto: a bar on a terminal, lines otherwise)",
    )
    from .simulator import add_simulator_arguments

    add_simulator_arguments(lt)
    lt.add_argument(
        "--sim-max-concurrency",
        dest="sim_max_concurrency",
        type=int,
        help="simulator: requests in flight above this get 429",
    )
    c = lt.add_argument_group("concurrency")
    c.add_argument("--concurrency", help="max model requests in flight: an integer, or auto")
    c.add_argument("--min-concurrency", type=int, help="lower bound for --concurrency auto")
    c.add_argument("--max-concurrency", type=int, help="upper bound for --concurrency auto")
    _add_rate_flags(c)
    _add_model_flags(lt)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worker",
        description="Describe images at scale with Gemini on Vertex AI (OpenAI-compatible API).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("describe", help="describe the given images; one JSON line each on stdout")
    d.add_argument(
        "uris", nargs="+", metavar="URI", help="gs://, https://, data: URI or local image path"
    )
    _add_model_flags(d)
    _add_image_flags(d)

    r = sub.add_parser("run", help="run the worker: source -> model -> sink")
    r.add_argument(
        "--source", help="file:PATH, stdin: or pubsub:projects/P/subscriptions/S (default stdin:)"
    )
    r.add_argument("--sink", help=SINK_HELP + " (default stdout:)")
    r.add_argument(
        "--dead-letter",
        help="sink for failed jobs (default: beside the results, e.g. "
        "out/results.dead-letter.jsonl or gs://B/P.dead-letter/)",
    )
    r.add_argument("--concurrency", help="max model requests in flight: an integer, or auto")
    r.add_argument("--min-concurrency", type=int, help="lower bound for --concurrency auto")
    r.add_argument("--max-concurrency", type=int, help="upper bound for --concurrency auto")
    _add_rate_flags(r)
    ops = r.add_argument_group("long-running operation")
    ops.add_argument(
        "--http-port",
        type=int,
        help="serve /healthz, /readyz and /metrics on this port (default 0: off)",
    )
    ops.add_argument(
        "--shutdown-grace-s",
        type=float,
        help="after SIGTERM/SIGINT, time jobs in flight get to finish before a nack (default 20)",
    )
    ops.add_argument(
        "--stall-timeout-s",
        type=float,
        help="/healthz answers 503 after this long without progress (default 300)",
    )
    _add_progress_flags(ops)
    _add_model_flags(r)
    _add_image_flags(r)

    sv = sub.add_parser(
        "serve", help="serve a Pub/Sub push endpoint (Cloud Run): push -> model -> sink"
    )
    sv.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    sv.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("PORT") or 8080),
        help="listen port (default $PORT, else 8080)",
    )
    sv.add_argument("--sink", help=SINK_HELP)
    sv.add_argument("--dead-letter", help="sink for failed jobs")
    sv.add_argument("--concurrency", help="max model requests in flight: an integer, or auto")
    sv.add_argument("--min-concurrency", type=int, help="lower bound for --concurrency auto")
    sv.add_argument("--max-concurrency", type=int, help="upper bound for --concurrency auto")
    auth = sv.add_argument_group("push authentication (OIDC)")
    auth.add_argument("--push-audience", help="verify push tokens for this audience")
    auth.add_argument(
        "--push-allowed-emails", help="comma-separated service accounts allowed to push"
    )
    auth.add_argument("--push-certs-url", help="signing certificates URL (default Google's)")
    _add_progress_flags(sv)
    _add_model_flags(sv)
    _add_image_flags(sv)

    _add_loadtest_parser(sub)

    s = sub.add_parser("simulate", help="serve the bundled OpenAI-compatible simulator")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    from .simulator import add_simulator_arguments

    add_simulator_arguments(s)
    return parser


def _settings_from(ns: argparse.Namespace, flags: dict[str, str]) -> Settings:
    overrides: dict[str, Any] = {}
    for dest, key in flags.items():
        value = getattr(ns, dest, None)
        if value is not None:
            overrides[key] = value
    # --project/--location on the command line mean Vertex AI, whatever a file said.
    if (ns.project or ns.location or ns.locations) and not ns.base_url:
        overrides["model.base_url"] = ""
    if ns.endpoint:
        # --endpoint replaces --base-url and any [[model.endpoints]] of a file.
        overrides["model.endpoints"] = [EndpointSettings(url=u) for u in ns.endpoint]
    settings = load_settings(ns.config, overrides=overrides)
    if not settings.simulator.embedded:
        resolve_endpoints(settings)  # a bad endpoint is a start-up error, before any I/O
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return _dispatch(ns)
    except ConfigError as exc:
        return _config_error(exc)
    except BaseExceptionGroup as group:
        # A start-up problem raised inside a task group arrives wrapped: show it plainly.
        config, rest = group.split(ConfigError)
        if config is not None and rest is None:
            return _config_error(_first_leaf(config))
        raise
    except KeyboardInterrupt:
        return 130


def _first_leaf(group: BaseExceptionGroup[ConfigError]) -> ConfigError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _config_error(exc: ConfigError) -> int:
    print(f"worker: config error: {exc}", file=sys.stderr)
    return 2


def _dispatch(ns: argparse.Namespace) -> int:
    from .logs import setup_logging

    if ns.command == "simulate":
        from .simulator import serve_simulator, sim_config_from_args

        setup_logging("info", "text")
        try:
            config = sim_config_from_args(ns)
        except ValueError as exc:
            raise ConfigError("simulate", str(exc)) from None
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(serve_simulator, config, ns.host, ns.port)
        return 0

    flags = dict(_MODEL_FLAGS)
    if ns.command in ("describe", "run"):
        flags.update(_IMAGE_FLAGS)
    if ns.command == "run":
        flags.update(_RUN_FLAGS)
    if ns.command == "loadtest":
        return _loadtest(ns, flags)
    if ns.command == "serve":
        return _serve(ns, flags)
    settings = _settings_from(ns, flags)
    setup_logging(settings.log.level, settings.log.format)

    if ns.command == "describe":
        from .app import describe_uris

        stats = _run(describe_uris, settings, list(ns.uris))
        return 0 if stats.ok == len(ns.uris) else 1

    from .app import run_worker

    stats = _run(run_worker, settings)
    if stats.failed:
        return 1
    # 3: a batch (file, stdin) stopped at its budget; rerun with more to go on. A queue
    # worker that idled at its budget until SIGTERM stopped the ordinary way: its jobs
    # wait on the queue, and a non-zero exit would only look like a crash.
    return 3 if stats.budget_exhausted and not stats.idled_at_budget else 0


_SERVE_FLAGS = {
    **{k: _RUN_FLAGS[k] for k in ("sink", "dead_letter", "concurrency", "progress")},
    **{k: _RUN_FLAGS[k] for k in ("min_concurrency", "max_concurrency")},
    "push_audience": "pubsub.push_audience",
    "push_allowed_emails": "pubsub.push_allowed_emails",
    "push_certs_url": "pubsub.push_certs_url",
}


def _serve(ns: argparse.Namespace, flags: dict[str, str]) -> int:
    from .app import serve_push
    from .logs import setup_logging

    flags.update(_IMAGE_FLAGS)
    flags.update(_SERVE_FLAGS)
    settings = _settings_from(ns, flags)
    setup_logging(settings.log.level, settings.log.format)

    async def serve() -> Any:
        return await serve_push(settings, host=ns.host, port=ns.port)

    stats = _run(serve)
    return 1 if stats.failed else 0


def _loadtest(ns: argparse.Namespace, flags: dict[str, str]) -> int:
    from pathlib import Path

    from .loadtest import LoadtestOptions, format_report, run_loadtest
    from .logs import setup_logging
    from .simulator import sim_config_from_args

    flags.update(_LOADTEST_FLAGS)
    if ns.target == "sim":
        # The in-process simulator needs no credentials and no Vertex AI URL.
        ns.auth = ns.auth or "none"
        ns.base_url = ns.base_url or "http://127.0.0.1:1/v1"
    elif not (ns.base_url or ns.endpoint or ns.locations or ns.project or ns.location or ns.config):
        raise ConfigError("loadtest", "give --target sim, --base-url URL or --endpoint URL")
    settings = _settings_from(ns, flags)
    # A load test should show warnings, not one log line per job.
    setup_logging("warning" if ns.log_level is None else settings.log.level, settings.log.format)
    try:
        sim = sim_config_from_args(ns) if ns.target == "sim" else None
    except ValueError as exc:
        raise ConfigError("loadtest", str(exc)) from None
    opts = LoadtestOptions(
        jobs=ns.jobs,
        duration_s=ns.duration_s,
        sim=sim,
        source=ns.lt_source,
        publish_to=ns.publish_to,
        report=Path(ns.report) if ns.report else None,
        chart=Path(ns.chart) if ns.chart else None,
        progress=ns.progress,
    )
    opts.validate()
    report = _run(run_loadtest, settings, opts)
    print(format_report(report), file=sys.stderr, flush=True)
    return 0 if report["lost"] == 0 else 1


def _run(fn: Any, *args: Any) -> Any:
    options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401

        options["use_uvloop"] = True
    except ImportError:
        pass
    return anyio.run(fn, *args, backend="asyncio", backend_options=options)


if __name__ == "__main__":
    sys.exit(main())
