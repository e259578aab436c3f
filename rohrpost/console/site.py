"""Every page of the console: its path, view, template, and the permission it needs.

Each is served as HTML at its path and as JSON under ``/api/v1`` (see ``pages``);
the OpenAPI document is generated from this list.
"""

from __future__ import annotations

from rohrpost.console.pages import Page
from rohrpost.console.views import bulk, deadletters, editing, history, overview, tenants

_POST = ("POST",)

PAGES = [
    Page(
        "/overview",
        overview.overview_page,
        "overview.html",
        "Every tenant/app at a glance (filters: tenant, app): `overview` is the object "
        "`rohrpost status --json` prints; a source that cannot be read leaves its figures "
        "null and is named in `problems`",
        tags=("overview",),
    ),
    Page(
        "/overview/figures",
        overview.overview_page,
        "overview_figures.html",
        "The overview's figures alone (HTML), which the page fetches again every few seconds",
        api=False,
        tags=("overview",),
    ),
    Page(
        "/dead-letters",
        deadletters.dead_letter_list,
        "dead_letters.html",
        "Dead letters, newest first (filters: tenant, app, reason, since, until, q; page)",
        tags=("dead letters",),
    ),
    Page(
        "/dead-letters/retry",
        bulk.bulk_retry,
        "confirm.html",
        "Re-submit a selection (scope=selected, ids) or the filtered set (scope=filtered, "
        "filters); answers the count until confirm equals it, then starts a job",
        methods=_POST,
        action="retry",
        tags=("dead letters",),
    ),
    Page(
        "/dead-letters/purge",
        bulk.bulk_purge,
        "confirm.html",
        "Delete a selection or the filtered set for good (as retry: confirm the count)",
        methods=_POST,
        action="purge",
        tags=("dead letters",),
    ),
    Page(
        "/dead-letters/{mail_id}",
        deadletters.dead_letter_detail,
        "dead_letter.html",
        "One dead letter: container, dead-letter headers, last SMTP reply, dry-run preview",
        tags=("dead letters",),
    ),
    Page(
        "/dead-letters/{mail_id}/edit",
        editing.edit_dead_letter,
        "edit.html",
        "Correct a dead letter: POST {container, step: preview|save}; errors name the field",
        methods=("GET", "POST"),
        action="edit",
        tags=("dead letters",),
    ),
    Page(
        "/dead-letters/{mail_id}/retry",
        bulk.retry_one,
        "problem.html",
        "Re-submit one dead letter now",
        methods=_POST,
        action="retry",
        tags=("dead letters",),
    ),
    Page(
        "/invalid-letters/{letter_id}",
        deadletters.invalid_letter_detail,
        "invalid_letter.html",
        "A dead letter that is not a mail container: the start of its bytes",
        tags=("dead letters",),
    ),
    Page("/jobs/{job_id}", bulk.job_detail, "job.html", "A bulk action's progress", tags=("jobs",)),
    Page(
        "/mails",
        history.mail_list,
        "mails.html",
        "Search the history (to, tenant, app, status, tag, id prefix, since, until; after)",
        tags=("history",),
    ),
    Page(
        "/mails/{mail_id}",
        history.mail_detail,
        "mail.html",
        "One mail and its timeline",
        tags=("history",),
    ),
    Page(
        "/mails/{mail_id}/resend",
        history.resend_mail,
        "problem.html",
        "Submit an archived mail again as a new mail",
        methods=_POST,
        action="resend",
        tags=("history",),
    ),
    Page(
        "/mails/{mail_id}/cancel",
        history.cancel_mail,
        "problem.html",
        "Stop a queued or scheduled mail",
        methods=_POST,
        action="cancel",
        tags=("history",),
    ),
    Page(
        "/mails/{mail_id}/send-now",
        history.send_now_mail,
        "problem.html",
        "Send a scheduled or retrying mail now instead of when it is due",
        methods=_POST,
        action="send-now",
        tags=("history",),
    ),
    Page(
        "/mails/{mail_id}/hold",
        history.hold_mail,
        "problem.html",
        "Hold a queued, scheduled or retrying mail: set aside when due, until released",
        methods=_POST,
        action="hold",
        tags=("history",),
    ),
    Page(
        "/mails/{mail_id}/release",
        history.release_mail,
        "problem.html",
        "Release a held mail (back into its send queue when already set aside)",
        methods=_POST,
        action="release",
        tags=("history",),
    ),
    Page(
        "/tenants",
        tenants.tenant_list,
        "tenants.html",
        "Tenants and apps, with the pauses in force",
        tags=("tenants",),
    ),
    Page(
        "/tenants/{tenant}/pause",
        tenants.pause_scope,
        "problem.html",
        "Pause a tenant",
        methods=_POST,
        action="pause",
        tags=("tenants",),
    ),
    Page(
        "/tenants/{tenant}/resume",
        tenants.resume_scope,
        "problem.html",
        "Resume a tenant",
        methods=_POST,
        action="resume",
        tags=("tenants",),
    ),
    Page(
        "/tenants/{tenant}/{app}/pause",
        tenants.pause_scope,
        "problem.html",
        "Pause one app of a tenant",
        methods=_POST,
        action="pause",
        tags=("tenants",),
    ),
    Page(
        "/tenants/{tenant}/{app}/resume",
        tenants.resume_scope,
        "problem.html",
        "Resume one app of a tenant",
        methods=_POST,
        action="resume",
        tags=("tenants",),
    ),
    Page(
        "/audit",
        tenants.audit_list,
        "audit.html",
        "Every operator action, newest first (tenant, before)",
        tags=("audit",),
    ),
    Page(
        "/users",
        tenants.user_list,
        "users.html",
        "Users and API tokens with their roles",
        action="view-users",
        tags=("users",),
    ),
]
