"""Odd input to operator tools and submit: no traceback, no terminal escapes, the right place.

Dead letters of every odd kind are put straight into a dead-letter queue, as another
client (or a broken one) could leave them, beside good ones; the CLI is run as an
operator types it.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest
from pika import spec

from rohrpost.catcher import MailCatcher
from rohrpost.consumer.history import HistoryConsumer
from rohrpost.operations.browse import browse
from rohrpost.producer.client import Producer, SubmitManyError
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.container import (
    MAX_DATA_DEPTH,
    decode_container,
    encode_container,
    parse_container,
)
from rohrpost.shared.errors import ContainerError
from rohrpost.shared.events import EventKind, MailEvent
from rohrpost.shared.settings import Settings
from rohrpost.shared.store import HistoryStore
from rohrpost.shared.topology import Topology, queue_depths
from rohrpost.shared.wire import ATTEMPTS_HEADER, ERROR_HEADER, REASON_HEADER, mail_properties
from tests.conftest import (
    WorkerThread,
    dead_letters,
    publish_raw,
    rohrpost_command,
    write_config,
)
from tests.tcpproxy import TcpProxy

#: What must never reach an operator's terminal: C0 controls but tab and newline, DEL,
#: C1 controls, bidirectional overrides.
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x9b31m\u202e\x00"


def mail(**fields: Any) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "app": "billing",
        "to": ["anna@example.com"],
        "subject": "Invoice",
        "text": "x",
        **fields,
    }


def template_mail(**fields: Any) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "app": "billing",
        "to": ["anna@example.com"],
        "template": "t",
        **fields,
    }


def nested(levels: int, leaf: str = "1") -> str:
    return '{"a":' * levels + leaf + "}" * levels


@pytest.fixture
def config(settings: Settings, tmp_path: Path) -> Path:
    return write_config(settings, tmp_path / "rohrpost.toml")


def cli(config: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        rohrpost_command(config, *argv),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        encoding="utf-8",
        errors="surrogateescape",
        env={**os.environ, **env},
    )


def assert_clean(result: subprocess.CompletedProcess[str], *codes: int) -> None:
    """Exited with one of ``codes``; no traceback; nothing that could steer a terminal."""
    assert result.returncode in codes, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for stream in (result.stdout, result.stderr):
        found = RAW_CONTROL.search(stream)
        assert found is None, f"raw {found.group()!r} in output: {stream[:300]!r}"


# --- odd dead letters, as other clients could leave them -------------------------------------


def _shortstr(value: bytes) -> bytes:
    return bytes([len(value)]) + value


def _entry(key: bytes, kind: bytes, payload: bytes) -> bytes:
    return _shortstr(key) + kind + payload


def _longstr(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _nested_table(levels: int) -> bytes:
    inner = b""
    for _ in range(levels):
        inner = _entry(b"a", b"F", _longstr(inner))
    return inner


class RawProperties(pika.BasicProperties):  # type: ignore[misc]
    """Properties encoded byte by byte: header tables and ids pika itself would not write."""

    def __init__(self, table: bytes, message_id: bytes | None) -> None:
        super().__init__()
        self._table, self.raw_id = table, message_id

    def encode(self) -> list[bytes]:
        flags = spec.BasicProperties.FLAG_HEADERS | spec.BasicProperties.FLAG_DELIVERY_MODE
        parts = [b"", _longstr(self._table), bytes([2])]
        if self.raw_id is not None:
            flags |= spec.BasicProperties.FLAG_MESSAGE_ID
            parts.append(_shortstr(self.raw_id))
        parts[0] = struct.pack(">H", flags)
        return parts


ODD_HEADERS = b"".join(
    [
        _entry(b"x-nested", b"F", _longstr(_nested_table(3000))),  # pika: RecursionError
        _entry(b"x-rohrpost-dead-at", b"T", struct.pack(">Q", 2**63)),  # beyond year 9999
        _entry(b"x-rohrpost-reason", b"S", _longstr(b"\xff\xfe" + ESCAPES.encode())),
        _entry(b"x-rohrpost-error", b"S", _longstr(("E" + ESCAPES).encode() * 2500)),
        _entry(b"x-rohrpost-attempts", b"S", _longstr(b"three")),
        _entry(b"x-rohrpost-round", b"l", struct.pack(">q", 2**63 - 1)),
        _entry(b"\xff-key\x1b[1m", b"S", _longstr(b"odd key")),
    ]
)


def _props(mail_id: str | None = None, **headers: Any) -> pika.BasicProperties:
    return mail_properties(
        mail_id or str(uuid.uuid4()),
        headers={REASON_HEADER: "invalid", ATTEMPTS_HEADER: 1, **headers},
    )


def _container_body(**fields: Any) -> tuple[str, bytes]:
    container = parse_container(mail(**fields))
    return str(container.id), encode_container(container)


def odd_letters() -> dict[str, tuple[bytes, Any, str | None]]:
    """name → (body, properties, the UUID it can be shown by, if any)."""
    letters: dict[str, tuple[bytes, Any]] = {
        "binary": (b"\x00\xff\xfe" + ESCAPES.encode() + bytes(range(256)), _props()),
        "invalid UTF-8": (b'{"subject": "\xff\xfe\x1b[31m"}', _props()),
        "huge": (HUGE, _props()),
        "nested array": (b"[" * 100_000 + b"]" * 100_000, _props()),
        "nested data": (
            (json.dumps(template_mail())[:-1] + ', "data": ' + nested(100_000) + "}").encode(),
            _props(),
        ),
        "nested 70 levels": (
            (json.dumps(template_mail())[:-1] + ', "data": ' + nested(70) + "}").encode(),
            _props(),
        ),
        "JSON string": (json.dumps(ESCAPES).encode(), _props()),
        "JSON array": (b'[1, "\\u001b[31m", {"a": 2}]', _props()),
        "JSON null": (b"null", _props()),
        "empty": (b"", _props()),
        "unknown fields": (
            json.dumps({**mail(), "evil": ESCAPES, "to": ["x\u202e@example.com"]}).encode(),
            _props(**{ERROR_HEADER: "evil: Extra inputs are not permitted" + ESCAPES}),
        ),
        "odd fields": (json.dumps(mail(to="anna", subject={"a": [1]})).encode(), _props()),
        "no message id": (_container_body()[1], mail_properties(None)),
        "non-UUID id": (b"{}", mail_properties(f"not-a-uuid{ESCAPES}")),
        "id not UTF-8": (b"{}", RawProperties(b"", b"\xff\xfe\x1b[31m")),
    }
    mail_id, body = _container_body(subject="odd headers, good body")
    letters["odd headers"] = (body, RawProperties(ODD_HEADERS, mail_id.encode()))
    letters["odd headers, binary body"] = (
        b"\x1b[2J",
        RawProperties(ODD_HEADERS, str(uuid.uuid4()).encode()),
    )
    return {name: (body, props, _uuid_of(props)) for name, (body, props) in letters.items()}


def _uuid_of(properties: Any) -> str | None:
    raw = getattr(properties, "raw_id", None) or properties.message_id
    try:
        return str(uuid.UUID(raw.decode() if isinstance(raw, bytes) else raw))
    except (TypeError, ValueError):
        return None


HUGE_UNIT = b"x" + ESCAPES.encode()
HUGE = HUGE_UNIT * (15_000_000 // len(HUGE_UNIT))
ODD = odd_letters()


def put_dead(settings: Settings, body: bytes, properties: Any) -> None:
    publish_raw(settings, "acme.billing", body, f"{settings.namespace}.dead", properties)


def good_dead_letter(settings: Settings) -> str:
    mail_id, body = _container_body(subject="a good one")
    put_dead(settings, body, _props(mail_id, **{REASON_HEADER: "max_attempts"}))
    return mail_id


@pytest.fixture
def odd_queue(settings: Settings) -> tuple[list[str], dict[str, str | None]]:
    """Every odd kind in acme/billing's dead-letter queue, between good dead letters."""
    good = [good_dead_letter(settings)]
    odd: dict[str, str | None] = {}
    for name, (body, properties, mail_id) in ODD.items():
        put_dead(settings, body, properties)
        odd[name] = mail_id
    good.append(good_dead_letter(settings))
    return good, odd


