"""Credentials never written out: a storage URI may carry secrets (``pyarrow.fs`` reads S3 keys
from its user info, ``s3://KEY:SECRET@bucket/prefix``, percent-encoded; query options named like
credentials, ``?access_key=...&secret_key=...&session_token=...`` or ``?access_token=...``, are
masked too, for filesystems that take them), and such URIs end up in files, logs and messages.

:func:`redact_text` replaces those values by ``***`` and keeps the rest of the URI, so a reader
still sees where things are. It is applied where text leaves the process: the run directory's
JSON and YAML files, the feature store's ``meta.json``, the run log, and the message of every
:class:`~asvp_ray.core.errors.AsvpError`. The full URI lives only in memory (and in the arguments of
the Ray workers that must reach the store).
"""
from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"

# Query options whose values are secrets: pyarrow's S3 (access_key, secret_key, session_token,
# external_id) and GCS (access_token) options, and anything else named like a credential.
_SECRET_NAME = r"(?:[a-z0-9_]*(?:access_key|secret|token|password|credential|external_id)[a-z0-9_]*)"
_QUERY_SECRET = re.compile(rf"(?i)([?&]{_SECRET_NAME}=)([^&\s'\"#<>\]\)}},]*)")
# user info before the bucket: s3://ACCESS:SECRET@bucket/... (gs://anonymous@bucket/..., pyarrow's
# GCS option for no credentials, names none: it is kept, or a location rebuilt from the redacted
# text would ask Google's default credentials instead)
_USER_INFO = re.compile(r"(?i)\b(s3://|gc?s://(?!anonymous@))([^/@\s'\"?#]+)@")


def redact_text(text: Any) -> Any:
    """``text`` with every credential in a URI it holds replaced by ``***`` (non-strings as given).

    >>> redact_text("s3://b/p?endpoint_override=h:9&secret_key=abc&scheme=http")
    's3://b/p?endpoint_override=h:9&secret_key=***&scheme=http'
    >>> redact_text("gs://anonymous@b/p?endpoint_override=h:9&scheme=http")
    'gs://anonymous@b/p?endpoint_override=h:9&scheme=http'
    """
    if not isinstance(text, str) or ("=" not in text and "@" not in text):
        return text
    text = _QUERY_SECRET.sub(lambda m: m.group(1) + (MASK if m.group(2) else ""), text)
    return _USER_INFO.sub(lambda m: m.group(1) + MASK + "@", text)


def redact_uri(uri: Any) -> Any:
    """A location as it may be written out (None and plain paths unchanged); see :func:`redact_text`."""
    return None if uri is None else redact_text(str(uri))


def redact_obj(obj: Any) -> Any:
    """A JSON-like value (dicts, lists, strings) with :func:`redact_text` applied to every string."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {redact_text(k) if isinstance(k, str) else k: redact_obj(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


class RedactingFormatter(logging.Formatter):
    """A log formatter whose lines (tracebacks included) pass through :func:`redact_text`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))
