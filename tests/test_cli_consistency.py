"""The command line behaves the same everywhere: confirmations, errors, JSON, help, words."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import pytest

from rohrpost.cli import cli as rohrpost_cli
from rohrpost.producer.client import Producer
from rohrpost.shared.settings import Settings
from tests.conftest import drain, rohrpost_command, write_config
from tests.test_operators import archive, cli, fill_dead_letters, mail


@pytest.fixture
def config(settings: Settings, tmp_path: Path) -> Path:
    return write_config(settings, tmp_path / "rohrpost.toml")


def in_terminal(argv: list[str], answer: str, timeout: float = 60) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal, answer its question; (exit status, what it showed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, as an operator runs it in a terminal
        os.execv(argv[0], argv)
    shown, answered = b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # the child closed the terminal: it is done
                    break
                if not chunk:
                    break
                shown += chunk
            if not answered and b"[y/N]" in shown:
                os.write(fd, answer.encode() + b"\n")
                answered = True
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def sent_mail(settings: Settings) -> str:
    with Producer(settings) as producer:
        mail_id = str(
            producer.submit(mail("Anna Schmidt <Anna@Example.com>", cc=["bob@example.com"]))
        )
    drain(settings)
    archive(settings).close()
    return mail_id


# -- confirmations ------------------------------------------------------------------------

DESTRUCTIVE = [
    (["history", "purge", "--older-than", "0s"], "this deletes every finished mail"),
    (["dlq", "purge", "--tenant", "acme"], "this deletes every dead letter matching --tenant acme"),
    (["dlq", "purge", "abcd"], "this deletes the dead letter abcd for good"),
    (["topology", "delete"], "this deletes every queue and exchange of namespace"),
]


def test_without_a_terminal_destructive_commands_need_yes(settings: Settings, config: Path) -> None:
    fill_dead_letters(settings, "acme", "billing", 1)
    archive(settings).close()
    for argv, what in DESTRUCTIVE:
        result = cli(config, *argv, check=False)
        assert result.returncode == 2, argv
        assert result.stderr.startswith(f"error: {what}")
        assert ": pass --yes to confirm (there is no terminal to ask)" in result.stderr
    assert len(json.loads(cli(config, "dlq", "list", "--json").stdout)) == 1, "nothing deleted"


def test_on_a_terminal_destructive_commands_ask_and_a_no_changes_nothing(
    settings: Settings, config: Path
) -> None:
    sent_mail(settings)
    fill_dead_letters(settings, "acme", "billing", 1)
    for argv, what in DESTRUCTIVE:
        status, shown = in_terminal(rohrpost_command(config, *argv), "n")
        assert status == 1, shown
        assert what[:1].upper() + what[1:] in shown and "Go on? [y/N]" in shown
        assert "error: not confirmed; nothing was changed" in shown
    assert len(json.loads(cli(config, "dlq", "list", "--json").stdout)) == 1
    assert len(json.loads(cli(config, "history", "list", "--json").stdout)) == 1


def test_on_a_terminal_a_yes_deletes(settings: Settings, config: Path) -> None:
    sent_mail(settings)
    status, shown = in_terminal(
        rohrpost_command(config, "history", "purge", "--older-than", "0s"), "y"
    )
    assert status == 0, shown
    assert "purged 1 mail last changed before" in shown
    assert json.loads(cli(config, "history", "list", "--json").stdout) == []


# -- errors -----------------------------------------------------------------------------


def test_every_error_is_one_line_beginning_error(config: Path) -> None:
    for argv, code in (
        (["history", "list", "--limit", "0"], 2),  # click: a bad value
        (["history", "show"], 2),  # click: a missing argument
        (["pause", "initech"], 1),  # rohrpost: refused
        (["history", "show", "00000000-0000-4000-8000-000000000000"], 1),
        (["dlq", "show", "00000000-0000-4000-8000-000000000000"], 1),
        (["submit", "--tenant", "acme"], 2),
    ):
        result = cli(config, *argv, check=False)
        assert result.returncode == code, argv
        assert result.stderr.startswith("error: "), argv
        assert result.stderr.count("\n") == 1, result.stderr
        assert "Error:" not in result.stderr and "Usage:" not in result.stderr


def test_a_usage_error_says_where_the_help_is(config: Path) -> None:
    result = cli(config, "history", "list", "--colour", check=False)
    assert result.stderr.startswith("error: no such option")
    assert result.stderr.endswith("--colour' (see `python -m rohrpost history list --help`)\n")


# -- JSON and the history ---------------------------------------------------------------------


def test_recipients_are_a_list_in_every_json_output(settings: Settings, config: Path) -> None:
    mail_id = sent_mail(settings)
    [dead] = fill_dead_letters(settings, "acme", "billing", 1)
    want = ["Anna Schmidt <Anna@Example.com>", "bob@example.com"]
    assert json.loads(cli(config, "history", "list", "--json").stdout)[0]["recipients"] == want
    shown = json.loads(cli(config, "history", "show", mail_id, "--json").stdout)
    assert shown["mail"]["recipients"] == want
    assert json.loads(cli(config, "dlq", "list", "--json").stdout)[0]["recipients"] == [
        "r0@example.com"
    ]
    assert json.loads(cli(config, "dlq", "show", dead, "--json").stdout)["recipients"] == [
        "r0@example.com"
    ]


def test_to_finds_a_recipient_however_the_address_is_written(
    settings: Settings, config: Path
) -> None:
    mail_id = sent_mail(settings)
    for to in ("anna@example.com", "Anna@Example.COM", "Anna Schmidt <anna@example.com>"):
        found = json.loads(cli(config, "history", "list", "--to", to, "--json").stdout)
        assert [m["id"] for m in found] == [mail_id], to


def test_human_output_shows_no_python_reprs(settings: Settings, config: Path) -> None:
    mail_id = sent_mail(settings)
    [dead] = fill_dead_letters(settings, "acme", "billing", 1)
    cli(config, "pause", "acme")
    archive(settings).close()
    outputs = [
        cli(config, *argv)
        for argv in (
            ["history", "list"],
            ["history", "show", mail_id],
            ["history", "actions"],
            ["dlq", "list"],
            ["dlq", "show", dead],
            ["status"],
            ["topology", "declare"],
        )
    ]
    for result in outputs:
        text = result.stdout + result.stderr
        assert not re.search(r"\['|\{'|'\]|\bNone\b|\bTrue\b|\bFalse\b", text), text
    assert "to          Anna Schmidt <Anna@Example.com>, bob@example.com\n" in outputs[1].stdout
    assert "recipients  r0@example.com\n" in outputs[4].stdout


def test_counts_use_the_right_plural(settings: Settings, config: Path) -> None:
    sent_mail(settings)
    fill_dead_letters(settings, "acme", "billing", 1)
    assert cli(config, "history", "list").stderr == "(1 mail)\n"
    assert cli(config, "dlq", "list").stderr == "(1 dead letter)\n"
    assert cli(config, "dlq", "purge", "--yes").stdout == "purged 1 dead letter\n"
    assert cli(config, "dlq", "purge", "--yes").stdout == "purged 0 dead letters\n"
    purged = cli(config, "history", "purge", "--older-than", "0s", "--yes").stdout
    assert purged.startswith("purged 1 mail last changed before")


def test_counts_start_at_one(settings: Settings, config: Path, tmp_path: Path) -> None:
    [dead] = fill_dead_letters(settings, "acme", "billing", 1)
    shown = cli(config, "dlq", "show", dead).stdout
    assert "round       1 (the first)\n" in shown
    assert "attempts    3\n" in shown and re.search(r"size        \d+ bytes\n", shown)
    cli(config, "dlq", "retry", dead)
    drain(settings)  # the catcher refuses nothing: sent in its second round
    good = '{"tenant": "acme", "app": "billing", "to": ["a@example.com"], "subject": "s"}'
    (tmp_path / "mails.jsonl").write_text(f"\n{good}\n")
    refused = cli(config, "submit", "--file", str(tmp_path / "mails.jsonl"), check=False)
    assert "mails.jsonl line 2: " in refused.stderr, "lines count from 1, blank ones too"
    store = archive(settings)
    found = store.mail(uuid.UUID(dead))
    store.close()
    assert found is not None and [e.round for e in found.events] == [1, 1]


def test_history_list_of_scheduled_mails_shows_when_each_is_due(
    settings: Settings, config: Path
) -> None:
    due = datetime.now(UTC) + timedelta(hours=1)
    with Producer(settings) as producer:
        mail_id = str(producer.submit(mail(not_before=due.isoformat())))
    archive(settings).close()
    table = cli(config, "history", "list", "--status", "scheduled").stdout.splitlines()
    assert table[0].split()[:5] == ["id", "status", "due", "(UTC)", "tenant/app"]
    assert table[1].startswith(f"{mail_id}  scheduled      {due:%Y-%m-%d %H:%M:%S}  acme/billing")


# -- help -------------------------------------------------------------------------------


def every_command(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from every_command(command, (*path, name))


def test_every_command_and_option_has_help_text() -> None:
    missing = []
    commands = [((), rohrpost_cli)]
    for path in every_command(rohrpost_cli):
        command: click.Command = rohrpost_cli
        for name in path:
            assert isinstance(command, click.Group)
            command = command.commands[name]
        commands.append((path, command))
    for path, command in commands:
        if not (command.help or command.short_help):
            missing.append(" ".join(path) or "rohrpost")
        for param in command.params:
            if isinstance(param, click.Option) and not (param.help or "").strip():
                missing.append(f"{' '.join(path) or 'rohrpost'} {param.opts[0]}")
    assert missing == []
    assert len(commands) > 25


def test_help_of_the_new_commands_runs() -> None:
    for argv in (["status"], ["send-now"], ["hold"], ["release"], ["dlq", "purge"]):
        result = subprocess.run(
            [sys.executable, "-m", "rohrpost", *argv, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0 and "Usage:" in result.stdout, argv


# -- configuration mistakes ----------------------------------------------------------------


def test_without_a_config_file_the_command_says_so_before_the_tenant_is_unknown(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rohrpost", "pause", "acme"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "warning: no configuration file found (--config, $ROHRPOST_CONFIG or ./rohrpost.toml): "
        "running with the defaults, which configure no tenant",
        "error: tenant 'acme' is not configured",
    ]
    assert list(tmp_path.iterdir()) == [], "and no store file was created"


def test_read_only_commands_never_create_an_empty_store(settings: Settings, tmp_path: Path) -> None:
    store = tmp_path / "missing" / "history.db"
    store.parent.mkdir()
    config = write_config(settings, tmp_path / "rohrpost.toml")
    config.write_text(
        config.read_text().replace(settings.store_url.get_secret_value(), f"sqlite:///{store}")
    )
    unknown = "00000000-0000-4000-8000-000000000000"
    for argv in (
        ["history", "list"],
        ["history", "show", unknown],
        ["history", "actions"],
        ["history", "purge", "--older-than", "30d", "--yes"],
        ["send-now", unknown],
    ):
        result = cli(config, *argv, check=False)
        assert result.returncode == 1, argv
        assert f"the history store {store} does not exist" in result.stderr
    assert list(store.parent.iterdir()) == []


def test_cancel_without_a_store_goes_on_and_says_so(settings: Settings, tmp_path: Path) -> None:
    store = tmp_path / "missing.db"
    config = write_config(settings, tmp_path / "rohrpost.toml")
    config.write_text(
        config.read_text().replace(settings.store_url.get_secret_value(), f"sqlite:///{store}")
    )
    mail_id = str(uuid.uuid4())
    result = cli(config, "cancel", mail_id)
    assert result.stderr.startswith("warning: going on without the history: the history store")
    assert result.stdout == f"cancelled {mail_id} (no history store to check it against)\n"
    assert not store.exists()
