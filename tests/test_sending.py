"""Mails arrive as submitted: headers, bodies, templates, attachments, encodings, timing."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pika
import pytest
from prometheus_client import CollectorRegistry

from rohrpost.catcher import MailCatcher
from rohrpost.consumer.outcome import Cancelled, Processed, Redelay, Sent
from rohrpost.consumer.processor import HOLD_SECONDS, MailProcessor
from rohrpost.consumer.render import RenderLimits, TemplateRenderer
from rohrpost.producer.client import Producer
from rohrpost.shared.broker import Delivery, admin_channel
from rohrpost.shared.container import encode_container, parse_container
from rohrpost.shared.control import ControlMessage, ControlState
from rohrpost.shared.delay import RELEASE_LEAD_SECONDS
from rohrpost.shared.metrics import Metrics
from rohrpost.shared.settings import Settings
from rohrpost.shared.topology import Topology, queue_depths
from tests.conftest import (
    EventLog,
    WorkerThread,
    declare,
    drain,
    wait_until,
    write_template,
)

# A minimal valid PDF with a binary comment line (bytes >= 0x80 must survive).
PDF = (
    b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Count 0/Kids[]>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
    + bytes(range(256))
)


def finished(**fields: Any) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "app": "billing",
        "to": ["Anna Schmidt <anna@example.com>"],
        "subject": "Your invoice",
        "text": "Hello Anna, your invoice is attached.",
        **fields,
    }


def only(catcher: MailCatcher) -> EmailMessage:
    mails = catcher.mails
    assert len(mails) == 1, f"expected one mail, got {len(mails)}"
    return mails[0].parsed()


def test_a_finished_mail_arrives_with_its_headers_and_body(
    settings: Settings, catcher: MailCatcher
) -> None:
    with Producer(settings) as producer:
        mail_id = producer.submit(
            finished(
                cc=["Bob <bob@example.com>"],
                bcc=["audit@example.com"],
                reply_to=["help@acme.example"],
                headers={"X-Campaign": "winter"},
            )
        )
    drain(settings)
    caught = catcher.mails[0]
    message = caught.parsed()
    assert message["From"] == "Acme Billing <billing@acme.example>"
    assert message["To"] == "Anna Schmidt <anna@example.com>"
    assert message["Cc"] == "Bob <bob@example.com>"
    assert message["Bcc"] is None
    assert message["Reply-To"] == "help@acme.example"
    assert message["Subject"] == "Your invoice"
    assert message["X-Campaign"] == "winter"
    assert message["Message-ID"] == f"<{mail_id}@acme.example>"
    assert message.get_content().strip() == "Hello Anna, your invoice is attached."
    assert caught.envelope_from == "billing@acme.example"
    assert set(caught.recipients) == {"anna@example.com", "bob@example.com", "audit@example.com"}
    assert b"\r\n" in caught.data and b"\n" not in caught.data.replace(b"\r\n", b"")


def test_a_template_mail_is_rendered_with_its_data(
    settings: Settings, catcher: MailCatcher, templates: Path
) -> None:
    write_template(
        templates,
        "invoice",
        subject="Invoice {{ number }}",
        text="Dear {{ name }}, you owe {{ amount }} EUR.",
        html="<p>Dear {{ name }}</p>",
    )
    with Producer(settings) as producer:
        producer.submit(
            {
                "tenant": "acme",
                "app": "billing",
                "to": ["anna@example.com"],
                "template": "invoice",
                "data": {"number": 42, "name": "<Anna & Co>", "amount": "12.50"},
            }
        )
    drain(settings)
    message = only(catcher)
    assert message["Subject"] == "Invoice 42"
    assert (
        message.get_body(("plain",)).get_content().strip() == "Dear <Anna & Co>, you owe 12.50 EUR."
    )
    # HTML is autoescaped; plain text is not.
    assert message.get_body(("html",)).get_content().strip() == "<p>Dear &lt;Anna &amp; Co&gt;</p>"


def test_a_template_edited_after_submit_applies_to_the_queued_mail(
    settings: Settings, catcher: MailCatcher, templates: Path
) -> None:
    write_template(templates, "notice", subject="Old subject", text="old body")
    with Producer(settings) as producer:
        producer.submit(
            {"tenant": "acme", "app": "billing", "to": ["anna@example.com"], "template": "notice"}
        )
    write_template(templates, "notice", subject="New subject", text="new body {{ 1 + 1 }}")
    drain(settings)
    message = only(catcher)
    assert message["Subject"] == "New subject"
    assert message.get_content().strip() == "new body 2"


def test_a_template_edited_while_the_worker_runs_applies_to_the_next_mail(
    settings: Settings,
    catcher: MailCatcher,
    templates: Path,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    folder = write_template(templates, "notice", subject="Version 1", text="v1")
    worker_thread(settings)
    with Producer(settings) as producer:
        producer.submit(
            {"tenant": "acme", "app": "billing", "to": ["a@example.com"], "template": "notice"}
        )
        catcher.wait_for(lambda mails: len(mails) == 1)
        (folder / "subject.j2").write_text("Version 2")
        producer.submit(
            {"tenant": "acme", "app": "billing", "to": ["a@example.com"], "template": "notice"}
        )
        mails = catcher.wait_for(lambda mails: len(mails) == 2)
    assert [m.parsed()["Subject"] for m in mails] == ["Version 1", "Version 2"]


def test_a_pdf_attachment_arrives_intact(settings: Settings, catcher: MailCatcher) -> None:
    attachment = {
        "filename": "Rechnung Nr. 7 — März.pdf",
        "content_type": "application/pdf",
        "content": base64.b64encode(PDF).decode(),
    }
    with Producer(settings) as producer:
        producer.submit(finished(attachments=[attachment]))
    drain(settings)
    message = only(catcher)
    parts = list(message.iter_attachments())
    assert len(parts) == 1
    assert parts[0].get_content_type() == "application/pdf"
    assert parts[0].get_filename() == "Rechnung Nr. 7 — März.pdf"
    assert parts[0].get_content() == PDF
    assert message.get_body(("plain",)).get_content().strip().startswith("Hello Anna")


def test_non_ascii_subjects_names_and_bodies_arrive_correctly_encoded(
    settings: Settings, catcher: MailCatcher
) -> None:
    with Producer(settings) as producer:
        producer.submit(
            finished(
                **{"from": "Jürgen Groß <billing@acme.example>"},
                to=["日本 太郎 <taro@example.jp>", "Zoë Ünal <zoe@example.com>"],
                subject="Grüße aus Köln — 日本へようこそ",
                text="Liebe Grüße,\n日本語のテキスト ✓",
                html="<p>Grüße — 日本</p>",
            )
        )
    drain(settings)
    caught = catcher.mails[0]
    assert caught.data.isascii(), "headers and bodies are transfer-encoded for 7-bit transport"
    message = caught.parsed()
    assert message["Subject"] == "Grüße aus Köln — 日本へようこそ"
    assert message["From"] == "Jürgen Groß <billing@acme.example>"
    assert message["To"] == "日本 太郎 <taro@example.jp>, Zoë Ünal <zoe@example.com>"
    # Text goes out in canonical form, CRLF line ends (RFC 2046 4.1.1), base64 included.
    text = message.get_body(("plain",)).get_content()
    assert text == "Liebe Grüße,\r\n日本語のテキスト ✓"
    assert message.get_body(("html",)).get_content().strip() == "<p>Grüße — 日本</p>"


def test_a_mail_due_in_3_seconds_is_not_sent_before_and_sent_within_2_seconds_after(
    settings: Settings, catcher: MailCatcher, worker_thread: Callable[..., WorkerThread]
) -> None:
    worker_thread(settings)
    not_before = datetime.now(UTC) + timedelta(seconds=3)
    with Producer(settings) as producer:
        producer.submit(finished(not_before=not_before.isoformat()))
    mails = catcher.wait_for(lambda mails: len(mails) == 1, timeout=15)
    lateness = mails[0].received_at - not_before.timestamp()
    assert 0 <= lateness <= 2, f"sent {lateness:+.2f}s relative to not_before"


def test_an_expired_mail_is_not_sent_and_ends_as_expired(
    settings: Settings, catcher: MailCatcher, event_log: EventLog
) -> None:
    with Producer(settings) as producer:
        mail_id = producer.submit(
            finished(expires_at=(datetime.now(UTC) + timedelta(seconds=30)).isoformat())
        )
    drain(settings, clock=lambda: time.time() + 60)  # the worker sees it a minute later
    assert catcher.mails == []
    assert [(e.kind, e.mail_id) for e in event_log.read()] == [("expired", mail_id)]


def test_the_producer_refuses_a_mail_already_expired(settings: Settings) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    with Producer(settings) as producer:
        try:
            producer.submit(finished(expires_at=past))
        except ValueError as exc:
            assert "expires_at" in str(exc)
        else:
            raise AssertionError("an expired mail was accepted")


def test_an_early_arrival_is_delayed_again_never_sent_early(
    settings: Settings, catcher: MailCatcher, event_log: EventLog
) -> None:
    # A worker whose clock runs 5 s behind sees a due mail as early, and delays it.
    with Producer(settings) as producer:
        producer.submit(finished(not_before=datetime.now(UTC).isoformat()))
    started = time.time()
    drain(settings, clock=lambda: time.time() - 5)
    assert len(catcher.mails) == 1
    assert catcher.mails[0].received_at - started >= 4
    assert [e.kind for e in event_log.read()] == ["sent"]


class _RecordingTransport:
    """Takes every mail at once and notes when."""

    def __init__(self) -> None:
        self.sent_at: list[float] = []

    def send(self, server: str, envelope_from: str, recipients: Any, message: bytes) -> str:
        self.sent_at.append(time.time())
        return "250 OK"

    def close(self) -> None:
        pass


def _delivery(settings: Settings, **fields: Any) -> Delivery:
    topology = Topology.from_settings(settings)
    container = parse_container(finished(**fields))
    return Delivery(
        tag=1,
        generation=1,
        queue=topology.send_queue("acme", "billing"),
        routing_key=topology.route_key("acme", "billing"),
        properties=pika.BasicProperties(message_id=str(container.id), headers={}),
        body=encode_container(container),
        redelivered=False,
    )


def _process_once(
    settings: Settings, delivery: Delivery, control: ControlState | None = None
) -> tuple[Processed, _RecordingTransport]:
    """``delivery`` processed by a worker's MailProcessor; its outcome and the transport."""
    transport = _RecordingTransport()
    renderer = TemplateRenderer(settings.templates_dir, RenderLimits.of(settings))
    topology = Topology.from_settings(settings)
    processor = MailProcessor(settings, topology, renderer, control=control)
    try:
        return processor.process(delivery, transport), transport
    finally:
        renderer.close()


