"""Logs: one line per mail outcome, carrying the mail's fields; never a secret."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from rohrpost.catcher import MailCatcher, free_port
from rohrpost.producer.client import Producer
from rohrpost.shared.logs import LineFormatter, SecretScrubber, get_logger
from rohrpost.shared.settings import Settings
from tests.conftest import (
    declare,
    drain,
    get,
    rohrpost_command,
    wait_until,
    write_config,
)

PASSWORD = "pw-Zq8!x-not-for-logs"


def test_each_mail_outcome_is_one_info_line_with_the_mail_fields(
    settings: Settings, catcher: MailCatcher, caplog: pytest.LogCaptureFixture
) -> None:
    catcher.always("gone@example.com", "550 5.1.1 gone", stage="rcpt")
    with Producer(settings) as producer:
        ok = producer.submit(
            {
                "tenant": "acme",
                "app": "billing",
                "to": ["a@example.com"],
                "subject": "s",
                "text": "t",
            }
        )
        bad = producer.submit(
            {
                "tenant": "acme",
                "app": "billing",
                "to": ["gone@example.com"],
                "subject": "s",
                "text": "t",
            }
        )
    caplog.set_level(logging.DEBUG, logger="rohrpost")
    drain(settings)
    outcomes = [record.__dict__ for record in caplog.records if hasattr(record, "outcome")]
    assert sorted((e["outcome"], e["mail_id"]) for e in outcomes) == sorted(
        [("sent", str(ok)), ("dead_lettered", str(bad))]
    )
    for entry in outcomes:
        assert entry["tenant"] == "acme" and entry["app"] == "billing" and entry["attempt"] == 1
        assert entry["levelname"] in ("INFO", "WARNING")


def test_the_scrubber_removes_secret_values_from_every_field() -> None:
    scrub = SecretScrubber([PASSWORD])
    line = scrub(None, "info", {"event": f"login as u:{PASSWORD}", "n": 3})
    assert line == {"event": "login as u:***", "n": 3}


def test_json_lines_are_rendered_through_the_scrubber() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter("json", [PASSWORD]))
    stdlib_logger = logging.getLogger("rohrpost.tests.scrubber")
    stdlib_logger.addHandler(handler)
    try:
        get_logger(stdlib_logger.name).warning("connecting", url=f"smtp://u:{PASSWORD}@host")
    finally:
        stdlib_logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert (line["event"], line["url"], line["level"]) == (
        "connecting",
        "smtp://u:***@host",
        "warning",
    )


def test_an_smtp_password_appears_in_no_log_line_and_no_metric(
    make_settings: Callable[..., Settings], catcher: MailCatcher, tmp_path: Path
) -> None:
    port = free_port()
    settings = make_settings(
        smtp={"catcher": {"user": "mailer", "password_env": "SMTP_PW"}}, metrics_port=port
    )
    declare(settings)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    with Producer(settings) as producer:
        producer.submit(
            {
                "tenant": "acme",
                "app": "billing",
                "to": ["a@example.com"],
                "subject": "s",
                "text": "t",
                "max_attempts": 1,
            }
        )
    worker = subprocess.Popen(
        rohrpost_command(config, "--log-level", "debug", "worker"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SMTP_PW": PASSWORD},
    )
    try:
        metrics = wait_until(
            lambda: (
                (text := get(f"http://127.0.0.1:{port}/metrics")[1])
                and "rohrpost_mails_dead_lettered_total{" in text
                and text
            )
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        stdout, stderr = worker.communicate(timeout=30)
    assert worker.returncode == 0, stderr[-2000:]
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(line.get("outcome") == "dead_lettered" for line in lines)
    assert PASSWORD not in stderr and PASSWORD not in stdout
    assert PASSWORD not in metrics
