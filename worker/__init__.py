"""Describe images at scale with Gemini on Vertex AI through the OpenAI-compatible API."""

from __future__ import annotations

from .errors import ConfigError, JobError
from .jobs import Job, parse_job
from .limits import Limiter
from .model import ModelClient, build_messages
from .pipeline import Pipeline, RunStats
from .protocols import Delivery, Sink, Source
from .settings import Settings, load_settings

__all__ = [
    "ConfigError",
    "Delivery",
    "Job",
    "JobError",
    "Limiter",
    "ModelClient",
    "Pipeline",
    "RunStats",
    "Settings",
    "Sink",
    "Source",
    "build_messages",
    "load_settings",
    "parse_job",
]
