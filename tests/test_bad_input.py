"""Bad input gets a clear error at submit, or a dead letter with a reason at the worker."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from rohrpost.catcher import MailCatcher
from rohrpost.producer.client import Producer, SubmitManyError
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.container import MAX_CONTAINER_BYTES
from rohrpost.shared.errors import ContainerError, NotConfirmed, UnknownRoute
from rohrpost.shared.settings import Settings
from rohrpost.shared.topology import Topology, queue_depths
from rohrpost.shared.wire import REASON_HEADER, mail_properties
from tests.conftest import WorkerThread, dead_letters, declare, publish_raw


def mail(**fields: Any) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "app": "billing",
        "to": ["anna@example.com"],
        "subject": "Hi",
        "text": "Hello",
        **fields,
    }


def nothing_queued(settings: Settings) -> bool:
    topology = Topology.from_settings(settings)
    queues = [topology.send_queue(t, a) for t, a in topology.routes] + topology.delay_queues()
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        return not any(queue_depths(channel, queues).values())


@pytest.fixture
def two_apps(make_settings: Callable[..., Settings]) -> Settings:
    settings = make_settings(
        tenants={
            "acme": {
                "apps": {
                    "shop": {"enabled": False, "smtp": "catcher", "sender": "shop@acme.example"}
                }
            }
        }
    )
    declare(settings)
    return settings


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"tenant": "globex"}, UnknownRoute, "globex/billing is not configured"),
        ({"app": "shop"}, UnknownRoute, "acme/shop is disabled"),
        (
            {"headers": {"X-Note": "a\r\nBcc: victim@example.com"}},
            ContainerError,
            "headers.X-Note: must not contain CR or LF",
        ),
        ({"subject": "Hi\nthere"}, ContainerError, "subject: must not contain CR or LF"),
        ({"to": ["anna(at)example.com"]}, ContainerError, "to.0: "),
        ({"text": "x" * MAX_CONTAINER_BYTES}, ContainerError, "container: .* more than the cap"),
    ],
)
def test_bad_mails_are_refused_at_submit_naming_the_cause_and_nothing_is_published(
    two_apps: Settings, fields: dict[str, Any], error: type[Exception], message: str
) -> None:
    with Producer(two_apps) as producer, pytest.raises(error, match=message):
        producer.submit(mail(**fields))
    assert nothing_queued(two_apps)


def test_submit_many_reports_the_position_of_a_bad_mail_and_what_was_confirmed(
    settings: Settings,
) -> None:
    mails = [mail(), mail(), mail(), mail(to=["broken"]), mail()]
    with Producer(settings) as producer, pytest.raises(SubmitManyError) as error:
        producer.submit_many(mails, window=4)  # validated in chunks of two
    assert "mail #4" in str(error.value) and "to.0" in str(error.value)
    # the first chunk of two was published and confirmed; the bad mail's chunk was not
    assert len(error.value.submitted) == 2
    topology = Topology.from_settings(settings)
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        assert queue_depths(channel, [topology.send_queue("acme", "billing")]) == {
            topology.send_queue("acme", "billing"): 2
        }


def test_a_publish_nobody_routes_is_an_error_not_silence(
    make_settings: Callable[..., Settings],
) -> None:
    declared = make_settings()
    declare(declared)
    # The configuration knows acme/payroll, but its queue was never declared.
    settings = make_settings(
        tenants={
            "acme": {"apps": {"payroll": {"smtp": "catcher", "sender": "payroll@acme.example"}}}
        }
    )
    with Producer(settings) as producer, pytest.raises(NotConfirmed, match="no queue is bound"):
        producer.submit(mail(app="payroll"))


@pytest.mark.parametrize(
    ("body", "reason_detail"),
    [
        (b'{"tenant": "acme", "app": "billing", "to": [', "Invalid JSON"),
        (b"\x00\xff binary garbage", "Invalid JSON"),
        (json.dumps(mail(to=[])).encode(), "at least one recipient"),
        (json.dumps(mail(subject="x\r\nBcc: a@example.com")).encode(), "CR or LF"),
        (json.dumps({**mail(), "evil": True}).encode(), "evil: Extra inputs"),
    ],
)
def test_invalid_messages_on_a_send_queue_are_dead_lettered_and_the_worker_keeps_running(
    settings: Settings,
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
    body: bytes,
    reason_detail: str,
) -> None:
    handle = worker_thread(settings)
    topology = Topology.from_settings(settings)
    publish_raw(settings, topology.send_queue("acme", "billing"), body)
    with Producer(settings) as producer:
        producer.submit(mail(subject="after the bad one"))
    catcher.wait_for(lambda mails: len(mails) == 1)
    handle.stop()
    [(properties, dead_body)] = dead_letters(settings)
    assert properties.headers[REASON_HEADER] == "invalid"
    assert reason_detail in properties.headers["x-rohrpost-error"]
    assert dead_body == body, "the dead letter keeps the original bytes for inspection"


def test_a_mail_in_another_tenants_queue_is_dead_lettered_as_misrouted(
    settings: Settings, catcher: MailCatcher, worker_thread: Callable[..., WorkerThread]
) -> None:
    handle = worker_thread(settings)
    topology = Topology.from_settings(settings)
    publish_raw(
        settings, topology.send_queue("acme", "billing"), json.dumps(mail(tenant="globex")).encode()
    )
    with Producer(settings) as producer:
        producer.submit(mail())
    catcher.wait_for(lambda mails: len(mails) == 1)
    handle.stop()
    [(properties, _)] = dead_letters(settings)
    assert properties.headers[REASON_HEADER] == "misrouted"


def test_another_tenant_using_a_mails_id_cannot_make_it_a_duplicate(
    make_settings: Callable[..., Settings],
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    # Mail ids are chosen by clients (idempotency keys) and go out in Message-ID: a
    # tenant that knows another's id and publishes its own mail under it must not use
    # up the other mail's send claim (it would be dropped as a duplicate, unsent).
    settings = make_settings(
        tenants={"globex": {"apps": {"shop": {"smtp": "catcher", "sender": "shop@globex.example"}}}}
    )
    declare(settings)
    topology = Topology.from_settings(settings)
    handle = worker_thread(settings)
    taken = str(uuid.uuid4())
    foreign = mail(tenant="globex", app="shop", id=taken, subject="globex's own mail")
    publish_raw(
        settings,
        "globex.shop",
        json.dumps(foreign).encode(),
        exchange=topology.submit_exchange,
        properties=mail_properties(taken),
    )
    catcher.wait_for(lambda mails: len(mails) == 1)
    with Producer(settings) as producer:
        producer.submit(mail(id=taken, subject="acme's mail"))
    mails = catcher.wait_for(lambda mails: len(mails) == 2, timeout=15)
    handle.stop()
    assert mails[1].parsed()["Subject"] == "acme's mail"
