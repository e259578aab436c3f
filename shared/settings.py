"""Configuration: one TOML file, every top-level value overridable by ``ROHRPOST_*``.

Built once at the entry point (``load_settings``) and passed down; nothing here reads
the environment at import time.
"""

from __future__ import annotations

import difflib
import os
import random
import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from rohrpost.shared.container import Address, Name, describe_validation_error
from rohrpost.shared.delay import DelayLevels
from rohrpost.shared.errors import ConfigError
from rohrpost.shared.nodes import broker_addresses, broker_user, redact_url, split_nodes
from rohrpost.shared.rate import Rate, parse_rate
from rohrpost.shared.timeparse import parse_duration

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "AppConfig",
    "Backoff",
    "BrokerUser",
    "Duration",
    "MaxRate",
    "Settings",
    "SmtpServer",
    "TenantConfig",
    "config_path",
    "load_settings",
    "redact_url",
    "settings_from_mapping",
]


def _duration_text(value: timedelta) -> str:
    seconds = value.total_seconds()
    return f"{int(seconds)}s" if seconds.is_integer() else f"{seconds!r}s"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(_duration_text, return_type=str),
]
DEFAULT_CONFIG_FILE = Path("rohrpost.toml")
#: Per store_url backend: the driver rohrpost's server extra installs, and a URL with it.
_STORE_DRIVERS = {
    "sqlite": ("pysqlite", "sqlite:///path/to/file.db"),
    "postgresql": ("psycopg", "postgresql+psycopg://user:password@host:5432/database"),
}
#: A rate limit as written: ``20/s``, ``600/m``, ``1000/h``, ``50000/d``.
MaxRate = Annotated[Rate, BeforeValidator(parse_rate), PlainSerializer(str, return_type=str)]


class Backoff(BaseModel):
    """Exponential backoff between attempts: ``min(cap, base * factor**(attempt-1))`` ± jitter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: Duration = timedelta(seconds=30)
    factor: float = Field(default=2.0, ge=1.0)
    cap: Duration = timedelta(hours=1)
    jitter: float = Field(default=0.2, ge=0.0, le=1.0, description="Fraction of the delay.")

    def delay(self, attempt: int, rng: random.Random | None = None) -> timedelta:
        """Return the wait after failed attempt number ``attempt`` (1-based)."""
        raw = self.base.total_seconds() * self.factor ** (attempt - 1)
        delay = min(self.cap.total_seconds(), raw)
        spread = delay * self.jitter
        delay += (rng or random).uniform(-spread, spread)
        return timedelta(seconds=max(1.0, delay))


class SmtpServer(BaseModel):
    """An SMTP server mails are sent through."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    port: int = Field(default=25, ge=1, le=65535)
    security: Literal["none", "starttls", "tls"] = "none"
    user: str | None = None
    password_env: str | None = Field(
        default=None, description="Name of the environment variable holding the password."
    )
    timeout: Duration = timedelta(seconds=30)
    max_rate: MaxRate | None = Field(
        default=None,
        description="Most mails per second/minute/hour/day to this server, across every "
        "worker process of the installation.",
    )
    max_connections: int | None = Field(
        default=None,
        ge=1,
        description="Most SMTP connections open to this server at once, across every worker "
        "process of the installation.",
    )

    def password(self) -> SecretStr | None:
        """Read the password from its environment variable; ConfigError when it is unset."""
        if self.password_env is None:
            return None
        value = os.environ.get(self.password_env)
        if value is None:
            raise ConfigError(
                f"smtp server {self.host}:{self.port}: environment variable "
                f"{self.password_env} (password_env) is not set"
            )
        return SecretStr(value)