def queue_ids(settings: Settings, queue: str) -> list[str]:
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        ids = []
        while (got := channel.basic_get(queue, auto_ack=False))[0] is not None:
            ids.append(got[1].message_id)
        return ids


def test_a_browse_waits_for_a_big_dead_letter_that_arrives_slowly(settings: Settings) -> None:
    """A browse takes a queue as read after a quiet spell; a 1 MB dead letter that takes
    seconds to arrive (a busy broker, a slow link) is not quiet: its bytes keep coming."""
    mail_id, body = _container_body(subject="big", text="x" * 1_000_000)
    put_dead(settings, body, _props(mail_id, **{REASON_HEADER: "max_attempts"}))
    queue = Topology.from_settings(settings).dead_queue("acme", "billing")
    url = urlsplit(settings.broker_url.get_secret_value())
    # ~16 chunks of 64 KiB, 0.15 s apart: over 2 s without a whole message
    with TcpProxy(url.hostname or "127.0.0.1", url.port or 5672, chunk_pause=0.15) as proxy:
        slow = url._replace(netloc=f"{url.netloc.rpartition('@')[0]}@127.0.0.1:{proxy.port}")
        with browse(urlunsplit(slow), [queue]) as session:
            assert [m.properties.message_id for m in session.messages] == [mail_id]


