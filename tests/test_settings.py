"""Configuration: the TOML file, environment overrides, and errors that name the key."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from rohrpost.shared.errors import ConfigError
from rohrpost.shared.nodes import split_nodes
from rohrpost.shared.settings import Backoff, load_settings, redact_url, stray_variables

EXAMPLE = """
broker_url = "amqp://guest:guest@127.0.0.1:5672/%2F"
namespace = "rohrpost"
templates_dir = "templates"
[smtp.local]
host = "127.0.0.1"
port = 2525
[tenants.acme.apps.billing]
enabled = true
smtp = "local"
sender = "billing@acme.example"
max_attempts = 4
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("ROHRPOST_CONFIG", "ROHRPOST_NAMESPACE", "ROHRPOST_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "example.toml"
    path.write_text(EXAMPLE)
    return path


def test_the_documented_example_loads(config: Path) -> None:
    settings = load_settings(config)
    assert settings.namespace == "rohrpost"
    assert settings.smtp["local"].port == 2525
    app = settings.app("acme", "billing")
    assert app is not None and app.max_attempts == 4
    assert settings.routes() == [("acme", "billing")]
    assert settings.max_delay >= timedelta(days=60)


def test_environment_variables_override_the_file(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROHRPOST_NAMESPACE", "staging")
    monkeypatch.setenv("ROHRPOST_BROKER_URL", "amqp://u:p@broker.internal:5672/%2F")
    monkeypatch.setenv("ROHRPOST_PREFETCH", "7")
    settings = load_settings(config)
    assert settings.namespace == "staging"
    assert settings.broker_url.get_secret_value() == "amqp://u:p@broker.internal:5672/%2F"
    assert settings.prefetch == 7


def test_the_config_file_is_found_by_flag_then_variable_then_working_directory(
    config: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "rohrpost.toml").write_text('namespace = "from-cwd"\n')
    assert load_settings().namespace == "from-cwd"
    other = tmp_path / "other.toml"
    other.write_text('namespace = "from-env"\n')
    monkeypatch.setenv("ROHRPOST_CONFIG", str(other))
    assert load_settings().namespace == "from-env"
    assert load_settings(config).namespace == "rohrpost"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("colour = 'blue'\n", "colour"),
        ("[smtp.other]\nhost = 'x'\nprot = 25\n", "smtp.other.prot"),
        (
            "[tenants.acme.apps.shop]\nsmtp = 'local'\nsender = 's@acme.example'\nretries = 3\n",
            "tenants.acme.apps.shop.retries",
        ),
    ],
)
def test_unknown_keys_are_errors_that_name_the_key(config: Path, extra: str, named: str) -> None:
    config.write_text(EXAMPLE + extra if extra.startswith("[") else extra + EXAMPLE)
    with pytest.raises(ConfigError, match=rf"{named}: Extra inputs are not permitted"):
        load_settings(config)


def test_an_app_must_name_a_configured_smtp_server(config: Path) -> None:
    config.write_text(EXAMPLE.replace('smtp = "local"', 'smtp = "nowhere"'))
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    # the file, then the key: no word of a mail container in a configuration error
    assert str(raised.value) == (
        f"config file {config}: tenants.acme.apps.billing.smtp: no SMTP server named "
        "'nowhere' (known: local)"
    )