class AppConfig(BaseModel):
    """What applies to one tenant's application."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    smtp: str = Field(description="Name of a server in [smtp].")
    sender: Address = Field(description="Default From address.")
    max_attempts: int = Field(default=5, ge=1, le=100)
    backoff: Backoff = Backoff()
    retention_days: int = Field(
        default=30, ge=1, description="Days the history keeps a finished mail of this app."
    )
    max_rate: MaxRate | None = Field(
        default=None,
        description="Most mails of this app per second/minute/hour/day, across every worker "
        "process of the installation.",
    )


#: The longest AMQP short string, which ``user_id`` is.
_MAX_USER_BYTES = 255


def _broker_user_name(value: str) -> str:
    """A RabbitMQ user name as a ``user_id`` can carry it: 1 to 255 UTF-8 bytes, one line."""
    if not value or value.strip() != value:
        raise ValueError("a broker user name is not empty and has no surrounding spaces")
    if len(value.encode("utf-8", "surrogatepass")) > _MAX_USER_BYTES:
        raise ValueError(f"a broker user name has at most {_MAX_USER_BYTES} bytes (UTF-8)")
    if not value.isprintable():
        raise ValueError(f"{value!r}: a broker user name has no control characters")
    return value


BrokerUser = Annotated[str, AfterValidator(_broker_user_name)]


class TenantConfig(BaseModel):
    """One tenant and its applications."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    apps: dict[Name, AppConfig] = Field(default_factory=dict)
    publishers: tuple[BrokerUser, ...] = Field(
        default=(),
        description="RabbitMQ users allowed to submit this tenant's mails (their publishes' "
        "validated user_id); empty: anyone who may publish to the submit exchanges.",
    )

    @field_validator("publishers")
    @classmethod
    def _check_publishers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"{', '.join(map(repr, twice))} listed twice")
        return value


Role = Literal["viewer", "operator", "admin"]
_HASH_PATTERN = r"^(scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+|sha256\$[0-9a-f]{64})$"


class ConsoleUser(BaseModel):
    """Someone who may log in to the console: a role and the hash of a password."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    password_hash: SecretStr = Field(
        description="Made by `rohrpost console hash-password` (scrypt; the password itself is "
        "never stored)."
    )

    @field_validator("password_hash")
    @classmethod
    def _check_hash(cls, value: SecretStr) -> SecretStr:
        if not re.fullmatch(_HASH_PATTERN, value.get_secret_value()):
            raise ValueError("not a hash made by `rohrpost console hash-password`")
        return value


class ConsoleToken(BaseModel):
    """A bearer token for the console's JSON API: a role and the hash of the token."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    token_hash: SecretStr = Field(description="Made by `rohrpost console new-token`.")

    @field_validator("token_hash")
    @classmethod
    def _check_hash(cls, value: SecretStr) -> SecretStr:
        if not re.fullmatch(_HASH_PATTERN, value.get_secret_value()):
            raise ValueError("not a hash made by `rohrpost console new-token`")
        return value


