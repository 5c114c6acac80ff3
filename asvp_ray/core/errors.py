"""Typed errors. Every message says what was wrong, where, and how to fix it."""
from __future__ import annotations


class AsvpError(Exception):
    """Base class of every error asvp-ray raises on purpose. Its message never holds a
    credential: URIs in it are shown redacted (:func:`asvp_ray.core.redact.redact_text`)."""

    def __init__(self, *args):
        from asvp_ray.core.redact import redact_text

        super().__init__(*(redact_text(a) for a in args))


class ConfigError(AsvpError, ValueError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


class BadInputError(AsvpError, ValueError):
    """Input data is invalid: a missing or corrupt image, a bad manifest, a bad label."""


class PoolError(AsvpError):
    """Base class of errors about the state of the unlabelled pool."""


class EmptyPoolError(PoolError):
    """The unlabelled pool has no samples left."""


class PoolExhaustedError(PoolError):
    """More samples were requested than the unlabelled pool holds."""


class RunDirError(AsvpError):
    """The run directory is locked, inconsistent or belongs to another config."""
