"""Structured output: a JSON Schema per answer, sent, then checked before it is stored.

A schema comes from ``--response-schema FILE.json`` (the default for every job) or from
``[schemas]`` in the config (``name = "path/to/schema.json"``), chosen per job with its
``schema`` field. It is checked against its metaschema once, at start-up (a bad one is
a one-line error, exit code 2), compiled once, and sent as OpenAI's ``response_format``
(Vertex AI's OpenAI-compatible endpoint takes it). The answer's text is parsed and
validated with ``jsonschema``; an answer that does not match is asked for once more,
with the validator's message given back to the model, and then dead-lettered as
``schema_mismatch``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match

from .errors import ConfigError

__all__ = ["DEFAULT_SCHEMA", "Schema", "Schemas", "load_schemas", "repair_prompt"]

#: The name of the ``--response-schema`` schema.
DEFAULT_SCHEMA = "default"
# What the model is told when its answer did not match (then the validator's message).
_REPAIR = (
    "Your answer did not match the required JSON schema: {error}. "
    "Answer again with only a JSON value that matches the schema."
)


@dataclass(frozen=True)
class Schema:
    """One compiled schema, and what the request carries for it."""

    name: str
    document: Mapping[str, Any]
    validator: Draft202012Validator = field(repr=False, compare=False)
    #: Sent as ``response_format``.
    response_format: Mapping[str, Any] = field(repr=False, compare=False)
    #: A short digest of the canonical schema: reuse keys change when the schema does.
    digest: str = ""

    def check(self, text: str) -> tuple[Any, str | None]:
        """(the parsed answer, None) when ``text`` matches, else (None, why not)."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return None, f"the answer is not JSON ({exc.msg} at position {exc.pos})"
        error = best_match(self.validator.iter_errors(value))
        if error is None:
            return value, None
        where = "/".join(str(p) for p in error.absolute_path) or "the top level"
        return None, f"{error.message} (at {where})"[:500]


class Schemas:
    """The configured schemas by name, and the default (if any)."""

    def __init__(self, schemas: Mapping[str, Schema], default: str | None) -> None:
        self._schemas = dict(schemas)
        self.default = default

    def __bool__(self) -> bool:
        return bool(self._schemas)

    def get(self, name: str | None) -> Schema | None:
        """The schema a job asks for (``name``), else the default; None: plain text."""
        chosen = name or self.default
        return None if chosen is None else self._schemas.get(chosen)

    def knows(self, name: str) -> bool:
        return name in self._schemas


def _compile(name: str, document: Any, key: str) -> Schema:
    if not isinstance(document, dict):
        raise ConfigError(key, f"schema {name!r} must be a JSON object")
    try:
        Draft202012Validator.check_schema(document)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        raise ConfigError(
            key, f"schema {name!r} is not valid JSON Schema: {exc.message} (at {where})"
        ) from None
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return Schema(
        name=name,
        document=document,
        validator=Draft202012Validator(document),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": _api_name(name), "schema": document, "strict": True},
        },
        digest=hashlib.sha256(canonical.encode()).hexdigest()[:16],
    )


def _api_name(name: str) -> str:
    # OpenAI's json_schema.name: letters, digits, _ and -, at most 64.
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)
    return cleaned[:64] or "schema"


def _read(path_text: str, key: str) -> Any:
    path = Path(path_text)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(key, f"{path} is not JSON ({exc.args[0] if exc.args else exc})") from None


def load_schemas(default_path: str, named: Mapping[str, str]) -> Schemas:
    """Read, check and compile every schema at start-up (blocking file reads: call it off
    the event loop, or before it starts)."""
    compiled: dict[str, Schema] = {}
    for name, path in named.items():
        compiled[name] = _compile(name, _read(path, f"schemas.{name}"), f"schemas.{name}")
    default: str | None = None
    if default_path:
        if DEFAULT_SCHEMA in compiled:
            raise ConfigError(
                "model.response_schema",
                f"[schemas] already has a schema named {DEFAULT_SCHEMA!r}; rename it",
            )
        compiled[DEFAULT_SCHEMA] = _compile(
            DEFAULT_SCHEMA, _read(default_path, "model.response_schema"), "model.response_schema"
        )
        default = DEFAULT_SCHEMA
    return Schemas(compiled, default)


def repair_prompt(error: str) -> str:
    """The follow-up message that gives the validator's complaint back to the model."""
    return _REPAIR.format(error=error)
