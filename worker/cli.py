"""``worker describe | run | simulate``: arguments -> Settings -> run.

The flags are a fixed interface (scripts outside the project drive them). Every flag maps
onto a settings key, so a flag, an env var ``WORKER_<SECTION>__<KEY>`` and a config file
line all mean the same thing; flags win.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from .errors import ConfigError
from .settings import Settings, load_settings

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
    "allow_file_root": "worker.allow_file_root",
}


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
        "--auth", choices=("google", "api-key", "none"), help="how to authenticate (default google)"
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
        "--image-url-form", choices=("string", "object"), help="shape of the image_url part"
    )
    g.add_argument("--log-format", choices=("auto", "json", "text"), help="stderr log format")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="log level")


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

    r = sub.add_parser("run", help="run the worker: source -> model -> sink")
    r.add_argument("--source", help="file:PATH or stdin: (default stdin:)")
    r.add_argument("--sink", help="jsonl:PATH or stdout: (default stdout:)")
    r.add_argument(
        "--dead-letter", help="sink for failed jobs (default: jsonl beside the result file)"
    )
    r.add_argument("--concurrency", help="max model requests in flight: an integer, or auto")
    r.add_argument("--min-concurrency", type=int, help="lower bound for --concurrency auto")
    r.add_argument("--max-concurrency", type=int, help="upper bound for --concurrency auto")
    r.add_argument("--allow-file-root", help="local image files are read only below this directory")
    _add_model_flags(r)

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
    if (ns.project or ns.location) and not ns.base_url:
        overrides["model.base_url"] = ""
    settings = load_settings(ns.config, overrides=overrides)
    settings.model.resolved_base_url() if not settings.simulator.embedded else None
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return _dispatch(ns)
    except ConfigError as exc:
        print(f"worker: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


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
    if ns.command == "run":
        flags.update(_RUN_FLAGS)
    settings = _settings_from(ns, flags)
    setup_logging(settings.log.level, settings.log.format)

    if ns.command == "describe":
        from .app import describe_uris

        stats = _run(describe_uris, settings, list(ns.uris))
        return 0 if stats.ok == len(ns.uris) else 1

    from .app import run_worker

    stats = _run(run_worker, settings)
    return 1 if stats.failed else 0


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
