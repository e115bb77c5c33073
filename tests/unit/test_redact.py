"""``pce_dist.redact``: what looks like a secret is masked; what does not is left alone."""

from __future__ import annotations

import logging

import pytest

from pce_dist.config import load_config, to_yaml
from pce_dist.redact import SecretFilter, redact, secret_values


@pytest.mark.parametrize("text, secret", [
    ("http://user:s3cret@host:5055", "s3cret"),
    ("postgresql://mlflow:pw123@db:5432/mlflow", "pw123"),
    ("https://bucket/x.tar?X-Amz-Signature=abcdef&X-Amz-Date=1", "abcdef"),
    ("https://h/ds?token=tok_42", "tok_42"),
    ("pipe:curl -H 'Authorization: Bearer eyJhbGci' https://h/{name}", "eyJhbGci"),
    ("GITHUB_TOKEN=ghp_abc123 make", "ghp_abc123"),
])
def test_secrets_are_masked(text, secret):
    out = redact(text)
    assert secret not in out and "***" in out
    assert secret in secret_values({"k": [text]})


@pytest.mark.parametrize("text", ["sqlite:////tmp/run/mlflow.db", "http://127.0.0.1:5000", "data/digits",
                                  "pipe:cat /data/{name}", "model.num_experts=4", "https://h/x?shard=3"])
def test_ordinary_values_are_untouched(text):
    assert redact(text) == text


def test_config_yaml_is_redacted_but_the_config_keeps_the_live_value():
    cfg = load_config(None, ["tracking.tracking_uri=http://u:hunter22@127.0.0.1:5055"])
    assert cfg.tracking.tracking_uri == "http://u:hunter22@127.0.0.1:5055"
    text = to_yaml(cfg)
    assert "hunter22" not in text and "http://u:***@127.0.0.1:5055" in text


def test_log_filter_masks_registered_values_in_messages_args_and_tracebacks():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep()
    flt = SecretFilter()
    flt.register({"hunter22"})
    handler.addFilter(flt)
    logger = logging.getLogger("test_redact")
    logger.addHandler(handler)
    try:
        logger.warning("store %s down", "http://u:hunter22@h")
        logger.warning("raw value hunter22 in text")
        try:
            raise RuntimeError("connect to http://u:hunter22@h failed")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert len(records) == 3 and not any("hunter22" in r for r in records), records