class ConsoleSettings(BaseModel):
    """The web console (``rohrpost console``): where it listens and who may use it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8025, ge=0, le=65535)
    users: dict[Name, ConsoleUser] = Field(default_factory=dict)
    tokens: dict[Name, ConsoleToken] = Field(default_factory=dict)
    mask_recipients_for_viewers: bool = False
    secret_key_env: str = Field(
        default="ROHRPOST_CONSOLE_SECRET_KEY",
        description="Name of the environment variable holding the key that signs session "
        "cookies (never in the file). Unset: a random key per start (sessions end on restart).",
    )
    session_lifetime: Duration = timedelta(hours=12)
    root_path: str = Field(
        default="", description="Path prefix when served below a reverse proxy's path."
    )
    forwarded_allow_ips: str = Field(
        default="127.0.0.1",
        description="Proxies whose X-Forwarded-Proto/For headers are believed (uvicorn).",
    )

    def secret_key(self) -> SecretStr | None:
        """The cookie signing key from its environment variable, or None when unset."""
        value = os.environ.get(self.secret_key_env)
        return SecretStr(value) if value else None


class Settings(BaseSettings):
    """Everything a rohrpost process needs to know."""

    model_config = SettingsConfigDict(
        env_prefix="ROHRPOST_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    broker_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@127.0.0.1:5672/%2F"),
        description="RabbitMQ: one AMQP URL, or the URLs of a cluster's nodes (a list; in "
        "the environment comma-separated or a JSON array), tried in order.",
    )
    namespace: Name = "rohrpost"
    templates_dir: Path = Path("templates")
    max_delay: Duration = Field(
        default=timedelta(days=90),
        description="Longest delay one pass through the delay levels holds; longer ones take "
        "several passes.",
    )
    delivery_limit: int = Field(
        default=20,
        ge=1,
        description="x-delivery-limit of send queues and the history queue: deliveries "
        "before the broker dead-letters a message that keeps crashing workers or the "
        "history consumer.",
    )
    prefetch: int = Field(default=100, ge=1, description="Unacked mails per send queue consumer.")
    threads: int = Field(default=4, ge=1, description="SMTP sender threads per worker process.")
    publish_timeout: Duration = timedelta(seconds=30)
    render_timeout: Duration = Field(
        default=timedelta(seconds=5),
        description="Longest a mail's templates may render before it is dead-lettered "
        "template_error.",
    )
    max_render_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Most UTF-8 bytes a mail's templates may produce together; also the "
        "largest value (characters and items) a template may build or get as data.",
    )
    max_template_bytes: int = Field(
        default=256 * 1024, ge=1024, description="Largest template file rohrpost reads."
    )
    store_url: SecretStr = Field(
        default=SecretStr("sqlite:///rohrpost.db"),
        description="History store: sqlite:///file.db or postgresql+psycopg://user@host/db.",
    )
    redis_url: SecretStr | None = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="Shared state (Redis): which mail ids were submitted and sent. Empty: "
        "none, so a mail id is not checked for duplicates.",
    )
    management_url: SecretStr = Field(
        default=SecretStr(""),
        description="RabbitMQ's management API, asked by `rohrpost status` for the mails "
        "workers hold unacked: empty derives it from broker_url (http://HOST:15672, same "
        "user); `off` asks nothing.",
    )
    history_enabled: bool = Field(
        default=True, description="Declare the history queue; run a history consumer for it."
    )
    history_batch_size: int = Field(default=500, ge=1, le=10_000)
    history_batch_wait: Duration = timedelta(milliseconds=200)
    control_retention: Duration = Field(
        default=timedelta(days=400),
        description="How long the control stream keeps cancellations and pauses; longer "
        "than any mail waits.",
    )
    purge_interval: Duration = Field(
        default=timedelta(hours=1), description="How often the history consumer purges."
    )
    metrics_port: int = Field(
        default=9750,
        ge=0,
        le=65535,
        description="/metrics, /healthz, /readyz of `worker` and `run`; the history consumer "
        "alone uses the next port. 0 turns them off.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    smtp: dict[str, SmtpServer] = Field(default_factory=dict)
    tenants: dict[Name, TenantConfig] = Field(default_factory=dict)
    console: ConsoleSettings = ConsoleSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's contents arrive as init kwargs; the environment overrides them.
        return (env_settings, init_settings)

    @field_validator("broker_url", mode="before")
    @classmethod
    def _check_broker_url(cls, value: Any) -> SecretStr:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        return SecretStr(broker_addresses(text))

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_means_none(cls, value: Any) -> Any:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if text in ("", None) else value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and urlsplit(value.get_secret_value()).scheme not in (
            "redis",
            "rediss",
            "unix",
        ):
            raise ValueError("not a Redis URL; use redis://host:6379/0 (or rediss://, unix://)")
        return value

    @field_validator("store_url")
    @classmethod
    def _check_store_url(cls, value: SecretStr) -> SecretStr:
        # Checked without SQLAlchemy: a producer's install does not have it.
        scheme, sep, _ = value.get_secret_value().partition("://")
        backend = scheme.partition("+")[0]
        if not sep or not re.fullmatch(r"[a-z][a-z0-9]*(\+[a-z0-9_]+)?", scheme):
            raise ValueError(
                "not a database URL; use sqlite:///path/to/file.db or "
                "postgresql+psycopg://user:password@host:5432/database"
            )
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"{backend} is not supported; use sqlite or postgresql")
        driver = scheme.partition("+")[2]
        known, example = _STORE_DRIVERS[backend]
        if driver not in ("", known):  # the server extra installs no other
            raise ValueError(f"the driver {driver} is not supported; use {example}")
        if value.get_secret_value().partition("://")[2].partition("/")[0].count("@") > 1:
            # SQLAlchemy splits at the first @, and the driver's error then shows the
            # rest of the password as part of the host name
            raise ValueError("an @ in the user name or password must be written %40")
        return value

    @field_validator("render_timeout")
    @classmethod
    def _check_render_timeout(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than 0s")
        return value

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        for tenant, config in self.tenants.items():
            for app, app_config in config.apps.items():
                if app_config.smtp not in self.smtp:
                    known = ", ".join(sorted(self.smtp)) or "none"
                    raise ValueError(
                        f"tenants.{tenant}.apps.{app}.smtp: no SMTP server named "
                        f"{app_config.smtp!r} (known: {known})"
                    )
        return self

    @property
    def delay_levels(self) -> int:
        """Number of (octal) delay levels needed for ``max_delay``."""
        return DelayLevels.covering(self.namespace, self.max_delay.total_seconds()).count

    def routes(self) -> list[tuple[str, str]]:
        """Every enabled (tenant, app) pair, sorted."""
        return sorted(
            (tenant, app)
            for tenant, config in self.tenants.items()
            for app, app_config in config.apps.items()
            if app_config.enabled
        )

    @property
    def broker_user(self) -> str:
        """The RabbitMQ user this installation connects as: the user_id of its publishes."""
        return broker_user(self.broker_url.get_secret_value())

    def publishers(self, tenant: str) -> frozenset[str] | None:
        """Who may submit ``tenant``'s mails: its ``publishers`` and this installation's
        own user (which re-publishes them), or None when anyone may (none listed)."""
        config = self.tenants.get(tenant)
        if config is None or not config.publishers:
            return None
        return frozenset((*config.publishers, self.broker_user))

    def app(self, tenant: str, app: str) -> AppConfig | None:
        """The configuration of tenant/app, or None when it is not configured."""
        config = self.tenants.get(tenant)
        return config.apps.get(app) if config else None

    def secrets(self) -> list[str]:
        """Every secret value the configuration refers to, for scrubbing logs."""
        found = []
        urls = [*split_nodes(self.broker_url.get_secret_value()), self.store_url.get_secret_value()]
        for optional in (self.redis_url, self.management_url):
            if optional is not None:
                urls.append(optional.get_secret_value())
        for url in urls:
            password = urlsplit(url).password
            if password:
                found += [password, unquote(password)]  # as written, and as a driver sees it
        for server in self.smtp.values():
            if server.password_env and os.environ.get(server.password_env):
                found.append(os.environ[server.password_env])
        if key := self.console.secret_key():
            found.append(key.get_secret_value())
        return found


def config_path(explicit: str | os.PathLike[str] | None) -> Path | None:
    """Pick the config file: ``--config``, else ``$ROHRPOST_CONFIG``, else ``./rohrpost.toml``."""
    if explicit is not None:
        return Path(explicit)
    if env := os.environ.get("ROHRPOST_CONFIG"):
        return Path(env)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.exists() else None


#: ``ROHRPOST_*`` variables that are no setting but are read all the same (the config
#: file's path; the image tag deploy/compose.yaml takes from deploy/.env).
_OTHER_VARIABLES = frozenset({"ROHRPOST_CONFIG", "ROHRPOST_TAG"})
_ENV_PREFIX = "ROHRPOST_"


def stray_variables(settings: Settings) -> list[str]:
    """``ROHRPOST_*`` variables that set nothing (a misspelt setting is ignored silently
    otherwise), each with the setting it probably meant, if one is close."""
    named = {settings.console.secret_key_env} | {
        server.password_env for server in settings.smtp.values() if server.password_env
    }
    fields = {name.upper() for name in Settings.model_fields}
    found = []
    for variable in sorted(os.environ):
        upper = variable.upper()
        if not upper.startswith(_ENV_PREFIX) or upper.startswith(_ENV_PREFIX + "TEST_"):
            continue
        head = upper.removeprefix(_ENV_PREFIX).partition("__")[0]
        if head in fields or variable in named or upper in _OTHER_VARIABLES:
            continue
        close = difflib.get_close_matches(head, fields, n=1)
        found.append(f"{variable}" + (f" (did you mean {_ENV_PREFIX}{close[0]}?)" if close else ""))
    return found


def load_settings(explicit: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (if any), then ``overrides``, then ``ROHRPOST_*`` variables.

    Raises ConfigError naming the file and the bad key.
    """
    path = config_path(explicit)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(
            f"{_origin(exc, path)}: {describe_validation_error(exc, whole=None)}"
        ) from exc


def _origin(exc: ValidationError, path: Path | None) -> str:
    """Where the refused values came from: the file, ``ROHRPOST_*`` variables, or both."""
    variables: list[str] = []
    from_file = False
    set_names = {name.upper() for name in os.environ}  # pydantic-settings ignores case
    for error in exc.errors(include_url=False):
        parts = [str(part).upper() for part in error["loc"] if part != "[key]"]
        # ROHRPOST_SMTP__LOCAL__PORT sets smtp.local.port, as does ROHRPOST_SMTP (JSON)
        names = ["ROHRPOST_" + "__".join(parts[:n]) for n in range(len(parts), 0, -1)]
        name = next((name for name in names if name in set_names), None)
        if name is None:
            from_file = True
        elif name not in variables:
            variables.append(name)
    where = [f"config file {path}" if path else "configuration"] if from_file else []
    if variables:
        noun = "environment variable" if len(variables) == 1 else "environment variables"
        where.append(f"{noun} {', '.join(variables)}")
    return " and ".join(where)


def settings_from_mapping(data: dict[str, Any]) -> Settings:
    """Validate a mapping into Settings without reading the environment (tests, the demo)."""
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"configuration: {describe_validation_error(exc, whole=None)}") from exc
