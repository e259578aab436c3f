"""Opening the history store and migrating its schema."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from rohrpost.shared.errors import StoreError, StoreUnavailable

MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the CLI read while the history consumer writes; foreign keys make
    # purges cascade; busy_timeout rides out short locks instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


#: libpq settings a PostgreSQL store gets unless its URL sets them (``?connect_timeout=``
#: and so on). Without them a server that accepts the connection but never answers, or a
#: host that vanished without a reset, holds the caller for as long as the kernel's
#: TCP defaults allow (hours): the history consumer would stop archiving, still report
#: itself ready, and not exit on SIGTERM. With them a connection attempt gives up after
#: 10 s, and a dead peer is noticed within about a minute (keepalives probe an idle
#: connection, tcp_user_timeout bounds data the peer never acknowledges).
POSTGRESQL_DEFAULTS: dict[str, int] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}


def create_store_engine(url: str) -> Engine:
    """An engine for ``url`` (``sqlite:///file.db`` or ``postgresql+psycopg://…``)."""
    parsed = make_url(url)
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        connect_args = {k: v for k, v in POSTGRESQL_DEFAULTS.items() if k not in parsed.query}
    engine = create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    """The newest migration this version of rohrpost knows."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The migration the store is at (None when it has never been migrated)."""
    # Alembic says "Context impl SQLiteImpl." at INFO whenever it looks: noise on the
    # stderr of every read-only command.
    chatty = logging.getLogger("alembic.runtime.migration")
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        with translate_errors(), engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        chatty.setLevel(level)


def migrate(engine: Engine) -> str:
    """Bring the store's schema to the newest migration; return that revision."""
    config = _alembic_config()
    with translate_errors(), engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    return head_revision()


def require_migrated(engine: Engine) -> None:
    """Raise StoreError unless the store's schema is at the newest migration."""
    current = current_revision(engine)
    if current != head_revision():
        raise StoreError(
            f"the history store is at schema {current or 'none'}, this rohrpost needs "
            f"{head_revision()}: run `rohrpost store migrate`"
        )


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn database driver errors into StoreUnavailable (may pass) or StoreError (will not)."""
    try:
        yield
    except OperationalError as exc:
        if _beyond_a_limit(exc.orig):
            raise StoreError(f"history store error: {exc.orig}") from exc
        raise StoreUnavailable(f"history store unavailable: {exc.orig}") from exc
    except IntegrityError as exc:
        if _sqlstate(exc.orig) != "23505":
            raise StoreError(f"history store error: {exc.orig}") from exc
        # A unique key another writer took meanwhile (two history consumers storing
        # the same new mail): the retry finds its row and updates it.
        raise StoreUnavailable(f"history store conflict with another writer: {exc.orig}") from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise StoreUnavailable(f"history store unavailable: {exc.orig}") from exc
        raise StoreError(f"history store error: {exc.orig}") from exc
    except Exception as exc:
        # psycopg's own errors, from statements the PostgreSQL sink runs on the driver
        # connection (COPY), classified as SQLAlchemy's wrappers are above.
        if not type(exc).__module__.startswith("psycopg"):
            raise
        raise _driver_error(exc) from exc


def _driver_error(exc: Exception) -> StoreError:
    import psycopg

    state = _sqlstate(exc)
    if state == "23505" or (
        isinstance(exc, psycopg.OperationalError) and not state.startswith("54")
    ):
        return StoreUnavailable(f"history store unavailable: {exc}")
    return StoreError(f"history store error: {exc}")


def _sqlstate(error: object) -> str:
    return str(getattr(error, "sqlstate", None) or "")


def _beyond_a_limit(error: object) -> bool:
    # psycopg files PostgreSQL's class 54 (a value beyond a limit, such as an index
    # row too large) under OperationalError, but no retry will ever store it.
    return _sqlstate(error).startswith("54")