@pytest.mark.parametrize("early", [0.3, 1.0, HOLD_SECONDS - 0.2])
def test_a_mail_arriving_up_to_hold_seconds_early_is_held_and_sent_once_due(
    settings: Settings, early: float
) -> None:
    # A mail without the producer's due mark (or seen by a worker whose clock runs behind)
    # that arrives shortly before it is due waits on the sender thread.
    due = datetime.now(UTC) + timedelta(seconds=early)
    outcome, transport = _process_once(settings, _delivery(settings, not_before=due.isoformat()))
    assert isinstance(outcome.outcome, Sent)
    assert len(transport.sent_at) == 1
    assert transport.sent_at[0] >= due.timestamp(), "sent before it was due"


class _CancelledAfterFirstLook(ControlState):
    """Learns of a mail's cancel right after the worker first looked for one."""

    def __init__(self, mail_id: uuid.UUID) -> None:
        super().__init__()
        self.looks = 0
        self._mail_id = mail_id

    def is_cancelled(self, mail_id: uuid.UUID) -> bool:
        cancelled = super().is_cancelled(mail_id)
        self.looks += 1
        if self.looks == 1:
            self.apply(ControlMessage(action="cancel", mail_id=self._mail_id, actor="test"))
        return cancelled


def test_a_mail_cancelled_while_it_is_held_until_due_is_not_sent(settings: Settings) -> None:
    # An unmarked mail that arrives shortly before it is due waits it out on a sender
    # thread; a cancel the worker reads meanwhile must still stop it.
    due = datetime.now(UTC) + timedelta(seconds=0.5)
    delivery = _delivery(settings, not_before=due.isoformat())
    control = _CancelledAfterFirstLook(uuid.UUID(delivery.properties.message_id))
    outcome, transport = _process_once(settings, delivery, control)
    assert control.looks == 2, "looked for a cancel on arrival and again once due"
    assert isinstance(outcome.outcome, Cancelled)
    assert transport.sent_at == []


