"""Settings: defaults < file < env < flags, every key documented, every bad value a
ConfigError naming its key (the CLI turns it into one line and exit code 2)."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.settings import INLINE_MODES, Settings, load_settings

from .helpers import REPO


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[worker]\nconcurrency = 10\nsink = "jsonl:a.jsonl"\n[model]\nmodel = "file-model"\n'
    )
    env = {"WORKER_WORKER__CONCURRENCY": "20", "WORKER_MODEL__PROMPT": "env prompt"}

    s = load_settings(cfg, env=env, overrides={"worker.concurrency": "30"})

    assert s.worker.concurrency == 30  # flag > env > file
    assert s.model.prompt == "env prompt"  # env > default
    assert s.model.model == "file-model"  # file > default
    assert s.worker.sink == "jsonl:a.jsonl"
    assert s.retry.max_attempts == 8  # default
    assert load_settings(cfg, env=env).worker.concurrency == 20


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[worker]\nconcurency = 10\n")
    with pytest.raises(ConfigError, match=r"worker\.concurency: unknown key"):
        load_settings(cfg, env={})


def test_default_toml_documents_every_key() -> None:
    documented = tomllib.loads((REPO / "config" / "default.toml").read_text())

    def check(doc: dict[str, object], defaults: object, where: str) -> None:
        for f in dataclasses.fields(defaults):  # type: ignore[arg-type]
            value = getattr(defaults, f.name)
            key = f"{where}{f.name}"
            assert f.name in doc, f"{key} is not in config/default.toml"
            if dataclasses.is_dataclass(value):
                check(doc[f.name], value, f"{key}.")  # type: ignore[arg-type]
            elif f.name == "schemas":
                assert doc["schemas"] == value
            elif f.name == "prices":
                assert doc["prices"] == {m: dataclasses.asdict(p) for m, p in value.items()}
            else:
                assert doc[f.name] == value, key

    check(documented, Settings(), "")
    for name in ("local", "vertex", "pubsub", "default"):
        load_settings(REPO / "config" / f"{name}.toml", env={})


@pytest.mark.parametrize(
    ("env", "key", "expected"),
    [
        ({"WORKER_WORKER__CONCURRENCY": "auto"}, "concurrency", "auto"),
        ({"WORKER_WORKER__CONCURRENCY": "AUTO"}, "concurrency", "auto"),
        ({"WORKER_WORKER__CONCURRENCY": "64"}, "concurrency", 64),
        ({"WORKER_LOG__LEVEL": "DEBUG"}, "level", "debug"),
        ({"WORKER_MODEL__AUTH": "api-key"}, "auth", "api-key"),
        ({"WORKER_IMAGES__ALLOW_HTTP": "yes"}, "allow_http", True),
    ],
)
def test_env_values_are_coerced_to_the_key_s_type(
    env: dict[str, str], key: str, expected: object
) -> None:
    s = load_settings(env=env)
    section = next(iter(env)).split("__")[0].removeprefix("WORKER_").lower()
    assert getattr(getattr(s, section), key) == expected


@pytest.mark.parametrize(
    ("env", "key", "says"),
    [
        ({"WORKER_WORKER__CONCURRENCY": "lots"}, "worker.concurrency", "an integer or auto"),
        ({"WORKER_WORKER__CONCURRENCY": "0"}, "worker.concurrency", "1..10000"),
        ({"WORKER_MODEL__AUTH": "oauth"}, "model.auth", "google or api-key or none"),
        ({"WORKER_IMAGES__INLINE_IMAGES": "sometimes"}, "images.inline_images", "auto or always"),
        ({"WORKER_LOG__FORMAT": "xml"}, "log.format", "auto or json or text"),
        ({"WORKER_RETRY__MAX_ATTEMPTS": "zero"}, "retry.max_attempts", "an integer"),
        ({"WORKER_HTTP__PORT": "70000"}, "http.port", "0..65535"),
        ({"WORKER_NOPE__X": "1"}, "nope.x", "unknown section"),
    ],
)
def test_bad_values_name_their_key_and_what_is_allowed(
    env: dict[str, str], key: str, says: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(env=env)
    assert raised.value.key == key
    assert says in str(raised.value)


def test_nested_tables_from_file_and_env(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[sinks.gcs]\nroll_records = 50\n[store]\nuri = 'sqlite:s.db'\n")
    s = load_settings(cfg, env={"WORKER_SINKS__GCS__ROLL_AGE_S": "2.5"})
    assert (s.sinks.gcs.roll_records, s.sinks.gcs.roll_age_s) == (50, 2.5)
    assert s.store.uri == "sqlite:s.db"
    with pytest.raises(ConfigError, match=r"sinks\.gcs: is a table"):
        load_settings(env={"WORKER_SINKS__GCS": "1"})
    with pytest.raises(ConfigError, match=r"unknown section 'sinks\.gcx'"):
        load_settings(env={"WORKER_SINKS__GCX__ROLL_RECORDS": "1"})


def test_modes_are_defined_once() -> None:
    # The images module and the settings agree because there is only one list.
    from worker import images

    assert INLINE_MODES == ("auto", "always", "never")
    assert vars(images)["INLINE_MODES"] is INLINE_MODES  # used there, not re-exported


def test_a_config_file_that_does_not_parse_names_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[worker\nconcurrency = 3\n")
    with pytest.raises(ConfigError, match=r"--config: .*bad\.toml is not valid TOML"):
        load_settings(cfg, env={})
    with pytest.raises(ConfigError, match=r"--config: file not found"):
        load_settings(tmp_path / "missing.toml", env={})
