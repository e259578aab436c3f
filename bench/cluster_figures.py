"""What ``python -m bench cluster`` reports: deliveries, the history, and each outage."""

from __future__ import annotations

import itertools
import json
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select

from rohrpost.catcher import CaughtMail
from rohrpost.shared.store import tables
from rohrpost.shared.store.writer import TERMINAL

#: How long after a kill (at most: until the next one) pauses and reconnections are looked for.
WINDOW = 60.0


def deliveries(caught: Iterable[CaughtMail], ids: dict[str, uuid.UUID]) -> Counter[uuid.UUID]:
    """SMTP deliveries per mail id (recipient → id: every mail has its own recipient)."""
    return Counter(ids[address] for mail in caught for address in mail.recipients)


def delivery_figures(
    mails: int, confirmed: set[uuid.UUID], delivered: Counter[uuid.UUID]
) -> dict[str, Any]:
    copies = sum(delivered.values())
    return {
        "mails submitted": mails,
        "confirmed": len(confirmed),
        "not confirmed": mails - len(confirmed),
        "confirmed and delivered": len(confirmed & set(delivered)),
        "confirmed, never delivered": len(confirmed - set(delivered)),
        "SMTP deliveries": copies,
        "duplicates (deliveries beyond the first)": copies - len(delivered),
        "mails delivered more than once": sum(1 for n in delivered.values() if n > 1),
    }


def history_figures(store_url: str, confirmed: set[uuid.UUID]) -> dict[str, Any]:
    """Status of every mail, and how many terminal states each has in its timeline."""
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            status = dict(conn.execute(select(tables.mails.c.id, tables.mails.c.status)).all())
            ends = Counter(
                dict(
                    conn.execute(
                        select(
                            tables.events.c.mail_id,
                            func.count(tables.events.c.kind.distinct()),
                        )
                        .where(tables.events.c.kind.in_(TERMINAL))
                        .group_by(tables.events.c.mail_id)
                    ).all()
                )
            )
            dropped = conn.execute(
                select(func.count()).where(tables.events.c.kind == "duplicate")
            ).scalar_one()
    finally:
        engine.dispose()
    return {
        "history: status of the confirmed mails": dict(
            Counter(status.get(mail_id, "missing") for mail_id in confirmed)
        ),
        "history: mails with exactly one terminal state": sum(
            1 for mail_id in status if ends[mail_id] == 1
        ),
        "history: mails with none or several": sum(1 for mail_id in status if ends[mail_id] != 1),
        "history: copies dropped as duplicates (events)": dropped,
    }


def terminal_count(store_url: str) -> int:
    """Mails the history holds in a terminal state (0 while the store is not there yet)."""
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(tables.mails.c.status.in_(TERMINAL))
                ).scalar_one()
            )
    except Exception:
        return 0
    finally:
        engine.dispose()


def longest_pause(times: Iterable[float], since: float, until: float) -> float:
    """The longest stretch from ``since`` without any of ``times``, up to the last before
    ``until``."""
    inside = sorted(t for t in times if since <= t < until)
    if not inside:
        return round(until - since, 2)
    edges = [since, *inside]
    return round(max(b - a for a, b in itertools.pairwise(edges)), 2)


def reconnections(log: Path, since: float, until: float) -> dict[str, str]:
    """Per kind of connection: how many reconnected between ``since`` and ``until``, when
    the last of them did (seconds after ``since``), and to which node."""
    found: dict[str, list[tuple[float, str]]] = {}
    for line in log.read_text(errors="replace").splitlines():
        if '"connected to broker"' not in line:
            continue
        fields = json.loads(line)
        at = datetime.fromisoformat(fields["timestamp"].replace("Z", "+00:00")).timestamp()
        if since <= at <= until:
            name = str(fields.get("connection", "?")).split(":")[0]
            found.setdefault(name, []).append((round(at - since, 2), str(fields.get("node"))))
    return {
        name: f"{len(seen)} reconnected, the last after {max(seen)[0]} s (to {max(seen)[1]})"
        for name, seen in sorted(found.items())
    }


def failures(result: dict[str, Any]) -> list[str]:
    """What the run should have shown and did not (empty: it passed)."""
    default_node = (
        "error" not in result.get("default node afterwards", {"error": ""}),
        "default node",
    )
    if "mails submitted" not in result:  # --teardown: only the default node to check
        return [] if default_node[0] else [default_node[1]]
    checks = [
        (result.get("confirmed, never delivered") == 0, "confirmed mails were not delivered"),
        (
            result.get("duplicates (deliveries beyond the first)", 0)
            <= result.get("duplicates allowed (workers x prefetch)", 0),
            "more duplicates than the workers could hold",
        ),
        (result.get("history: mails with none or several") == 0, "not one terminal state each"),
        (
            set(result.get("history: status of the confirmed mails", {})) == {"sent"},
            "not every confirmed mail is sent in the history",
        ),
        (len(result.get("cluster afterwards", [])) == 3, "a killed node did not rejoin"),
        default_node,
    ]
    return [message for passed, message in checks if not passed]
