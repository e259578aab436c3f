"""Editing a dead letter: a form (or the raw JSON), checked by the model, previewed, saved.

Nothing moves until the corrected container is valid; each error is shown next to
the field it names. Saving goes through ``DeadLetterQueue.edit`` (the corrected copy
is confirmed in the queue before the original is removed) and the history records
the edit with its diff and the user.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from rohrpost.console.pages import Invalid, ViewContext
from rohrpost.console.views.deadletters import found_dead_letter, preview_data
from rohrpost.operations.edits import FIXED_FIELDS, diff
from rohrpost.shared.container import MailContainer
from rohrpost.shared.store import MailHistory

LIST_FIELDS = ("to", "cc", "bcc", "reply_to")
TEXT_FIELDS = ("subject", "text", "html", "template", "not_before", "expires_at")
FORM_FIELDS = (*LIST_FIELDS, *TEXT_FIELDS, "data", "headers", "tags", "max_attempts", "history")


def form_values(container: dict[str, Any]) -> dict[str, str]:
    """The form's fields for ``container``: lists one per line, JSON for data and headers."""
    values = {name: "\n".join(container.get(name) or []) for name in LIST_FIELDS}
    values |= {name: str(container.get(name) or "") for name in TEXT_FIELDS}
    values["data"] = json.dumps(container.get("data") or {}, indent=2, ensure_ascii=False)
    values["headers"] = json.dumps(container.get("headers") or {}, indent=2, ensure_ascii=False)
    values["tags"] = ", ".join(container.get("tags") or [])
    values["max_attempts"] = str(container.get("max_attempts") or "")
    values["history"] = str(container.get("history") or "keep")
    return values


def _json_field(text: str, name: str, errors: dict[str, str]) -> Any:
    try:
        return json.loads(text) if text.strip() else {}
    except RecursionError:
        errors[name] = "nests too deeply"
    except ValueError as exc:
        errors[name] = f"not JSON: {exc}"
    return None


def _from_form(
    values: dict[str, str], base: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """``base`` with the form's fields put in; and the fields that could not be read."""
    errors: dict[str, str] = {}
    edited = dict(base)
    for name in LIST_FIELDS:
        edited[name] = [line.strip() for line in values.get(name, "").splitlines() if line.strip()]
    for name in TEXT_FIELDS:
        text = values.get(name, "")
        edited[name] = text if text.strip() else None
    for name in ("data", "headers"):
        edited[name] = _json_field(values.get(name, ""), name, errors)
    edited["tags"] = [t.strip() for t in values.get("tags", "").split(",") if t.strip()]
    attempts = values.get("max_attempts", "").strip()
    edited["max_attempts"] = int(attempts) if attempts.isdigit() else (attempts or None)
    edited["history"] = values.get("history") or "keep"
    return {k: v for k, v in edited.items() if v not in (None, [], {}) or k in base}, errors


def _field_errors(exc: ValidationError, raw: bool) -> dict[str, str]:
    """Each pydantic error under the form field it concerns (all under ``raw`` in JSON mode)."""
    errors: dict[str, str] = {}
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        field = str(loc[0]) if loc else "container"
        field = "from" if field == "from_" else field
        where = ".".join(str(p) for p in loc) or "container"
        message = f"{where}: {error['msg'].removeprefix('Value error, ')}"
        key = "raw" if raw or field not in FORM_FIELDS else field
        errors[key] = f"{errors[key]}; {message}" if key in errors else message
    return errors


def _candidate(
    ctx: ViewContext, base: dict[str, Any]
) -> tuple[dict[str, Any], bool, dict[str, str]]:
    """The corrected container the request proposes, whether it came as raw JSON, and errors."""
    if not ctx.inputs.form:  # the API sends {"container": {...}}
        container = ctx.inputs.value("container")
        if not isinstance(container, dict):
            return {}, True, {"container": "send the corrected container as a JSON object"}
        return container, True, {}
    if ctx.inputs.get("mode") == "raw":
        errors: dict[str, str] = {}
        parsed = _json_field(ctx.inputs.get("raw"), "raw", errors)
        if not errors and not isinstance(parsed, dict):
            errors["raw"] = "must be one JSON object (a mail container)"
        return (parsed if isinstance(parsed, dict) else {}), True, errors
    values = {name: ctx.inputs.get(name) for name in FORM_FIELDS}
    edited, errors = _from_form(values, base)
    return edited, False, errors


def _checked(candidate: dict[str, Any], base: dict[str, Any], raw: bool) -> dict[str, str]:
    try:
        MailContainer.model_validate(candidate)
    except ValidationError as exc:
        return _field_errors(exc, raw)
    fixed = [f for f in FIXED_FIELDS - {"created_at", "schema_version"} if f in base]
    if any(str(candidate.get(f)) != str(base.get(f)) for f in fixed):
        return {"raw": f"{', '.join(sorted(fixed))} cannot be edited"}
    return {}


def _page(found: MailHistory, values: dict[str, str], raw_text: str, mode: str) -> dict[str, Any]:
    return {
        "mail": found.mail.model_dump(mode="json"),
        "values": values,
        "raw": raw_text,
        "mode": mode,
        "preview": None,
        "changes": None,
        "errors": {},
    }


async def edit_dead_letter(ctx: ViewContext) -> dict[str, Any]:
    """GET: the form. POST: check, then preview (``step=preview``) or save (``step=save``)."""
    found = await found_dead_letter(ctx)
    ctx.require("edit", found.mail.tenant)
    base = found.container or {}
    if ctx.request.method == "GET":
        raw_text = json.dumps(base, indent=2, ensure_ascii=False)
        return _page(found, form_values(base), raw_text, ctx.query.get("mode", "form"))
    candidate, raw, errors = _candidate(ctx, base)
    mode = "raw" if raw else "form"
    raw_text = ctx.inputs.get("raw") if mode == "raw" else json.dumps(candidate, indent=2)
    values = {name: ctx.inputs.get(name) for name in FORM_FIELDS} if not raw else form_values(base)
    page = _page(found, values, raw_text, mode)
    errors = errors or _checked(candidate, base, raw)
    if errors:
        raise Invalid({k: describe(v) for k, v in errors.items()}, page)
    normalised = json.loads(
        MailContainer.model_validate(candidate).model_dump_json(by_alias=True, exclude_none=True)
    )
    if ctx.inputs.get("step", "preview") != "save":
        preview = await ctx.call(ctx.console.service.preview, normalised)
        return {
            **page,
            "preview": preview_data(preview),
            "changes": diff(base, normalised),
            "validated": json.dumps(normalised, indent=2, ensure_ascii=False),
        }
    actor = ctx.actor.audit_name
    changes = await ctx.call(
        ctx.console.service.edit, actor, str(found.mail.id), found.mail.tenant, normalised
    )
    return {
        "redirect": f"/dead-letters/{found.mail.id}",
        "message": f"saved: {len(changes)} change(s)" if changes else "nothing changed",
        "changes": changes,
    }


def describe(message: str) -> str:
    """An error message, without pydantic's noise."""
    return message.removeprefix("Value error, ")