def test_dlq_list_says_when_another_reader_holds_dead_letters(
    settings: Settings, config: Path
) -> None:
    good_dead_letter(settings)
    queue = Topology.from_settings(settings).dead_queue("acme", "billing")
    with browse(settings.broker_url.get_secret_value(), [queue]) as other:
        assert len(other.messages) == 1
        result = cli(config, "dlq", "list")
    assert_clean(result, 0)
    assert "(0 dead letters)" in result.stderr
    assert "another reader holds messages of the queue; they are not shown" in result.stderr


# --- point 6: every operator command shows what it can of any dead letter ----------------


def test_dlq_list_shows_every_odd_dead_letter_beside_the_good_ones(
    config: Path, odd_queue: tuple[list[str], dict[str, str | None]]
) -> None:
    good, odd = odd_queue
    result = cli(config, "dlq", "list")
    assert_clean(result, 0)
    assert f"({len(good) + len(odd)} dead letters)" in result.stderr
    for mail_id in [*good, *(i for i in odd.values() if i and "\x1b" not in i)]:
        assert mail_id in result.stdout
    assert "not a mail container: its JSON nests too deeply to read" in result.stdout
    assert "not-a-uuid\\x1b[2J" in result.stdout, "an odd id is shown escaped"
    assert max(len(line) for line in result.stdout.splitlines()) < 250, "rows stay rows"


def test_dlq_list_json_is_valid_bounded_json_for_every_odd_dead_letter(
    config: Path, odd_queue: tuple[list[str], dict[str, str | None]]
) -> None:
    good, odd = odd_queue
    result = cli(config, "dlq", "list", "--json")
    assert_clean(result, 0)
    listed = json.loads(result.stdout)
    assert len(listed) == len(good) + len(odd)
    by_id = {entry["id"]: entry for entry in listed}
    assert set(good) <= set(by_id)
    assert by_id[odd["binary"]]["problem"] == "it is not UTF-8 text"
    assert by_id[odd["JSON array"]]["problem"] == "it is an array, not a JSON object"
    assert by_id[odd["odd fields"]]["recipients"] == ["anna"]
    odd_headers = by_id[odd["odd headers"]]
    assert odd_headers["reason"].startswith("\\xff\\xfe\x1b[2J"), "kept, escaped by JSON"
    assert odd_headers["attempts"] is None and odd_headers["dead_at"] is None
    assert "more characters]" in odd_headers["error"], "a 100 KB header is cut with a note"
    assert len(result.stdout) < 200_000


@pytest.mark.parametrize("kind", [name for name, (_, _, mail_id) in ODD.items() if mail_id])
def test_dlq_show_shows_what_it_can_of_an_odd_dead_letter(
    config: Path, odd_queue: tuple[list[str], dict[str, str | None]], kind: str
) -> None:
    _, odd = odd_queue
    mail_id = odd[kind]
    assert mail_id is not None
    shown = cli(config, "dlq", "show", mail_id)
    assert_clean(shown, 0)
    assert mail_id in shown.stdout
    assert len(shown.stdout) < 100_000, "huge content is cut"
    as_json = cli(config, "dlq", "show", mail_id, "--json")
    assert_clean(as_json, 0)
    assert json.loads(as_json.stdout)["id"] == mail_id


