"""The console in a real browser (Playwright driving Debian's Chromium) on the real pipeline.

A worker, the history consumer and the console run in threads of the test, against
the real broker, a SQLite store and an SMTP catcher; Chromium clicks through the
pages as an operator would. The tests share one browser (and so one xdist worker).
They also take the screenshots the README shows (``docs/console-*.png``).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rohrpost.catcher import MailCatcher
from rohrpost.console.server import ConsoleThread
from rohrpost.consumer.history import HistoryConsumer
from rohrpost.producer.client import Producer
from rohrpost.shared.settings import Settings
from rohrpost.shared.store import HistoryStore, MailFilter
from rohrpost.shared.topology import Topology
from tests.conftest import WorkerThread, dead_letters, declare, wait_until, write_template
from tests.console_helpers import GLOBEX, PASSWORDS, SECRET_KEY, console_config, mail

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("ROHRPOST_TEST_CHROMIUM", "/usr/bin/chromium")
DOCS = Path(__file__).resolve().parent.parent / "docs"
pytestmark = [
    pytest.mark.xdist_group("browser"),
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not shutil.which(CHROMIUM),
        reason=f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)",
    ),
]
REJECTED = "550 5.1.1 no such user here"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium for every test of this module."""
    with playwright.sync_playwright() as driver:
        launched = driver.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield launched
        launched.close()


class Pipeline:
    """Worker, history consumer and console, each in a thread, on one installation."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = HistoryStore.open(settings.store_url.get_secret_value(), migrate_schema=True)
        self.worker = WorkerThread(settings).start()
        self.history = HistoryConsumer(settings, self.store)
        self._history_thread = threading.Thread(target=self.history.run, name="test-history")
        self._history_thread.start()
        self.console = ConsoleThread(settings).start()

    def stop(self) -> None:
        self.console.stop()
        self.history.stop()
        self._history_thread.join(30)
        self.worker.stop()
        self.store.close()

    def status(self, mail_id: str) -> str | None:
        found = self.store.mail(uuid.UUID(mail_id))
        return found.mail.status if found else None


@pytest.fixture
def pipeline(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Pipeline]:
    monkeypatch.setenv("ROHRPOST_TEST_CONSOLE_KEY", SECRET_KEY)
    settings = make_settings(tenants=GLOBEX, console=console_config(), history_batch_wait="20ms")
    declare(settings)
    running = Pipeline(settings)
    yield running
    running.stop()


@pytest.fixture
def page(browser: Any, pipeline: Pipeline, tmp_path: Path) -> Iterator[Any]:
    """A fresh browser tab (no cookies); it fails the test if any dialog opens."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.tmp_dir = str(tmp_path)
    tab = context.new_page()
    dialogs: list[str] = []
    tab.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    tab.set_default_timeout(20_000)
    yield tab
    context.close()
    assert dialogs == [], f"a dialog opened: {dialogs}"


def log_in(page: Any, pipeline: Pipeline, role: str = "operator") -> None:
    page.goto(pipeline.console.url + "dead-letters")
    page.fill("input[name=user]", role)
    page.fill("input[name=password]", PASSWORDS[role])
    page.click("button:has-text('Log in')")
    page.wait_for_url(re.compile(r"/dead-letters"))


#: Tries at a screenshot before a browser hiccup counts as a failure.
_SCREENSHOT_ATTEMPTS = 3


def shoot(page: Any, name: str, at: str | None = None) -> None:
    """A screenshot (one viewport); into docs/ for the README with ROHRPOST_TEST_SCREENSHOTS=1."""
    if at is not None:
        page.locator(at).evaluate("element => element.scrollIntoView()")
    folder = DOCS if os.environ.get("ROHRPOST_TEST_SCREENSHOTS") else Path(page.context.tmp_dir)
    for attempt in range(_SCREENSHOT_ATTEMPTS):
        try:
            page.screenshot(path=str(folder / f"console-{name}.png"))
            break
        except playwright.Error as exc:
            # Headless Chromium on a loaded machine now and then answers "Unable to
            # capture screenshot" (its compositor missed a frame); the page is fine.
            if (
                "Unable to capture screenshot" not in str(exc)
                or attempt + 1 == _SCREENSHOT_ATTEMPTS
            ):
                raise
            page.wait_for_timeout(500)
    if at is not None:
        page.evaluate("window.scrollTo(0, 0)")


def submit(settings: Settings, mails: list[dict[str, Any]]) -> list[str]:
    with Producer(settings) as producer:
        return [str(i) for i in producer.submit_many(mails)]


INVOICE = {
    "subject": "Invoice {{ number }} for {{ name }}",
    "text": "Dear {{ name }},\n\nplease find invoice {{ number }} of {{ amount }} EUR.\n",
    "html": (
        '<div style="font-family: sans-serif; max-width: 36rem">'
        '<h2 style="color: #2450a6">Invoice {{ number }}</h2><p>Dear {{ name }},</p>'
        "<p>please find invoice <b>{{ number }}</b> of {{ amount }} EUR.</p>"
        '<p style="color: #777">Acme Billing</p></div>'
    ),
}


