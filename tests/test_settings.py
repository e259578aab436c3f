"""Configuration: the TOML file, environment overrides, and errors that name the key."""

from __future__ import annotations

import json
import random
from datetime import timedelta
from pathlib import Path

import pytest

from rohrpost.shared.errors import ConfigError
from rohrpost.shared.nodes import split_nodes
from rohrpost.shared.settings import Backoff, load_settings, redact_url

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
    with pytest.raises(ConfigError, match=r"tenants\.acme\.apps\.billing\.smtp.*'nowhere'"):
        load_settings(config)


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


def test_durations_survive_a_round_trip_through_toml(config: Path) -> None:
    import tomli_w

    settings = load_settings(config)
    dumped = settings.model_dump(
        mode="json", exclude={"broker_url", "store_url", "redis_url"}, exclude_none=True
    )
    config.write_text(tomli_w.dumps(dumped))
    assert load_settings(config).model_dump() == settings.model_dump()