def test_dlq_show_cuts_huge_content_with_a_note(
    config: Path, odd_queue: tuple[list[str], dict[str, str | None]]
) -> None:
    _, odd = odd_queue
    shown = cli(config, "dlq", "show", str(odd["huge"]))
    assert_clean(shown, 0)
    assert f"… [{len(HUGE):,} bytes in all]" in shown.stdout
    assert "x\\x1b[2J\\x1b]0;pwned\\x07" in shown.stdout, "escapes are shown, not obeyed"


def test_dlq_show_explains_why_a_dead_letter_is_not_a_container(
    config: Path, odd_queue: tuple[list[str], dict[str, str | None]]
) -> None:
    _, odd = odd_queue
    shown = cli(config, "dlq", "show", str(odd["nested data"]))
    assert_clean(shown, 0)
    assert "problem     its JSON nests too deeply to read" in shown.stdout
    assert 'body\n{"tenant": "acme"' in shown.stdout, "the start of the body is shown"


def test_dlq_retry_all_resubmits_the_good_and_skips_the_odd_with_reasons(
    settings: Settings, config: Path, odd_queue: tuple[list[str], dict[str, str | None]]
) -> None:
    good, odd = odd_queue
    topology = Topology.from_settings(settings)
    result = cli(config, "dlq", "retry", "--all")
    assert_clean(result, 1)
    sent = queue_ids(settings, topology.send_queue("acme", "billing"))
    assert set(good) <= set(sent)
    assert odd["odd headers"] in sent, "odd headers with a good container are retried"
    skipped = {
        line.split(": ", 1)[0].removeprefix("skipped "): line.split(": ", 1)[1]
        for line in result.stderr.splitlines()
        if line.startswith("skipped ")
    }
    assert skipped[str(odd["binary"])] == "not a mail container: it is not UTF-8 text"
    assert skipped[str(odd["nested data"])].startswith("not a mail container: its JSON nests")
    assert skipped[str(odd["nested 70 levels"])].startswith("data: nested deeper than 64")
    assert "evil: Extra inputs are not permitted" in skipped[str(odd["unknown fields"])]
    assert any(key.startswith("not-a-uuid\\x1b[2J") for key in skipped)
    left = queue_ids(settings, topology.dead_queue("acme", "billing"))
    assert not set(good) & set(left), "nothing retried stays behind"
    assert odd["binary"] in left, "nothing skipped is lost"


def test_dlq_purge_removes_every_dead_letter_whatever_it_holds(
    settings: Settings, config: Path, odd_queue: tuple[list[str], dict[str, str | None]]
) -> None:
    good, odd = odd_queue
    result = cli(config, "dlq", "purge", "--yes")
    assert_clean(result, 0)
    assert f"purged {len(good) + len(odd)} dead letters" in result.stdout
    assert dead_letters(settings) == []


def test_dlq_purge_by_id_removes_just_that_odd_dead_letter(
    settings: Settings, config: Path, odd_queue: tuple[list[str], dict[str, str | None]]
) -> None:
    good, odd = odd_queue
    result = cli(config, "dlq", "purge", str(odd["nested array"]), str(odd["huge"]), "--yes")
    assert_clean(result, 0)
    assert "purged 2 dead letters" in result.stdout
    left = queue_ids(settings, Topology.from_settings(settings).dead_queue("acme", "billing"))
    assert len(left) == len(good) + len(odd) - 2 and odd["huge"] not in left


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("binary", "it is not UTF-8 text"),
        ("nested array", "its JSON nests too deeply to read"),
        ("JSON string", "it is a string, not a JSON object"),
        ("empty", "it is not JSON"),
    ],
)
def test_dlq_edit_of_a_non_container_says_why_and_changes_nothing(
    settings: Settings,
    config: Path,
    odd_queue: tuple[list[str], dict[str, str | None]],
    kind: str,
    why: str,
) -> None:
    good, odd = odd_queue
    result = cli(config, "dlq", "edit", str(odd[kind]), "--set", "subject=Fixed")
    assert_clean(result, 1)
    assert f"is not a mail container: {why}" in result.stderr and "--editor" in result.stderr
    left = queue_ids(settings, Topology.from_settings(settings).dead_queue("acme", "billing"))
    assert len(left) == len(good) + len(odd)


