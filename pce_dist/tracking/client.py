"""The edge between pce_dist and the MLflow client, shared by every module that talks to it.

The writer (``pce_dist.tracking``) and the reader (``pce_dist.runs``) both need the same
three things from MLflow and none of them is about what they send: HTTP calls that give
up within seconds instead of minutes, a way to tell "the store refused this" from "the
store did not answer", and log lines that never show a password. Keeping them here means
one set of limits and one scrubbing filter for the whole process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator

from pce_dist.redact import SecretFilter

# One logger for the whole package, under a fixed name (also when run as ``python -m``):
# a logger's filters do not apply to records of its children, so the secret filter below
# sees every record only if every module logs here.
log = logging.getLogger("pce_dist.tracking")

# (retries, backoff factor, per-request socket timeout in s) instead of MLflow's 7 retries
# with exponential backoff (minutes); urllib3 retries the first time without sleeping.
PROBE_LIMITS = (2, 1, 5)  # start / read probe: fail fast
CALL_LIMITS = (1, 1, 15)  # start / read calls on the main thread
WRITE_LIMITS = (1, 1, 5)  # writer thread: <= 2 x 5 s per call on a hung server, then the file
RETRY_PROBE_LIMITS = (0, 0, 2)  # an offline writer's retry starts with one 2 s request


def is_remote_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def is_rejection(exc: BaseException) -> bool:
    """The store answered and said no (bad key/value): retrying the same request cannot help."""
    return getattr(exc, "error_code", None) in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE")


class _MlflowSettings:
    """MLflow settings held while any caller is inside one of our calls, unless the user set them.

    The HTTP caps (retries, backoff factor, socket timeout), and no printing of run URLs:
    MLflow writes ``View run ... at: <live URI>`` to stdout on ``set_terminated``, password
    included (train.py prints the redacted URI instead); no artifact progress bars either
    (a model upload or download would draw one per file into the training log). MLflow reads these from the
    environment at call time, so they are process-wide: the writer thread and the main
    thread may both be inside. A reference count keeps one from removing them under the
    other; the first one in chooses the limits.
    """

    _LIMITS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    _QUIET = ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")  # set to quiet

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._added: list[str] = []

    @contextlib.contextmanager
    def __call__(self, limits: tuple[int, int, int]) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                quiet = dict(zip(self._QUIET, ("true", "false")))
                values = {**dict(zip(self._LIMITS, map(str, limits))), **quiet}
                self._added = [n for n in values if n not in os.environ]
                os.environ.update({n: values[n] for n in self._added})
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    for name in self._added:
                        os.environ.pop(name, None)


bounded_http = _MlflowSettings()

# Scrubs every record of this package's logger (patterns of pce_dist.redact plus the live
# secrets of the runs it tracks); attached by watch_secrets, not at import.
SCRUB = SecretFilter()


def watch_secrets(values: Iterable[str]) -> None:
    """Mask ``values`` (live passwords, tokens) in every later log record of this package, and of MLflow's."""
    SCRUB.register(set(values))
    if SCRUB not in log.filters:
        log.addFilter(SCRUB)
    scrub_mlflow_logs()


def scrub_mlflow_logs() -> None:
    """Put ``SCRUB`` on MLflow's own loggers and handlers: their records quote request URLs.

    MLflow's system-metrics thread, for one, warns ``Failed to get mlflow run: API request
    to http://user:<password>@host/...`` through MLflow's own stderr handler, which no
    root-handler filter sees. A filter on a logger only sees the records created there,
    so it goes on every ``mlflow.*`` logger that exists (call again after importing more
    of MLflow) and on the ``mlflow`` logger's handlers, which every child record reaches.
    """
    manager = logging.Logger.manager
    for name, logger in list(manager.loggerDict.items()):
        if (name == "mlflow" or name.startswith("mlflow.")) and isinstance(logger, logging.Logger):
            if SCRUB not in logger.filters:
                logger.addFilter(SCRUB)
    for handler in logging.getLogger("mlflow").handlers:
        if SCRUB not in handler.filters:
            handler.addFilter(SCRUB)


@contextlib.contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent calls (``Model.log``, ``download_artifacts``) use the process's URI: set it, then unset.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` (password included, to
    every later subprocess, and pce_dist reads that variable first); afterwards the
    process's URI is unset again and the variable is what it was before.
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


def chunks(items: list, size: int) -> Iterator[list]:
    """``items`` in slices of at most ``size``: MLflow caps how much one ``log_batch`` carries."""
    for i in range(0, len(items), size):
        yield items[i:i + size]
