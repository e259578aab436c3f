"""The documentation is true: example config, Python example, sample errors, metrics table."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from rohrpost.consumer.endpoints import NAMESPACE_LABEL, QueueCollector
from rohrpost.producer.client import Producer
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.metrics import Metrics
from rohrpost.shared.settings import AppConfig, Backoff, Settings, SmtpServer, load_settings
from rohrpost.shared.topology import Topology, queue_depths
from tests.conftest import write_config
from tests.test_operators import archive, cli, mail

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def flat(text: str) -> str:
    """Text with every run of whitespace as one space (the README wraps its lines)."""
    return " ".join(text.split())


# -- the example configuration ---------------------------------------------------------------


def test_the_example_config_loads_and_shows_every_setting() -> None:
    path = ROOT / "deploy" / "rohrpost.example.toml"
    load_settings(path)  # valid as it is
    data = tomllib.loads(path.read_text())
    servers = data["smtp"].values()
    apps = [app for tenant in data["tenants"].values() for app in tenant["apps"].values()]
    shown = {
        "settings": set(data),
        "smtp server": set().union(*(set(s) for s in servers)),
        "app": set().union(*(set(a) for a in apps)),
        "backoff": set().union(*(set(a.get("backoff", {})) for a in apps)),
    }
    fields = {
        "settings": set(Settings.model_fields),
        "smtp server": set(SmtpServer.model_fields),
        "app": set(AppConfig.model_fields),
        "backoff": set(Backoff.model_fields),
    }
    assert shown == fields


def test_the_readme_configuration_table_names_every_setting() -> None:
    table = README[README.index("| key | default | meaning |") : README.index("Tenant and app")]
    # `key` rows, and the sections as `[smtp.NAME]`, `[tenants.T.apps.A]`, `[console]`
    named = set(re.findall(r"^\| `\[?([a-z_]+)[`.\]]", table, re.MULTILINE))
    assert named == set(Settings.model_fields)


# -- the Python example -----------------------------------------------------------------------


def test_the_readme_python_example_runs_as_written(settings: Settings, tmp_path: Path) -> None:
    section = README[README.index("## Submitting from Python") :]
    example = section[section.index("```python") + len("```python") : section.index("```\n\n")]
    write_config(settings, tmp_path / "rohrpost.toml")  # what load_settings() finds
    (tmp_path / "example.py").write_text(example)
    result = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""  # the producer logs nothing unasked
    topology = Topology.from_settings(settings)
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        due = queue_depths(channel, [topology.send_queue("acme", "billing")])
        delayed = sum(queue_depths(channel, topology.delay_queues()).values())
    assert (sum(due.values()), delayed) == (100, 1), "submit_many's 100 now, the invoice later"


# -- sample errors --------------------------------------------------------------------------


def matches(sample: str, said: str) -> bool:
    """``said`` is what ``sample`` shows, ``…`` standing for anything."""
    pattern = ".*".join(re.escape(part) for part in flat(sample).split("…"))
    return re.search(pattern, flat(said)) is not None


ACME = """
namespace = "tdocs"
[smtp.relay]
host = "127.0.0.1"
[tenants.acme.apps.billing]
smtp = "relay"
sender = "billing@acme.example"
"""


def configured(tmp_path: Path) -> Path:
    """A directory whose ./rohrpost.toml configures acme/billing."""
    (tmp_path / "rohrpost.toml").write_text(ACME)
    return tmp_path


def run(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rohrpost", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _bad_config(tmp_path: Path) -> str:
    (tmp_path / "bad.toml").write_text(
        '[smtp.relay]\nhost = "x"\n[tenants.acme.apps.billing]\nsmtp = "relay"\n'
        'sender = "a@acme.example"\nretries = 3\n'
    )
    return run(tmp_path, "--config", "bad.toml", "topology", "declare").stderr


def _no_config(tmp_path: Path) -> str:
    return run(
        tmp_path,
        "submit",
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
    ).stderr


def _bad_line(tmp_path: Path) -> str:
    good = (
        '{"tenant": "acme", "app": "billing", "to": ["a@example.com"], "subject": "s", "text": "t"}'
    )
    (tmp_path / "mails.jsonl").write_text(f'{good}\n{good}\n{{"tenant": }}\n')
    return run(configured(tmp_path), "submit", "--file", "mails.jsonl").stderr


def _evil_field(tmp_path: Path) -> str:
    good = (
        '{"tenant": "acme", "app": "billing", "to": ["a@example.com"], "subject": "s", "text": "t"}'
    )
    evil = good.replace('"text": "t"', '"text": "t", "evil": 1')
    (tmp_path / "mails.json").write_text(f"[\n{good},\n\n\n{evil}\n]\n")
    return run(configured(tmp_path), "submit", "--file", "mails.json").stderr


def _control_character(tmp_path: Path) -> str:
    return run(
        configured(tmp_path),
        "submit",
        "--tenant",
        "acme",
        "--app",
        "billing",
        "--to",
        "a@example.com",
        "--subject",
        "Hi \x1b[31m",
        "--text",
        "x",
    ).stderr


def _bad_address(tmp_path: Path) -> str:
    return run(
        configured(tmp_path),
        "submit",
        "--tenant",
        "acme",
        "--app",
        "billing",
        "--to",
        "anna(at)example.com",
        "--subject",
        "x",
        "--text",
        "x",
    ).stderr


def _python_data(_tmp_path: Path) -> str:
    from rohrpost.shared.container import parse_container
    from rohrpost.shared.errors import ContainerError

    messages = []
    for data in ({"when": datetime(2026, 1, 1)}, _nested(70)):
        try:
            parse_container({**mail(), "template": "t", "data": data})
        except ContainerError as exc:
            messages.append(str(exc))
    return "\n".join(messages)


def _nested(levels: int) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for _ in range(levels - 1):
        data = {"a": data}
    return data


SAMPLES: list[tuple[str, Callable[[Path], str]]] = [
    (
        "error: config file bad.toml: tenants.acme.apps.billing.retries: Extra inputs are "
        "not permitted",
        _bad_config,
    ),
    (
        "warning: no configuration file found (--config, $ROHRPOST_CONFIG or ./rohrpost.toml): "
        "running with the defaults, which configure no tenant",
        _no_config,
    ),
    ("error: tenant/app acme/billing is not configured", _no_config),
    ("mails.jsonl line 3: not JSON: Expecting value (column 12)", _bad_line),
    ("mails.json mail #2 (line 5): evil: Extra inputs are not permitted", _evil_field),
    ("subject: must not contain control characters (U+001B at position 4)", _control_character),
    ("to.0: 'anna(at)example.com' is not a valid e-mail address …", _bad_address),
    ("data.when: datetime is not a JSON type; send a string or number instead", _python_data),
    ("data: nested deeper than 64 levels (the limit)", _python_data),
]


@pytest.mark.parametrize(("sample", "produce"), SAMPLES, ids=[s[:40] for s, _ in SAMPLES])
def test_the_readme_sample_errors_are_the_real_ones(
    tmp_path: Path, sample: str, produce: Callable[[Path], str]
) -> None:
    assert flat(sample) in flat(README), "the README shows it"
    said = produce(tmp_path)
    assert matches(sample, said), said


def test_the_readme_sample_errors_of_the_operator_tools_are_the_real_ones(
    settings: Settings, tmp_path: Path
) -> None:
    config = write_config(settings, tmp_path / "rohrpost.toml")
    with Producer(settings) as producer:
        for mail_id in (
            "6c0f5d1e-0000-4000-8000-000000000001",
            "6c0fa2b4-0000-4000-8000-000000000002",
        ):
            producer.submit(mail(id=mail_id))
    archive(settings).close()
    for sample, argv in (
        (
            "error: id prefix 6c0f fits several mails: 6c0f5d1e-…, 6c0fa2b4-…; give more digits",
            ["history", "show", "6c0f"],
        ),
        (
            "error: this deletes …: pass --yes to confirm",
            ["history", "purge", "--older-than", "1d"],
        ),
    ):
        assert flat(sample) in flat(README)
        said = cli(config, *argv, check=False).stderr
        assert matches(sample, said), said
    missing = (tmp_path / "rohrpost.db").resolve()
    config.write_text(
        config.read_text().replace(settings.store_url.get_secret_value(), "sqlite:///rohrpost.db")
    )
    said = subprocess.run(
        [sys.executable, "-m", "rohrpost", "--config", str(config), "history", "list"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stderr
    sample = (
        "the history store rohrpost.db does not exist: no history consumer has run with "
        "this configuration yet"
    )
    assert flat(sample) in flat(README) and sample in said
    assert not missing.exists()


# -- the metrics table --------------------------------------------------------------------------


def exposed_metrics(settings: Settings) -> dict[str, set[str]]:
    """Every metric a process exposes, by exposed name, with its labels (``le`` aside)."""
    registry = CollectorRegistry()
    for metric in vars(Metrics(registry)).values():
        names = metric._labelnames
        child = metric.labels(*["x"] * len(names)) if names else metric
        if isinstance(child, Counter):
            child.inc()
        elif isinstance(child, Gauge):
            child.set(1)
        else:
            child.observe(1)
    topology = Topology.from_settings(settings)
    registry.register(QueueCollector(topology, settings.broker_url.get_secret_value()))
    exposed: dict[str, set[str]] = {}
    for family in registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = exposed.setdefault(name, set())
        for sample in family.samples:
            labels.update(set(sample.labels) - {"le"})
    return exposed


def test_the_readme_metrics_table_lists_every_metric_with_every_label(settings: Settings) -> None:
    table = README[README.index("| metric | type | labels | |") :]
    table = table[: table.index("\n\n")]
    documented = {}
    for row in table.splitlines()[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        labels = {label.strip() for label in cells[2].split(",") if label.strip()}
        for name in re.findall(r"`(rohrpost_[a-z_]+)`", cells[0]):
            documented[name] = labels
    assert documented == exposed_metrics(settings)
    assert f"**`{NAMESPACE_LABEL}`**" in README


# -- why not the delayed-message plugin ---------------------------------------------------------


def test_the_readme_says_why_delays_do_not_use_the_delayed_message_plugin() -> None:
    text = flat(README)
    section = text[text.index("Why not RabbitMQ's delayed-message exchange plugin") :][:1200]
    for reason in (
        "no longer actively maintained",
        "single, unreplicated copy",
        "hundreds of thousands of delayed messages",
        "does not support `mandatory`",
    ):
        assert reason in section
