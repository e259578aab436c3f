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
from urllib.parse import quote, urlsplit

import pytest
from sqlalchemy import create_engine, text

from rohrpost.catcher import MailCatcher, free_port
from rohrpost.producer.client import Producer
from rohrpost.shared.logs import LineFormatter, SecretScrubber, get_logger
from rohrpost.shared.settings import Settings
from tests.conftest import (
    declare,
    drain,
    get,
    postgres_database,
    rohrpost_command,
    stop_process,
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


def test_a_traceback_shows_no_local_variables_and_no_secret() -> None:
    secret = "pässwört-Ω-\u20ac"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter("json", [secret]))
    stdlib_logger = logging.getLogger("rohrpost.tests.traceback")
    stdlib_logger.addHandler(handler)

    def login(password: str) -> None:
        password.encode("ascii")  # what smtplib does with a non-ASCII password

    try:
        try:
            login(secret)
        except UnicodeEncodeError:
            get_logger(stdlib_logger.name).exception("login failed", detail={"pw": [secret]})
    finally:
        stdlib_logger.removeHandler(handler)
    text = stream.getvalue()
    assert secret not in text and json.dumps(secret)[1:-1] not in text
    line = json.loads(text)
    assert line["detail"] == {"pw": ["***"]}
    assert all("locals" not in frame for frame in line["exception"][0]["frames"])


# ASCII secrets are covered above; these need escaping in JSON, URLs and reprs.
SECRETS = ["pässwört-Grüße-€-ß", 'q"uo\\te-ä%40-@:/?#']


def _forms(secret: str) -> list[str]:
    """How a secret could show: raw, URL-encoded, JSON- and repr-escaped."""
    forms = {secret, quote(secret, safe=""), json.dumps(secret)[1:-1], repr(secret)[1:-1]}
    return [form for form in forms if form]


@pytest.mark.parametrize("password", SECRETS)
def test_no_secret_reaches_a_log_line_a_metric_cli_output_or_a_stored_row(
    password: str,
    *,
    make_settings: Callable[..., Settings],
    catcher: MailCatcher,
    postgres_url: str,
    broker_user: Callable[[str], str],
    tmp_path: Path,
) -> None:
    catcher.login = ("mailer", password)
    catcher.always("gone@example.com", "550 5.1.1 gone", stage="rcpt")
    port = free_port()
    with postgres_database(postgres_url) as database_url:
        parts = urlsplit(database_url)
        store_url = parts._replace(
            netloc=f"postgres:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"
        ).geturl()
        settings = make_settings(
            broker_url=broker_user(password),
            store_url=store_url,
            metrics_port=port,
            smtp={"catcher": {"user": "mailer", "password_env": "SMTP_PW"}},
        )
        declare(settings)
        config = write_config(settings, tmp_path / "rohrpost.toml")
        env = {**os.environ, "SMTP_PW": password}
        with Producer(settings) as producer:
            ids = [
                producer.submit(
                    {"tenant": "acme", "app": "billing", "to": [to], "subject": "s", "text": "t"}
                    | {"max_attempts": 1}
                )
                for to in ("a@example.com", "gone@example.com")
            ]
        run = subprocess.Popen(
            rohrpost_command(config, "--log-level", "debug", "run"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        outputs: list[str] = []
        try:
            metrics = wait_until(
                lambda: (
                    (text := get(f"http://127.0.0.1:{port}/metrics")[1])
                    and "rohrpost_mails_dead_lettered_total{" in text
                    and text
                ),
                timeout=90,
            )
            outputs.append(metrics)

            def cli(*args: str) -> str:
                command = rohrpost_command(config, *args)
                done = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
                return done.stdout + done.stderr

            wait_until(lambda: str(ids[1]) in cli("history", "list", "--json"), timeout=60)
            for args in (
                ("history", "list", "--json"),
                ("history", "show", str(ids[0])),
                ("history", "show", str(ids[1]), "--json"),
                ("dlq", "list"),
                ("dlq", "show", str(ids[1]), "--json"),
                ("topology", "declare"),
            ):
                outputs.append(cli(*args))
        finally:
            outputs += stop_process(run)
        engine = create_engine(database_url)
        with engine.connect() as conn:
            for table in ("mails", "events", "mail_recipients", "mail_tags", "operator_actions"):
                outputs.append(repr(conn.execute(text(f"SELECT * FROM {table}")).all()))
        engine.dispose()
    assert any("mail dead-lettered" in line for line in outputs)
    everything = "\n".join(outputs)
    for form in _forms(password):
        assert form not in everything
