"""JSON Schemas of the wire formats, generated from the models into ``shared/schema/``.

Producers in other languages validate against these files; a test fails when the
committed files drift from the models (``rohrpost schema -o shared/schema``
regenerates them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rohrpost.shared.container import SCHEMA_VERSION, MailContainer
from rohrpost.shared.events import EVENT_SCHEMA_VERSION, MailEvent

SCHEMA_DIR = Path(__file__).parent / "schema"


def schemas() -> dict[str, dict[str, Any]]:
    """File name → JSON Schema, for every wire format."""
    return {
        f"mail-container.v{SCHEMA_VERSION}.json": _with_id(
            MailContainer.model_json_schema(by_alias=True), "mail-container", SCHEMA_VERSION
        ),
        f"mail-event.v{EVENT_SCHEMA_VERSION}.json": _with_id(
            MailEvent.model_json_schema(by_alias=True), "mail-event", EVENT_SCHEMA_VERSION
        ),
    }


def _with_id(schema: dict[str, Any], name: str, version: int) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://rohrpost.invalid/schema/{name}.v{version}.json",
        **schema,
    }


def render(schema: dict[str, Any]) -> str:
    """The schema as committed: sorted keys, two-space indent, final newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    """Write every schema into ``directory``; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in schemas().items():
        path = directory / name
        path.write_text(render(schema))
        written.append(path)
    return written
