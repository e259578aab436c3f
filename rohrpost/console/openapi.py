"""The OpenAPI document of ``/api/v1``, generated from the list of pages."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from rohrpost.console.pages import API
from rohrpost.console.site import PAGES

_PARAMETER = re.compile(r"{(\w+)}")
_ERRORS = {
    "400": "bad input",
    "401": "no valid token or session",
    "403": "the role does not allow it, or a missing CSRF token (sessions)",
    "404": "no such thing",
    "409": "the action cannot be done now (the message says why)",
    "413": "request larger than 17 MiB",
    "422": "invalid input; `errors` names each field",
    "503": "RabbitMQ or the history store cannot be reached",
}


def _version() -> str:
    try:
        return version("rohrpost")
    except PackageNotFoundError:
        return "unknown"


def _operation(summary: str, tags: tuple[str, ...], path: str, method: str) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "tags": list(tags),
        "parameters": [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PARAMETER.findall(path)
        ],
        "responses": {
            "200": {
                "description": "the page's data as JSON (actions: a message and a `redirect` link)",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            **{code: {"description": text} for code, text in _ERRORS.items()},
        },
    }
    if method == "post":
        operation["requestBody"] = {"content": {"application/json": {"schema": {"type": "object"}}}}
    return operation


def document(root_path: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document."""
    paths: dict[str, Any] = {}
    for page in PAGES:
        if not page.api:
            continue
        entry = paths.setdefault(API + page.path, {})
        for method in page.methods:
            entry[method.lower()] = _operation(page.summary, page.tags, page.path, method.lower())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "rohrpost console API",
            "version": _version(),
            "description": "The reads and actions of the operators' console, as JSON. "
            "Authenticate with `Authorization: Bearer TOKEN` ([console.tokens.NAME]).",
        },
        "servers": [{"url": root_path or "/"}],
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