def test_the_overview_renews_its_figures_without_reloading_the_page(
    page: Any, pipeline: Pipeline, catcher: MailCatcher
) -> None:
    catcher.always("nobody@customer.example", "550 5.1.1 " + REJECTED)
    [dead] = submit(pipeline.settings, [mail("nobody@customer.example")])
    wait_until(lambda: pipeline.status(dead) == "dead_lettered")
    log_in(page, pipeline)
    page.click("header nav a:has-text('Overview')")
    page.wait_for_url(re.compile(r"/overview$"))
    sent = "#route-acme-billing td.sent_hour"
    assert page.inner_text(sent) == "0"
    assert page.inner_text("#route-acme-billing td.dead_lettered") == "1"
    assert page.inner_text("#route-globex-shop td.state") == "active"
    page.evaluate("window.notReloaded = true")  # gone if the whole page loads again
    ids = submit(pipeline.settings, [mail(f"r{i}@example.com") for i in range(3)])
    catcher.wait_for(lambda mails: len(mails) == 3)
    wait_until(lambda: all(pipeline.status(i) == "sent" for i in ids))
    page.wait_for_function(
        "selector => document.querySelector(selector).textContent.trim() === '3'",
        arg=sent,
        timeout=30_000,
    )
    assert page.evaluate("window.notReloaded") is True
    assert page.url.endswith("/overview")
    assert page.inner_text("#route-total td.sent_hour") == "3"
    shoot(page, "overview")
    page.click("#route-acme-billing td.dead_lettered a")
    page.wait_for_url(re.compile(r"/dead-letters\?tenant=acme&app=billing$"))
    assert "nobody@customer.example" in page.inner_text("table.list")


def test_a_rejected_mail_is_corrected_in_the_form_retried_sent_and_its_story_shown(
    page: Any, pipeline: Pipeline, catcher: MailCatcher, templates: Path
) -> None:
    write_template(templates, "invoice", **INVOICE)
    catcher.always("nobody@customer.example", "550 5.1.1 <nobody@customer.example>: " + REJECTED)
    invoice = {"template": "invoice", "data": {"number": 1042, "name": "Anna", "amount": "12.50"}}
    letter = {**mail("Nobody <nobody@customer.example>"), **invoice}
    del letter["subject"], letter["text"]
    [mail_id] = submit(pipeline.settings, [letter])
    wait_until(lambda: pipeline.status(mail_id) == "dead_lettered")
    log_in(page, pipeline)
    row = page.locator("tr", has_text="nobody@customer.example")
    assert "rejected" in row.inner_text()
    row.locator("a").first.click()
    page.wait_for_selector("text=Dead-letter headers")
    assert "no such user here" in page.inner_text("main")
    frame = page.frame_locator("iframe.preview")
    assert "Invoice 1042" in frame.locator("h2").inner_text()
    shoot(page, "dead-letter")
    page.click("a:has-text('Edit')")
    page.fill("#to", "anna(at)customer.example")
    page.click("button:has-text('Preview')")
    assert "not a valid e-mail address" in page.inner_text("#error-to")
    assert len(dead_letters_peek(pipeline)) == 1  # nothing moved
    page.fill("#to", "Anna <anna@customer.example>")
    page.click("button:has-text('Preview')")
    page.wait_for_selector("text=Changes")
    assert "anna@customer.example" in page.inner_text("table.diff")
    shoot(page, "edit", at="section.review")
    page.click("button:has-text('Save')")
    page.wait_for_selector(".flash")
    wait_until(lambda: "edited" in kinds(pipeline, mail_id))
    page.click("button:has-text('Retry')")
    page.wait_for_url(re.compile(rf"/mails/{mail_id}"))
    catcher.wait_for(lambda mails: len(mails) == 1)
    assert catcher.mails[0].recipients == ("anna@customer.example",)
    wait_until(lambda: pipeline.status(mail_id) == "sent")
    page.reload()
    timeline = page.inner_text("ol.timeline")
    order = [k for k in ("dead_lettered", "edited", "resubmitted", "sent") if k in timeline]
    assert order == ["dead_lettered", "edited", "resubmitted", "sent"]
    positions = [timeline.index(k) for k in order]
    assert positions == sorted(positions)
    edited = page.locator("li.event.edited")
    assert "by operator" in edited.inner_text() and "anna@customer.example" in edited.inner_text()
    assert "by operator" in page.locator("li.event.resubmitted").inner_text()
    shoot(page, "mail")


def kinds(pipeline: Pipeline, mail_id: str) -> list[str]:
    found = pipeline.store.mail(uuid.UUID(mail_id))
    return [e.kind for e in found.events] if found else []


def dead_letters_peek(pipeline: Pipeline) -> list[Any]:
    """The dead letters of acme/billing, read and put back."""
    from rohrpost.operations import DeadLetterQueue, OperatorSession

    with OperatorSession(pipeline.settings, "test") as session:
        return DeadLetterQueue(session).letters()