def test_a_mail_cancelled_while_its_send_claim_is_taken_is_not_sent(settings: Settings) -> None:
    # Taking the send claim is a round trip to Redis; a cancel read meanwhile still counts.
    delivery = _delivery(settings)
    control = _CancelledAfterFirstLook(uuid.UUID(delivery.properties.message_id))
    outcome, transport = _process_once(settings, delivery, control)
    assert control.looks == 2, "looked for a cancel when it was due and again before sending"
    assert isinstance(outcome.outcome, Cancelled)
    assert transport.sent_at == []


def test_a_mail_arriving_more_than_hold_seconds_early_is_delayed_again(settings: Settings) -> None:
    due = datetime.now(UTC) + timedelta(seconds=HOLD_SECONDS + 3)
    outcome, transport = _process_once(settings, _delivery(settings, not_before=due.isoformat()))
    assert isinstance(outcome.outcome, Redelay)
    assert outcome.outcome.delay_seconds >= HOLD_SECONDS + 2
    assert transport.sent_at == []


def _held(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("rohrpost_mails_held_until_due") or 0.0


def test_a_mail_due_soon_waits_in_the_worker_without_a_sender_thread(
    make_settings: Callable[..., Settings],
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    # Within the lead a scheduled mail goes straight to its send queue; the worker holds
    # it on its timer. One sender thread: a due mail must not wait behind the held ones.
    settings = make_settings(threads=1)
    declare(settings)
    registry = CollectorRegistry()
    worker_thread(settings, metrics=Metrics(registry))
    due = datetime.now(UTC) + timedelta(seconds=RELEASE_LEAD_SECONDS + 0.9)
    with Producer(settings) as producer:
        for _ in range(3):
            producer.submit(finished(not_before=due.isoformat()))
        wait_until(lambda: _held(registry) == 3, timeout=RELEASE_LEAD_SECONDS)  # before due
        producer.submit(finished(subject="due now"))
    mails = catcher.wait_for(lambda mails: len(mails) == 4, timeout=60)
    assert mails[0].parsed()["Subject"] == "due now"
    assert mails[0].received_at < due.timestamp(), "the due mail waited for the held ones"
    for caught in mails[1:]:
        assert caught.received_at >= due.timestamp(), "a held mail was sent early"
    assert _held(registry) == 0


def test_a_stopping_worker_gives_back_the_mails_it_holds_until_due(
    settings: Settings, catcher: MailCatcher, worker_thread: Callable[..., WorkerThread]
) -> None:
    registry = CollectorRegistry()
    first = worker_thread(settings, metrics=Metrics(registry))
    due = datetime.now(UTC) + timedelta(seconds=RELEASE_LEAD_SECONDS + 0.5)
    with Producer(settings) as producer:
        producer.submit(finished(not_before=due.isoformat()))
    wait_until(lambda: _held(registry) == 1, timeout=30)
    first.stop()
    send_queue = Topology.from_settings(settings).send_queue("acme", "billing")
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        assert queue_depths(channel, [send_queue]) == {send_queue: 1}, "not given back"
    assert catcher.mails == []
    worker_thread(settings)
    mails = catcher.wait_for(lambda mails: len(mails) == 1, timeout=60)
    assert mails[0].received_at >= due.timestamp()
    time.sleep(1)  # a second copy would come at once
    assert len(catcher.mails) == 1
