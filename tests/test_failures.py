"""Failures: transient ones are retried with backoff, the rest are dead-lettered with a reason."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rohrpost.catcher import MailCatcher
from rohrpost.producer.client import Producer
from rohrpost.shared.settings import Settings
from rohrpost.shared.wire import ATTEMPT_HEADER, ATTEMPTS_HEADER, ERROR_HEADER, REASON_HEADER
from tests.conftest import EventLog, dead_letters, declare, drain, write_template

RECIPIENT = "anna@example.com"


@pytest.fixture(params=[False, True], ids=["one-by-one", "pipelining"])
def catcher(request: pytest.FixtureRequest) -> Iterator[MailCatcher]:
    """The SMTP server, once without and once with PIPELINING (both client paths)."""
    with MailCatcher(pipelining=request.param) as server:
        yield server


def mail(**fields: Any) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "app": "billing",
        "to": [RECIPIENT],
        "subject": "Hi",
        "text": "Hello",
        **fields,
    }


def test_421_twice_then_250_is_sent_on_the_third_attempt_with_backoff_between(
    settings: Settings, catcher: MailCatcher, event_log: EventLog
) -> None:
    catcher.script(RECIPIENT, ["421 4.3.2 busy", "421 4.3.2 still busy"])
    with Producer(settings) as producer:
        mail_id = producer.submit(mail())
    drain(settings)
    attempts = catcher.attempts
    assert [a.reply[:3] for a in attempts] == ["421", "421", "250"]
    # backoff base 1 s, factor 2, no jitter: >= 1 s, then >= 2 s between attempts
    assert attempts[1].at - attempts[0].at >= 1.0
    assert attempts[2].at - attempts[1].at >= 2.0
    assert len(catcher.mails) == 1
    assert catcher.mails[0].parsed()["Message-ID"] == f"<{mail_id}@acme.example>"
    events = event_log.read()
    assert [(e.kind, e.attempt) for e in events] == [
        ("attempt_failed", 1),
        ("attempt_failed", 2),
        ("sent", 3),
    ]
    assert events[0].error is not None and "421 4.3.2 busy" in events[0].error
    assert dead_letters(settings) == []


def test_always_421_is_dead_lettered_after_max_attempts_with_reason_and_last_error(
    settings: Settings, catcher: MailCatcher, event_log: EventLog
) -> None:
    catcher.always(RECIPIENT, "421 4.3.2 try again later, attempt refused", stage="data")
    with Producer(settings) as producer:
        mail_id = producer.submit(mail())
    drain(settings)
    assert len(catcher.attempts) == 3  # max_attempts of acme/billing
    assert catcher.mails == []
    [(properties, body)] = dead_letters(settings)
    headers = properties.headers
    assert headers[REASON_HEADER] == "max_attempts"
    assert headers[ATTEMPTS_HEADER] == 3
    assert "421 4.3.2 try again later" in headers[ERROR_HEADER]
    assert "x-death" not in headers
    assert str(mail_id).encode() in body
    assert [e.kind for e in event_log.read()] == [
        "attempt_failed",
        "attempt_failed",
        "dead_lettered",
    ]


def test_max_attempts_of_the_container_overrides_the_app(
    settings: Settings, catcher: MailCatcher
) -> None:
    catcher.always(RECIPIENT, "451 4.3.0 local error", stage="data")
    with Producer(settings) as producer:
        producer.submit(mail(max_attempts=1))
    drain(settings)
    assert len(catcher.attempts) == 1
    [(properties, _)] = dead_letters(settings)
    assert properties.headers[REASON_HEADER] == "max_attempts"


def test_550_is_dead_lettered_at_once(settings: Settings, catcher: MailCatcher) -> None:
    catcher.always(RECIPIENT, "550 5.1.1 no such user", stage="rcpt")
    with Producer(settings) as producer:
        producer.submit(mail())
    drain(settings)
    assert len(catcher.attempts) == 1
    [(properties, _)] = dead_letters(settings)
    assert properties.headers[REASON_HEADER] == "rejected"
    assert properties.headers[ATTEMPTS_HEADER] == 1
    assert "550 5.1.1 no such user" in properties.headers[ERROR_HEADER]


def test_a_template_syntax_error_is_dead_lettered_at_once(
    settings: Settings, catcher: MailCatcher, templates: Path
) -> None:
    write_template(templates, "broken", subject="Hi {{ name", text="body")
    with Producer(settings) as producer:
        producer.submit(
            {
                "tenant": "acme",
                "app": "billing",
                "to": [RECIPIENT],
                "template": "broken",
                "data": {"name": "Anna"},
            }
        )
    drain(settings)
    assert catcher.attempts == []
    [(properties, _)] = dead_letters(settings)
    assert properties.headers[REASON_HEADER] == "template_error"
    assert "broken/subject.j2 line 1" in properties.headers[ERROR_HEADER]


def test_a_missing_template_variable_is_a_template_error_not_an_empty_greeting(
    settings: Settings, catcher: MailCatcher, templates: Path
) -> None:
    write_template(templates, "greet", subject="Hi", text="Dear {{ name }},")
    with Producer(settings) as producer:
        producer.submit(
            {"tenant": "acme", "app": "billing", "to": [RECIPIENT], "template": "greet"}
        )
    drain(settings)
    assert catcher.mails == []
    [(properties, _)] = dead_letters(settings)
    assert properties.headers[REASON_HEADER] == "template_error"
    assert "'name' is undefined" in properties.headers[ERROR_HEADER]


def test_a_sandboxed_template_cannot_reach_python_internals(
    settings: Settings, catcher: MailCatcher, templates: Path
) -> None:
    write_template(
        templates, "evil", subject="x", text="{{ ''.__class__.__mro__[1].__subclasses__() }}"
    )
    with Producer(settings) as producer:
        producer.submit({"tenant": "acme", "app": "billing", "to": [RECIPIENT], "template": "evil"})
    drain(settings)
    assert catcher.mails == []
    [(properties, _)] = dead_letters(settings)
    assert properties.headers[REASON_HEADER] == "template_error"
    assert "unsafe" in properties.headers[ERROR_HEADER]


def test_an_unreachable_smtp_server_is_transient(make_settings: Any, catcher: MailCatcher) -> None:
    settings = make_settings(smtp={"catcher": {"port": 1}})
    declare(settings)
    with Producer(settings) as producer:
        producer.submit(mail(max_attempts=2))
    drain(settings)
    [(properties, _)] = dead_letters(settings)
    assert properties.headers[REASON_HEADER] == "max_attempts"
    assert properties.headers[ATTEMPT_HEADER] == 2
    assert "Connection refused" in properties.headers[ERROR_HEADER]
