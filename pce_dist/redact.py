"""Secrets out of everything we write: the one place that decides what looks like a secret.

A run config may carry credentials -- ``tracking.tracking_uri=http://user:secret@host:5055``,
a ``data.root`` of ``pipe:curl -H 'Authorization: Bearer ...' ...`` or a presigned URL with
``?X-Amz-Signature=...``. The live value is used in memory only; every copy that leaves the
process (MLflow params and the config artifact, ``config.yaml``, a checkpoint's
``meta.json``, log lines, console output) goes through ``redact`` first.

What counts as a secret (each replaced by ``***``):
  * URI user-info passwords: ``scheme://user:PASS@host`` (the user name stays, it helps
    whoever debugs which account was used);
  * values of query parameters whose name looks like a credential (token, key, secret,
    password, signature, credential, auth, sig, ...);
  * ``Authorization: <scheme> VALUE`` / ``Bearer VALUE`` and ``NAME=VALUE`` where NAME looks
    like a credential (``GITHUB_TOKEN=...``, ``password=...``).

``SecretFilter`` is a logging filter that applies the same rules, plus the exact live
values registered with ``register`` (found in the config at start-up), to every record.
This module imports only the standard library.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"

_CRED = r"(?:[A-Za-z0-9_.-]*(?:token|secret|passw(?:or)?d|pwd|api[_-]?key|access[_-]?key|private[_-]?key|" \
        r"signature|credential|auth|sig)[A-Za-z0-9_.-]*)"
_RULES = (
    # scheme://user:password@host -> scheme://user:***@host
    (re.compile(r"(?P<pre>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@'\"]*:)(?P<secret>[^@/\s'\"]+)(?=@)"), r"\g<pre>" + MASK),
    # ?token=... / &X-Amz-Signature=...
    (re.compile(r"(?P<pre>[?&]" + _CRED + r"=)(?P<secret>[^&#\s'\"]+)", re.IGNORECASE), r"\g<pre>" + MASK),
    # Authorization: Bearer xyz / Authorization: xyz / Bearer xyz
    (re.compile(r"(?P<pre>\bauthorization\s*[:=]\s*(?:(?:bearer|basic|token)\s+)?)(?P<secret>[^\s'\"]+)",
                re.IGNORECASE), r"\g<pre>" + MASK),
    (re.compile(r"(?P<pre>\bbearer\s+)(?!\*\*\*)(?P<secret>[^\s'\"]+)", re.IGNORECASE), r"\g<pre>" + MASK),
    # GITHUB_TOKEN=xyz, password: xyz, --api-key=xyz
    (re.compile(r"(?P<pre>(?<![?&\w])-{0,2}" + _CRED + r"\s*[=:]\s*)(?!\*\*\*|(?:bearer|basic|token)\s)(?P<secret>[^\s&'\",;]+)",
                re.IGNORECASE), r"\g<pre>" + MASK),
)


def redact(text: str) -> str:
    """``text`` with every secret-looking part replaced by ``***``."""
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return text


def redact_obj(obj: Any) -> Any:
    """Every string inside nested dicts/lists/tuples redacted; other values unchanged."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


def secret_values(obj: Any) -> set[str]:
    """The live secret substrings inside ``obj`` (what ``redact`` would mask)."""
    found: set[str] = set()

    def walk(o: Any) -> None:
        if isinstance(o, str):
            for pattern, _ in _RULES:
                found.update(m.group("secret") for m in pattern.finditer(o) if m.group("secret") != MASK)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    return {s for s in found if len(s) >= 3}


class SecretFilter(logging.Filter):
    """Redacts every log record (message and arguments) before any handler formats it."""

    def __init__(self) -> None:
        super().__init__()
        self.values: set[str] = set()

    def register(self, values: set[str]) -> None:
        self.values |= {v for v in values if v}

    def scrub(self, text: str) -> str:
        for value in sorted(self.values, key=len, reverse=True):
            text = text.replace(value, MASK)
        return redact(text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 -- a broken record is the logging module's to report
            return True
        record.msg, record.args = self.scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        return True


_FILTER = SecretFilter()


def install_log_filter(secrets: set[str] = frozenset()) -> SecretFilter:
    """Attach the process's one ``SecretFilter`` to every root handler (idempotent)."""
    _FILTER.register(set(secrets))
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    return _FILTER