def test_a_bad_value_from_the_environment_names_the_variable_not_the_file(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROHRPOST_PREFETCH", "lots")
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert str(raised.value).startswith(
        "environment variable ROHRPOST_PREFETCH: prefetch: Input should be a valid integer"
    )
    monkeypatch.delenv("ROHRPOST_PREFETCH")
    monkeypatch.setenv("rohrpost_smtp__local__port", "twenty-five")  # names are not case-sensitive
    with pytest.raises(ConfigError, match=r"^environment variable ROHRPOST_SMTP__LOCAL__PORT: "):
        load_settings(config)
    config.write_text(EXAMPLE + 'threads = "many"\n')  # and one fault in the file
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert str(raised.value).startswith(
        f"config file {config} and environment variable ROHRPOST_SMTP__LOCAL__PORT: "
    )


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_broken_toml_is_a_clear_error(config: Path) -> None:
    config.write_text("namespace = \n")
    with pytest.raises(ConfigError, match=str(config)):
        load_settings(config)


def test_durations_take_units(config: Path) -> None:
    config.write_text(EXAMPLE.replace('namespace = "rohrpost"', 'max_delay = "3d"'))
    settings = load_settings(config)
    assert settings.max_delay == timedelta(days=3)
    assert settings.delay_levels == 6  # 8**6 - 1 = 262,143 s >= 3 days = 259,200 s


def test_the_smtp_password_comes_from_the_named_variable(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config.write_text(
        EXAMPLE.replace("port = 2525", 'port = 2525\nuser = "u"\npassword_env = "PW"')
    )
    settings = load_settings(config)
    with pytest.raises(ConfigError, match="PW"):
        settings.smtp["local"].password()
    monkeypatch.setenv("PW", "s3cret-value")
    password = settings.smtp["local"].password()
    assert password is not None and password.get_secret_value() == "s3cret-value"
    assert "s3cret-value" not in repr(settings)
    assert "s3cret-value" in settings.secrets()


def test_broker_passwords_are_redacted_for_display() -> None:
    assert redact_url("amqp://user:hunter2@host:5672/%2F") == "amqp://user:***@host:5672/%2F"
    assert redact_url("amqp://host/") == "amqp://host/"


NODES = [f"amqp://rohrpost:pw{i}@rabbit-{i}.internal:5672/%2F" for i in (1, 2, 3)]


def toml_list(urls: list[str]) -> str:
    return "broker_url = [" + ", ".join(f'"{url}"' for url in urls) + "]\n"


@pytest.mark.parametrize(
    ("in_file", "in_env"),
    [
        (toml_list(NODES), None),
        ("", ",".join(NODES)),
        ("", " , ".join(NODES)),
        ("", json.dumps(NODES)),
        (toml_list(NODES[:1]), json.dumps(NODES)),  # the environment wins, as for every key
    ],
    ids=["toml array", "env comma-separated", "env with spaces", "env JSON array", "env wins"],
)
def test_broker_url_takes_the_nodes_of_a_cluster_from_the_file_or_the_environment(
    config: Path, monkeypatch: pytest.MonkeyPatch, in_file: str, in_env: str | None
) -> None:
    config.write_text(in_file + EXAMPLE.replace('broker_url = "amqp', '# "amqp'))
    if in_env is not None:
        monkeypatch.setenv("ROHRPOST_BROKER_URL", in_env)
    settings = load_settings(config)
    assert split_nodes(settings.broker_url.get_secret_value()) == NODES


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:guest@127.0.0.1:5672/%2F",
        "amqps://user:pass@broker.example.com/production?heartbeat=10",
        "amqp://user:a,b@broker:5672/%2F",  # a comma in a password is no list
        "amqp://broker",
    ],
)
def test_a_single_broker_url_is_kept_as_it_is(config: Path, url: str) -> None:
    settings = load_settings(config, broker_url=url)
    assert settings.broker_url.get_secret_value() == url
    assert split_nodes(url) == [url]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "no broker address given"),
        ("  ", "no broker address given"),
        ("http://rohrpost:pw1@rabbit-1:15672/", "rohrpost:***@rabbit-1:15672/: not an AMQP URL"),
        ("amqp:///%2F", "not an AMQP URL"),
        ([NODES[0], "redis://rohrpost:pw2@cache:6379"], "address 2 of 2 (redis://rohrpost:***@"),
        ([NODES[0], "amqp://rohrpost:pw2@rabbit-1.internal/%2F"], "this node is listed twice"),
        ([NODES[0], NODES[1].replace("%2F", "staging")], "virtual host 'staging', but address 1"),
        ("amqp://rohrpost:pw1@rabbit-1:99999/", "not a valid URL: Port out of range"),
        (f'["{NODES[0]}"', "not a JSON array of URLs"),
        ([NODES[0], 5672], "every broker address must be a URL"),
        ({"url": NODES[0]}, "must be a URL or a list of URLs"),
    ],
)
def test_a_bad_broker_address_is_named_without_its_password(
    config: Path, value: object, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(config, broker_url=value)
    text = str(caught.value)
    assert "broker_url: " in text and message in text
    assert not any(f"pw{i}" in text for i in (1, 2, 3))


def test_every_nodes_password_is_a_secret_and_hidden_for_display(config: Path) -> None:
    # (a cluster's users are the same on every node; their passwords need not be)
    nodes = [*NODES, "amqp://rohrpost:p%40ss@rabbit-4.internal:5672/%2F"]
    settings = load_settings(config, broker_url=nodes)
    assert {"pw1", "pw2", "pw3", "p%40ss", "p@ss"} <= set(settings.secrets())
    shown = redact_url(settings.broker_url.get_secret_value())
    assert shown.count(":***@") == 4
    assert not any(secret in shown for secret in ("pw1", "pw2", "pw3", "p%40ss"))


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    backoff = Backoff(base=timedelta(seconds=10), factor=3, cap=timedelta(seconds=60), jitter=0)
    delays = [backoff.delay(attempt).total_seconds() for attempt in (1, 2, 3, 4)]
    assert delays == [10, 30, 60, 60]


def test_backoff_jitter_stays_within_its_fraction() -> None:
    backoff = Backoff(base=timedelta(seconds=100), jitter=0.2)
    rng = random.Random(7)
    delays = {backoff.delay(1, rng).total_seconds() for _ in range(200)}
    assert min(delays) >= 80 and max(delays) <= 120 and len(delays) > 100


def test_the_example_in_deploy_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ROHRPOST_CONFIG", "ROHRPOST_NAMESPACE", "ROHRPOST_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    example = Path(__file__).parent.parent / "deploy" / "rohrpost.example.toml"
    settings = load_settings(example)
    assert settings.routes() == [("acme", "billing"), ("globex", "shop")]
    assert settings.smtp["relay"].security == "starttls"


def test_a_store_url_that_is_no_database_url_is_named(config: Path) -> None:
    config.write_text('store_url = "rohrpost.db"\n' + EXAMPLE)
    with pytest.raises(ConfigError, match="store_url: not a database URL"):
        load_settings(config)


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql+asyncpg://u:secret@db/rohrpost", "asyncpg"),
        ("postgresql+psycopg2://u:secret@db/rohrpost", "psycopg2"),
        ("sqlite+aiosqlite:///rohrpost.db", "aiosqlite"),
    ],
)
def test_a_store_url_with_a_driver_rohrpost_does_not_bring_is_named(
    config: Path, url: str, driver: str
) -> None:
    config.write_text(f'store_url = "{url}"\n' + EXAMPLE)
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert f"store_url: the driver {driver} is not supported; use " in str(raised.value)
    assert "secret" not in str(raised.value)