@pytest.mark.parametrize("kind", ["binary", "nested array", "JSON null"])
def test_a_non_container_is_replaced_whole_with_the_editor_and_then_retried(
    settings: Settings,
    config: Path,
    tmp_path: Path,
    odd_queue: tuple[list[str], dict[str, str | None]],
    kind: str,
) -> None:
    _, odd = odd_queue
    mail_id = str(odd[kind])
    editor = tmp_path / "editor.py"
    replacement = json.dumps({**mail(subject="Rewritten"), "id": mail_id})
    editor.write_text(f"import sys\nopen(sys.argv[1], 'w').write({replacement!r})\n")
    edited = cli(config, "dlq", "edit", mail_id, "--editor", EDITOR=f"{sys.executable} {editor}")
    assert_clean(edited, 0)
    retried = cli(config, "dlq", "retry", mail_id)
    assert_clean(retried, 0)
    sent = queue_ids(settings, Topology.from_settings(settings).send_queue("acme", "billing"))
    assert sent == [mail_id]


def test_dlq_edit_of_an_odd_container_names_the_field(
    config: Path, odd_queue: tuple[list[str], dict[str, str | None]]
) -> None:
    _, odd = odd_queue
    result = cli(config, "dlq", "edit", str(odd["odd fields"]), "--set", "cc=b@example.com")
    assert_clean(result, 1)
    assert "to: " in result.stderr and "subject: " in result.stderr


def test_a_worker_sends_a_mail_whose_headers_pika_cannot_decode_and_keeps_running(
    settings: Settings, catcher: MailCatcher, worker_thread: Callable[..., WorkerThread]
) -> None:
    handle = worker_thread(settings)
    mail_id, body = _container_body(subject="odd headers")
    send_queue = Topology.from_settings(settings).send_queue("acme", "billing")
    publish_raw(settings, send_queue, body, "", RawProperties(ODD_HEADERS, mail_id.encode()))
    with Producer(settings) as producer:
        producer.submit(mail(subject="after it"))
    catcher.wait_for(lambda mails: len(mails) == 2)
    handle.stop()
    assert sorted(m.parsed()["Subject"] for m in catcher.mails) == ["after it", "odd headers"]


def test_dlq_list_without_the_topology_says_how_to_declare_it(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    config = write_config(make_settings(), tmp_path / "rohrpost.toml")  # nothing declared
    result = cli(config, "dlq", "list")
    assert_clean(result, 1)
    assert "does not exist (run `rohrpost topology declare`)" in result.stderr


def test_an_unexpected_error_is_one_escaped_line_not_a_traceback() -> None:
    code = (
        "import sys, rohrpost.cli as c\n"
        "@c.cli.command()\n"
        "def boom() -> None:\n"
        "    raise RuntimeError('broken \\x1b[31m')\n"
        "sys.argv[1:] = ['boom']\n"
        "c.main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert_clean(result, 1)
    assert result.stderr.startswith("error: unexpected RuntimeError: broken \\x1b[31m (a bug")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "argument"),
    [
        (["dlq", "show", "not-a-uuid\x1b[31m"], "MAIL_ID"),
        (["dlq", "edit", "xyz", "--set", "subject=x"], "MAIL_ID"),
        (["dlq", "retry", "123"], "[MAIL_IDS]"),
        (["dlq", "purge", "zz", "--yes"], "[MAIL_IDS]"),
        (["cancel", "nope"], "MAIL_IDS"),
        (["history", "show", "6c0"], "MAIL_ID"),
        (["history", "resend", "--actor", "x", "1-2-3"], "MAIL_ID"),
    ],
)
def test_a_bad_id_argument_is_a_usage_error_naming_it(
    config: Path, argv: list[str], argument: str
) -> None:
    # (a unique prefix of 4 hex digits or more is an id: tests/test_mail_actions.py)
    result = cli(config, *argv)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: invalid value for '{argument}")
    assert "is not a mail id" in result.stderr or "is too short" in result.stderr
    assert "Traceback" not in result.stderr and "\x1b[" not in result.stderr