def test_a_tenant_paused_from_the_console_holds_its_mails_until_resumed(
    page: Any, pipeline: Pipeline, catcher: MailCatcher
) -> None:
    log_in(page, pipeline)
    page.goto(pipeline.console.url + "tenants")
    page.click("button:has-text('Pause tenant acme')")
    page.wait_for_selector(".flash:has-text('paused tenant acme')")
    held = submit(pipeline.settings, [mail(f"held{i}@example.com") for i in range(3)])
    [other] = submit(pipeline.settings, [mail("other@example.com", tenant="globex", app="shop")])
    wait_until(lambda: pipeline.status(other) == "sent")
    wait_until(lambda: all(pipeline.status(i) == "queued" for i in held))
    page.goto(pipeline.console.url + "mails?tenant=acme")
    assert page.locator("span.status.queued").count() == 3
    assert [m.recipients for m in catcher.mails] == [("other@example.com",)]
    page.goto(pipeline.console.url + "tenants")
    wait_until(lambda: _reloaded_shows(page, "#tenant-acme .status.paused"))
    shoot(page, "tenants")
    page.click("button:has-text('Resume tenant acme')")
    page.wait_for_selector(".flash:has-text('resumed tenant acme')")
    catcher.wait_for(lambda mails: len(mails) == 4)
    wait_until(lambda: all(pipeline.status(i) == "sent" for i in held))
    page.goto(pipeline.console.url + "mails?tenant=acme&status=sent")
    assert page.locator("span.status.sent").count() == 3


def _reloaded_shows(page: Any, selector: str) -> bool:
    page.reload()
    return bool(page.locator(selector).count())


def test_bulk_retry_of_a_filtered_set_of_500_retries_exactly_those(
    page: Any, pipeline: Pipeline, catcher: MailCatcher
) -> None:
    acme = [f"a{i}@customer.example" for i in range(500)]
    globex = [f"g{i}@customer.example" for i in range(30)]
    for address in acme:
        catcher.script(address, ["550 5.7.1 refused once"], stage="rcpt")
    for address in globex:
        catcher.always(address, "550 5.7.1 refused always")
    submit(pipeline.settings, [mail(a) for a in acme] + [mail(g, "globex", "shop") for g in globex])
    store = pipeline.store
    wait_until(
        lambda: len(store.list_mails(MailFilter(status="dead_lettered", limit=1000))) == 530, 120
    )
    log_in(page, pipeline)
    page.select_option("select[name=tenant]", "acme")
    page.select_option("select[name=reason]", "rejected")
    page.click("button:has-text('Filter')")
    shoot(page, "dead-letters")
    page.click("button:has-text('Retry all 500')")
    page.wait_for_selector("h1:has-text('Retry 500 dead letters?')")
    page.click("button:has-text('Retry 500')")
    page.wait_for_selector("#job .state:has-text('finished')", timeout=120_000)
    assert "re-submitted 500, skipped 0" in page.inner_text("#job")
    shoot(page, "bulk-retry")
    catcher.wait_for(lambda mails: len(mails) >= 500, timeout=120)
    received = sorted(r for m in catcher.mails for r in m.recipients)
    assert received == sorted(acme)
    topology = Topology.from_settings(pipeline.settings)
    assert len(dead_letters(pipeline.settings, "globex", "shop")) == 30
    assert topology.dead_queue("globex", "shop")


def test_hostile_input_is_shown_escaped_and_never_run(
    page: Any, pipeline: Pipeline, catcher: MailCatcher
) -> None:
    catcher.always("evil@customer.example", "550 5.1.1 <script>alert('reply')</script>")
    subject = "<script>alert('subject')</script><img src=x onerror=alert('img')>"
    name = '"<b onmouseover=alert(1)>Evil</b><script>alert(2)</script>"'
    [mail_id] = submit(
        pipeline.settings,
        [mail(f"{name} <evil@customer.example>", subject=subject, html=f"<p>{subject}</p>")],
    )
    wait_until(lambda: pipeline.status(mail_id) == "dead_lettered")
    log_in(page, pipeline)
    for path in ("dead-letters", f"dead-letters/{mail_id}", f"mails/{mail_id}", "mails"):
        page.goto(pipeline.console.url + path)
        page.wait_for_load_state("load")
        assert "<script>alert('subject')</script>" in page.inner_text("main"), path
        assert page.locator("main img[src=x]").count() == 0
    page.goto(pipeline.console.url + f"dead-letters/{mail_id}/edit?mode=raw")
    page.fill("#raw", '{"to": ["broken"')
    page.click("button:has-text('Preview')")
    assert "not JSON" in page.inner_text("#error-raw")
    traversal = page.goto(pipeline.console.url + "mails/..%2F..%2F..%2Fetc%2Fpasswd")
    assert traversal is not None and traversal.status == 404
    assert "root:" not in page.content()
    big = page.evaluate(
        """async (url) => (await fetch(url, {method: "POST", body: "raw=" + "x".repeat(20 << 20),
            headers: {"content-type": "application/x-www-form-urlencoded"}})).status""",
        pipeline.console.url + f"dead-letters/{mail_id}/edit",
    )
    assert big == 413
    assert len(dead_letters_peek(pipeline)) == 1