def test_an_at_sign_in_a_store_password_must_be_encoded(config: Path) -> None:
    # SQLAlchemy would split at the first @ and show "cr3t@db" as the host in errors
    config.write_text('store_url = "postgresql://u:se@cr3t@db:5432/rohrpost"\n' + EXAMPLE)
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert "store_url: an @ in the user name or password must be written %40" in str(raised.value)
    assert "cr3t" not in str(raised.value)


def test_the_store_urls_rohrpost_documents_load(config: Path) -> None:
    for url in (
        "sqlite:///rohrpost.db",
        "sqlite+pysqlite:///rohrpost.db",
        "postgresql+psycopg://u:p@db:5432/rohrpost",
        "postgresql://u:p@db:5432/rohrpost",
        "postgresql+psycopg://u:se%40cr3t@db:5432/rohrpost",
    ):
        config.write_text(f'store_url = "{url}"\n' + EXAMPLE)
        assert load_settings(config).store_url.get_secret_value() == url


def test_durations_survive_a_round_trip_through_toml(config: Path) -> None:
    import tomli_w

    settings = load_settings(config)
    dumped = settings.model_dump(
        mode="json", exclude={"broker_url", "store_url", "redis_url"}, exclude_none=True
    )
    config.write_text(tomli_w.dumps(dumped))
    assert load_settings(config).model_dump() == settings.model_dump()


def test_a_misspelt_variable_is_named_with_the_setting_it_probably_meant(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config.write_text(
        EXAMPLE.replace(
            'host = "127.0.0.1"', 'host = "127.0.0.1"\npassword_env = "ROHRPOST_SMTP_PW"'
        )
    )
    monkeypatch.setenv("ROHRPOST_PREFECH", "5")
    monkeypatch.setenv("ROHRPOST_WOBBLE", "1")
    monkeypatch.setenv("ROHRPOST_SMTP_PW", "secret")  # named by password_env: read
    monkeypatch.setenv("ROHRPOST_SMTP__LOCAL__PORT", "2526")  # a setting, nested
    monkeypatch.setenv("ROHRPOST_CONFIG", str(config))
    settings = load_settings(config)
    assert settings.smtp["local"].port == 2526
    assert stray_variables(settings) == [
        "ROHRPOST_PREFECH (did you mean ROHRPOST_PREFETCH?)",
        "ROHRPOST_WOBBLE",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "rohrpost", "--config", str(config), "store", "migrate"],
        check=False,
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "warning: ROHRPOST_PREFECH (did you mean ROHRPOST_PREFETCH?) is no setting; "
        "it is ignored\n" in result.stderr
    )