@pytest.mark.parametrize("assignment", ["subject", "=x"])
def test_a_set_without_path_and_value_is_a_usage_error(config: Path, assignment: str) -> None:
    result = cli(config, "dlq", "edit", "abcd", "--set", assignment)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(
        f"error: invalid value for --set: {assignment!r}: write PATH=VALUE"
    )


@pytest.mark.parametrize("command", ["list", "retry", "purge"])
def test_a_misspelt_dead_letter_reason_is_a_usage_error_not_an_empty_match(
    config: Path, command: str
) -> None:
    extra = {"list": [], "retry": ["--all", "--dry-run"], "purge": ["--yes"]}[command]
    result = cli(config, "dlq", command, "--reason", "max-attempts", *extra)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: invalid value for '--reason': 'max-attempts' is not")
    assert "max_attempts" in result.stderr


def test_history_commands_escape_what_the_history_holds(
    settings: Settings, config: Path, tmp_path: Path
) -> None:
    mail_id = uuid.uuid4()
    common: dict[str, Any] = {"mail_id": mail_id, "tenant": "acme", "app": "billing"}
    for event in (
        MailEvent(kind=EventKind.SUBMITTED, **common),
        MailEvent(
            kind=EventKind.ATTEMPT_FAILED, attempt=1, error=f"421 {ESCAPES}\nline 2", **common
        ),
        MailEvent(
            kind=EventKind.SENT,
            attempt=2,
            subject=f"Hi {ESCAPES}",
            smtp_reply=f"250 {ESCAPES}",
            at=datetime.now(UTC),
            **common,
        ),
    ):
        publish_raw(
            settings,
            event.routing_key,
            event.model_dump_json().encode(),
            f"{settings.namespace}.events",
            event.properties(),
        )
    store = HistoryStore.open(settings.store_url.get_secret_value(), migrate_schema=True)
    HistoryConsumer(settings, store).run(drain=True)
    store.close()
    for argv in (["history", "list"], ["history", "show", str(mail_id)]):
        result = cli(config, *argv)
        assert_clean(result, 0)
        assert "\\x1b[2J" in result.stdout
    as_json = cli(config, "history", "show", str(mail_id), "--json")
    assert_clean(as_json, 0)
    # NUL is stored as U+FFFD (no store column holds NUL); the rest as it came
    stored = f"Hi {ESCAPES}".replace("\x00", "\ufffd")
    assert json.loads(as_json.stdout)["mail"]["subject"] == stored


# --- point 7: submit errors point to the right place ----------------------------------------


GOOD_LINE = json.dumps(mail())


def nothing_queued(settings: Settings) -> bool:
    queue = Topology.from_settings(settings).send_queue("acme", "billing")
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        return queue_depths(channel, [queue])[queue] == 0


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([GOOD_LINE, GOOD_LINE, '{"tenant": oops}'], "line 3: not JSON: Expecting value (column"),
        ([GOOD_LINE, "", GOOD_LINE, GOOD_LINE[:-1]], "line 4: not JSON: "),
        ([GOOD_LINE, GOOD_LINE + " trailing"], "line 2: not JSON: Extra data"),
        (["", "", "42"], "line 3: a mail must be a JSON object, not a number"),
        ([json.dumps(mail(subject="a\u2028b"), ensure_ascii=False), "{"], "line 2: not JSON"),
    ],
)
def test_a_json_error_in_a_json_lines_file_names_its_line(
    settings: Settings, config: Path, tmp_path: Path, lines: list[str], message: str
) -> None:
    path = tmp_path / "mails.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = cli(config, "submit", "--file", str(path))
    assert_clean(result, 1)
    assert f"{path} {message}" in result.stderr
    assert result.stdout == ""
    assert nothing_queued(settings)


