"""The benchmark's mails: a template (subject, text, HTML, 5 line items), distinct recipients."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).parent / "templates"
TENANT, APP, TEMPLATE = "acme", "shop", "invoice"


def data(i: int) -> dict[str, Any]:
    """Template data of mail number ``i``."""
    lines = [
        {"name": f"Article {k}", "number": 1000 + k, "items": k + 1, "price": 4.5 * (k + 1)}
        for k in range(5)
    ]
    total = sum(line["items"] * line["price"] for line in lines)
    return {"customer": f"Customer {i}", "number": 100_000 + i, "lines": lines, "total": total}


def recipient(i: int) -> str:
    """A distinct recipient for mail number ``i``."""
    return f"customer{i}@example.com"


def mails(count: int, not_before: datetime | None = None) -> Iterator[dict[str, Any]]:
    """``count`` mail containers (history ``keep``), optionally all due at ``not_before``."""
    for i in range(count):
        mail: dict[str, Any] = {
            "tenant": TENANT,
            "app": APP,
            "template": TEMPLATE,
            "to": [recipient(i)],
            "data": data(i),
            "history": "keep",
        }
        if not_before is not None:
            mail["not_before"] = not_before.isoformat()
        yield mail
