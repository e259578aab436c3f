"""The ``rohrpost`` command, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from pika.exceptions import ChannelClosedByBroker

from rohrpost.catcher import MailCatcher
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.settings import Settings
from rohrpost.shared.topology import Topology, queue_depths
from tests.conftest import drain, rohrpost_command, write_config, write_template


def run(*argv: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = (
        rohrpost_command(config, *argv) if config else [sys.executable, "-m", "rohrpost", *argv]
    )
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def config(settings: Settings, tmp_path: Path) -> Path:
    return write_config(settings, tmp_path / "rohrpost.toml")


def test_submit_from_flags_prints_the_id_and_the_mail_is_sent(
    config: Path, settings: Settings, catcher: MailCatcher
) -> None:
    result = run(
        "submit",
        "--tenant",
        "acme",
        "--app",
        "billing",
        "--to",
        "anna@example.com",
        "--subject",
        "Hi from the CLI",
        "--text",
        "Hello",
        "--tag",
        "cli",
        config=config,
    )
    assert result.returncode == 0, result.stderr
    mail_id = uuid.UUID(result.stdout.strip())
    drain(settings)
    message = catcher.mails[0].parsed()
    assert message["Subject"] == "Hi from the CLI"
    assert message["Message-ID"] == f"<{mail_id}@acme.example>"


def test_submit_a_template_with_data_and_an_attachment(
    config: Path, settings: Settings, catcher: MailCatcher, templates: Path, tmp_path: Path
) -> None:
    write_template(templates, "welcome", subject="Welcome {{ name }}", text="Hi {{ name }}")
    document = tmp_path / "terms.pdf"
    document.write_bytes(b"%PDF-1.4 terms")
    result = run(
        "submit",
        "--tenant",
        "acme",
        "--app",
        "billing",
        "--to",
        "anna@example.com",
        "--template",
        "welcome",
        "--data",
        '{"name": "Anna"}',
        "--attach",
        str(document),
        config=config,
    )
    assert result.returncode == 0, result.stderr
    drain(settings)
    message = catcher.mails[0].parsed()
    assert message["Subject"] == "Welcome Anna"
    [attachment] = message.iter_attachments()
    assert attachment.get_filename() == "terms.pdf"
    assert attachment.get_content() == b"%PDF-1.4 terms"


def test_submit_with_a_relative_not_before_goes_into_the_delay_levels(
    config: Path, settings: Settings
) -> None:
    result = run(
        "submit",
        "--tenant",
        "acme",
        "--app",
        "billing",
        "--to",
        "anna@example.com",
        "--subject",
        "Later",
        "--text",
        "x",
        "--not-before",
        "+90s",
        config=config,
    )
    assert result.returncode == 0, result.stderr
    topology = Topology.from_settings(settings)
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        depths = queue_depths(channel, topology.delay_queues())
    # 90 s = 0o132: the highest digit is 1 at level 2 (64 s)
    assert {k: v for k, v in depths.items() if v} == {f"{settings.namespace}.delay.2.1": 1}


def test_submit_many_from_a_jsonl_file(
    config: Path, settings: Settings, catcher: MailCatcher, tmp_path: Path
) -> None:
    lines = [
        json.dumps(
            {
                "tenant": "acme",
                "app": "billing",
                "to": [f"r{i}@example.com"],
                "subject": f"#{i}",
                "text": "x",
            }
        )
        for i in range(25)
    ]
    (tmp_path / "mails.jsonl").write_text("\n".join(lines) + "\n")
    result = run("submit", "--file", str(tmp_path / "mails.jsonl"), config=config)
    assert result.returncode == 0, result.stderr
    ids = result.stdout.split()
    assert len(ids) == 25
    drain(settings)
    assert len(catcher.mails) == 25


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (
            [
                "--tenant",
                "globex",
                "--app",
                "billing",
                "--to",
                "a@example.com",
                "--subject",
                "x",
                "--text",
                "x",
            ],
            1,
            "globex/billing is not configured",
        ),
        (
            [
                "--tenant",
                "acme",
                "--app",
                "billing",
                "--to",
                "a@example",
                "--subject",
                "x",
                "--text",
                "x",
            ],
            1,
            "to.0:",
        ),
        (
            [
                "--tenant",
                "acme",
                "--app",
                "billing",
                "--to",
                "a@example.com",
                "--template",
                "t",
                "--data",
                "{oops",
            ],
            2,
            "--data",
        ),
        (
            [
                "--tenant",
                "acme",
                "--app",
                "billing",
                "--to",
                "a@example.com",
                "--subject",
                "x",
                "--text",
                "x",
                "--not-before",
                "tomorrow",
            ],
            2,
            "--not-before",
        ),
        (["--tenant", "acme", "--to", "a@example.com"], 2, "--tenant, --app and --to"),
    ],
)
def test_bad_submits_exit_non_zero_naming_the_problem(
    config: Path, argv: list[str], code: int, message: str
) -> None:
    result = run("submit", *argv, config=config)
    assert result.returncode == code
    assert message in result.stderr
    assert result.stdout == ""


def test_a_config_with_an_unknown_key_names_it(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('namespace = "x"\ncolour = "blue"\n')
    result = run("topology", "declare", config=config)
    assert result.returncode == 2
    assert "colour: Extra inputs are not permitted" in result.stderr


def test_topology_declare_is_idempotent(config: Path, settings: Settings) -> None:
    for _ in range(2):
        result = run("topology", "declare", config=config)
        assert result.returncode == 0, result.stderr
        assert f"namespace '{settings.namespace}'" in result.stdout
        assert "guest:guest" not in result.stdout


def test_the_demo_without_a_broker_says_how_to_start_one() -> None:
    result = run("demo", "--broker-url", "amqp://guest:guest@127.0.0.1:1/%2F")
    assert result.returncode == 1
    # an error like every other: first line `error: `, the password hidden
    assert result.stderr.startswith("error: no RabbitMQ answers at amqp://guest:***@127.0.0.1:1/")
    assert "rabbitmq-server" in result.stderr
    assert "rohrpost demo --broker-url amqp://" in result.stderr


def test_the_demo_runs_the_whole_pipeline(broker_url: str, redis_url: str) -> None:
    result = run("demo", "--broker-url", broker_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all mails ended as expected" in result.stdout
    assert "attempt_failed attempt 1" in result.stdout and "550 5.1.1" in result.stdout
    assert "the web console: http://127.0.0.1:" in result.stdout
    namespace = result.stdout.split("namespace '")[1].split("'")[0]
    with admin_channel(broker_url) as channel, pytest.raises(ChannelClosedByBroker):
        channel.queue_declare(f"{namespace}.send.acme.shop", passive=True)  # cleaned up
    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(match=f"{namespace}:*")) == []  # ids and claims too
    finally:
        client.close()


def test_every_command_has_help() -> None:
    for argv in (
        ["--help"],
        ["submit", "--help"],
        ["worker", "--help"],
        ["demo", "--help"],
        ["topology", "declare", "--help"],
        ["run", "--help"],
        ["history-consumer", "--help"],
        ["history", "list", "--help"],
        ["history", "show", "--help"],
        ["history", "purge", "--help"],
        ["store", "migrate", "--help"],
        ["schema", "--help"],
    ):
        result = run(*argv)
        assert result.returncode == 0, (argv, result.stderr)
        assert "Usage:" in result.stdout


def test_the_metrics_port_help_says_each_process_s_real_default() -> None:
    # a separate history consumer serves on the port after metrics_port (README, Monitoring)
    shown = " ".join(run("history-consumer", "--help").stdout.split())
    assert "[default: metrics_port + 1, 9751]" in shown
    for command in ("worker", "run"):
        shown = " ".join(run(command, "--help").stdout.split())
        assert "[default: metrics_port, 9750]" in shown


def test_history_commands_list_show_and_purge(
    config: Path, settings: Settings, catcher: MailCatcher
) -> None:
    from rohrpost.consumer.history import HistoryConsumer
    from rohrpost.shared.store import HistoryStore

    assert run("store", "migrate", config=config).returncode == 0
    migrated = run("store", "migrate", config=config)
    assert migrated.returncode == 0 and "is at schema" in migrated.stdout
    submitted = run(
        "submit",
        "--tenant",
        "acme",
        "--app",
        "billing",
        "--to",
        "zoe@example.com",
        "--subject",
        "Table test",
        "--text",
        "x",
        "--tag",
        "t1",
        config=config,
    )
    mail_id = submitted.stdout.strip()
    drain(settings)
    store = HistoryStore.open(settings.store_url.get_secret_value())
    HistoryConsumer(settings, store).run(drain=True)
    store.close()

    table = run("history", "list", "--to", "zoe@example.com", "--since", "-1h", config=config)
    assert table.returncode == 0, table.stderr
    assert mail_id in table.stdout and "sent" in table.stdout and "Table test" in table.stdout
    assert run("history", "list", "--tag", "nope", "--json", config=config).stdout.strip() == "[]"
    shown = run("history", "show", mail_id, config=config)
    assert shown.returncode == 0
    assert "status      sent" in shown.stdout and "submitted" in shown.stdout
    missing = run("history", "show", "00000000-0000-4000-8000-000000000000", config=config)
    assert missing.returncode == 1 and "has no mail" in missing.stderr
    purged = run("history", "purge", "--older-than", "30d", "--yes", config=config)
    assert "purged 0 mails" in purged.stdout
    purged = run("history", "purge", "--older-than", "0s", "--yes", config=config)
    assert "purged 1 mail last changed" in purged.stdout


def test_history_purge_reports_progress_at_most_once_a_second(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rohrpost.commands import history as history_commands

    clock = iter([0.0, 0.5, 1.2, 1.3, 2.5, 2.6])
    monkeypatch.setattr(history_commands.time, "monotonic", lambda: next(clock))
    progress = history_commands._PurgeProgress()  # next report at 1.0
    for purged in (5000, 10000, 15000):
        progress(purged)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "purging: 10000 mails so far",
        "purging: 15000 mails so far",
    ]