@pytest.mark.parametrize(
    "case",
    [
        (mail(to=["broken"]), 2, "to.0: "),
        (mail(evil=True), 2, "evil: Extra inputs are not permitted"),
        (mail(subject=None), 3, "container: subject is required"),
        (mail(tenant="globex"), 3, "tenant/app globex/billing is not configured"),
    ],
)
def test_an_invalid_mail_in_a_json_lines_file_names_its_line_and_field(
    settings: Settings, config: Path, tmp_path: Path, case: tuple[dict[str, Any], int, str]
) -> None:
    bad, line, field = case
    lines = [GOOD_LINE] * (line - 1) + [json.dumps(bad), GOOD_LINE]
    path = tmp_path / "mails.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = cli(config, "submit", "--file", str(path))
    assert_clean(result, 1)
    assert f"{path} line {line}: {field}" in result.stderr
    assert nothing_queued(settings), "nothing of the bad mail's chunk was published"


def test_infinity_in_data_read_from_a_file_names_the_field(
    settings: Settings, config: Path, tmp_path: Path
) -> None:
    path = tmp_path / "mails.jsonl"
    path.write_text(
        GOOD_LINE + '\n{"tenant": "acme", "app": "billing", "to": ["a@example.com"], '
        '"template": "t", "data": {"at": [1, {"b": Infinity}]}}\n'
    )
    result = cli(config, "submit", "--file", str(path))
    assert_clean(result, 1)
    assert f"{path} line 2: data.at.1.b: inf is not a JSON number" in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"[\n{GOOD_LINE},\n{json.dumps(mail(to=['x']))}\n]", "mail #2 (line 3): to.0: "),
        (f"[{GOOD_LINE},\n\n  42]", "mail #2 (line 3): a mail must be a JSON object"),
        (f'[\n  {GOOD_LINE},\n  {GOOD_LINE},\n  {{"a": }}\n]', "line 4: not JSON: Expecting value"),
        (f"[{json.dumps(mail(evil=1))}, {GOOD_LINE}]", "mail #1 (line 1): evil: "),
        (f"[{GOOD_LINE}]\n[]", "line 2: not JSON: unexpected text after the array"),
    ],
)
def test_a_json_array_file_names_the_mail_from_1_and_its_line(
    settings: Settings, config: Path, tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "mails.json"
    path.write_text(text)
    result = cli(config, "submit", "--file", str(path))
    assert_clean(result, 1)
    assert f"{path} {message}" in result.stderr
    assert nothing_queued(settings)


def test_a_file_that_is_not_utf8_names_the_line(config: Path, tmp_path: Path) -> None:
    path = tmp_path / "mails.jsonl"
    path.write_bytes(f"{GOOD_LINE}\n{GOOD_LINE}\n".encode() + b'{"subject": "\xff"}\n')
    result = cli(config, "submit", "--file", str(path))
    assert_clean(result, 1)
    assert f"{path} line 3: not UTF-8 text" in result.stderr


@pytest.mark.parametrize("levels", [MAX_DATA_DEPTH + 1, 500, 10_000, 100_000])
def test_deeply_nested_data_in_a_file_is_refused_naming_data_and_the_limit(
    settings: Settings, config: Path, tmp_path: Path, levels: int
) -> None:
    deep = json.dumps(template_mail())[:-1]
    path = tmp_path / "mails.jsonl"
    path.write_text(f'{GOOD_LINE}\n{deep}, "data": {nested(levels)}}}\n')
    result = cli(config, "submit", "--file", str(path))
    assert_clean(result, 1)
    assert f"{path} line 2: data: nested deeper than {MAX_DATA_DEPTH} levels" in result.stderr
    assert nothing_queued(settings)


@pytest.mark.parametrize("levels", [MAX_DATA_DEPTH + 1, 10_000])
def test_deeply_nested_data_flag_is_refused_naming_data(config: Path, levels: int) -> None:
    result = cli(
        config,
        *("submit", "--tenant", "acme", "--app", "billing", "--to", "a@example.com"),
        *("--template", "t", "--data", nested(levels)),
    )
    assert_clean(result, 1, 2)
    assert (
        "data" in result.stderr and f"nested deeper than {MAX_DATA_DEPTH} levels" in result.stderr
    )


def test_ids_confirmed_before_a_bad_mail_are_printed(
    settings: Settings, config: Path, tmp_path: Path
) -> None:
    # a file larger than one validation chunk: the first chunk is confirmed before the refusal
    lines = [json.dumps(mail(to=[f"r{i}@example.com"])) for i in range(2001)]
    lines.append(json.dumps(mail(to=["broken"])))
    path = tmp_path / "mails.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = cli(config, "submit", "--file", str(path))
    assert_clean(result, 1)
    assert f"{path} line 2002: to.0: " in result.stderr
    assert len(result.stdout.split()) == 2000


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize("levels", [MAX_DATA_DEPTH + 1, 300, 10_000, 100_000])
def test_deeply_nested_data_is_a_container_error_naming_data_and_the_limit(levels: int) -> None:
    with pytest.raises(ContainerError, match=rf"^data: nested deeper than {MAX_DATA_DEPTH} levels"):
        parse_container(template_mail(data=_deep(levels)))


def test_data_nested_to_the_limit_is_accepted_and_round_trips() -> None:
    container = parse_container(template_mail(data=_deep(MAX_DATA_DEPTH)))
    assert decode_container(encode_container(container)) == container


@pytest.mark.parametrize("levels", [MAX_DATA_DEPTH + 1, 150, 300, 10_000])
def test_deeply_nested_data_on_the_wire_is_a_container_error_naming_data(levels: int) -> None:
    body = json.dumps(template_mail())[:-1]
    with pytest.raises(ContainerError, match=rf"^data: nested deeper than {MAX_DATA_DEPTH}"):
        decode_container(f'{body}, "data": {nested(levels)}}}'.encode())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"when": datetime.now(UTC)}, "data.when: datetime is not a JSON type"),
        ({"tags": {"a", "b"}}, "data.tags: set is not a JSON type"),
        ({"blob": b"\x00\xff"}, "data.blob: bytes is not a JSON type"),
        ({"n": float("nan")}, "data.n: nan is not a JSON number"),
        ({"n": float("-inf")}, "data.n: -inf is not a JSON number"),
        ({"big": 2**64}, "data.big: an integer beyond 64 bits"),
        ({"obj": object()}, "data.obj: object is not a JSON type"),
        ({"items": [{"at": 1j}]}, "data.items.0.at: complex is not a JSON type"),
        ({"map": {1: "one"}}, "data.map: the key 1 is not a string"),
    ],
)
def test_values_json_cannot_carry_are_container_errors_naming_the_field(
    data: dict[str, Any], message: str
) -> None:
    with pytest.raises(ContainerError, match=re.escape(message)):
        parse_container(template_mail(data=data))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"subject": datetime.now(UTC)}, "subject: Input should be a valid string"),
        ({"to": [b"\xff"]}, "to.0: Input should be a valid string"),
        ({"text": b"\xff\xfe"}, "text: Input should be a valid string"),
        ({"headers": {"X-Note": object()}}, "headers.X-Note: Input should be a valid string"),
        ({"max_attempts": 2**70}, "max_attempts: Input should be less than or equal to 100"),
        ({"not_before": float("nan")}, "not_before: Input should be a valid datetime"),
        ({"id": 2**200}, "id: UUID input should be"),
    ],
)
def test_odd_python_values_in_other_fields_are_container_errors_naming_the_field(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ContainerError, match=re.escape(message)):
        encode_container(parse_container(mail(**fields)))


def test_the_producer_refuses_unserialisable_data_before_publishing(settings: Settings) -> None:
    with Producer(settings) as producer:
        with pytest.raises(ContainerError, match=r"data\.when: datetime"):
            producer.submit(template_mail(data={"when": datetime.now(UTC)}))
        with pytest.raises(ContainerError, match=r"^data: nested deeper"):
            producer.submit(template_mail(data=_deep(10_000)))
    assert nothing_queued(settings)


@pytest.mark.parametrize(("bad_at", "position"), [(0, 1), (3, 4)])
def test_submit_many_counts_positions_from_1(
    settings: Settings, bad_at: int, position: int
) -> None:
    mails = [mail() for _ in range(5)]
    mails[bad_at] = template_mail(data={"x": datetime.now(UTC)})
    with Producer(settings) as producer, pytest.raises(SubmitManyError) as error:
        producer.submit_many(mails, window=4)
    assert str(error.value).startswith(f"mail #{position}: data.x: datetime")
    assert error.value.position == position
    assert error.value.reason is not None and error.value.reason.startswith("data.x: ")
