"""Templates cannot stop a worker: time and size limits, unreadable files, other tenants' files."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rohrpost.catcher import MailCatcher
from rohrpost.consumer.render import RenderLimits, TemplateRenderer
from rohrpost.consumer.watchdog import RenderTimeout, RenderWatchdog
from rohrpost.producer.client import Producer
from rohrpost.shared.container import MailContainer
from rohrpost.shared.errors import ConfigError, RenderError
from rohrpost.shared.settings import Settings
from rohrpost.shared.wire import ATTEMPTS_HEADER, ERROR_HEADER, REASON_HEADER
from tests.conftest import WorkerThread, dead_letters, declare, drain, wait_until

RECIPIENT = "anna@example.com"
#: render_timeout of these tests; a hostile mail must end within it plus MARGIN.
LIMIT = 1.0
#: Broker round trips and a machine shared with other test runs.
MARGIN = 5.0
SECRET = "globex-secret-4711"
TIMEOUT = "render_timeout"
TOO_LARGE = "max_render_bytes"

#: Hostile templates (text.j2) and a word of the reason each must be dead-lettered with.
HOSTILE: dict[str, tuple[str, tuple[str, ...]]] = {
    "huge_power": ("{{ 10 ** (10 ** 8) }}", ("bits",)),
    "power_of_a_variable": ("{% set n = 100000000 %}{{ 9 ** n }}", ("bits",)),
    "string_repetition": ("{{ 'x' * 10**10 }}", (TOO_LARGE,)),
    "list_repetition": ("{{ [0] * 10**9 }}", (TOO_LARGE,)),
    "range_product": ("{{ (range(100000)|list) * 100000 }}", (TOO_LARGE,)),
    "printf_width": ("{{ '%0999999999d' % 1 }}", ("width",)),
    "printf_star_width": ("{{ '%*d' % (999999999, 1) }}", ("'*' widths",)),
    "format_filter_width": ("{{ '%0999999999d'|format(1) }}", ("width",)),
    "str_format_width": ("{{ '{:>999999999}'.format(1) }}", ("width",)),
    "str_format_nested_width": ("{{ '{0:{1}}'.format('x', 999999999) }}", ("width",)),
    "printf_many_wide_fields": ("{{ ('%1000000d' * 1000) % ((1,) * 1000) }}", (TOO_LARGE,)),
    "str_format_many_wide_fields": (
        "{{ ('{:1000000}' * 1000).format(*range(1000)) }}",
        (TOO_LARGE,),
    ),
    "center": ("{{ 'x'|center(999999999) }}", (TOO_LARGE,)),
    "indent": ("{{ 'x\ny'|indent(10**9) }}", (TOO_LARGE,)),
    "wordwrap": ("{{ ('x ' * 100000)|wordwrap(1, wrapstring='y' * 100000) }}", (TOO_LARGE,)),
    "replace": ("{{ ('x' * 100000)|replace('', 'y' * 100000) }}", (TOO_LARGE,)),
    "join_separator": ("{{ range(100000)|join('y' * 100000) }}", (TOO_LARGE,)),
    "batch_fill": ("{{ [1]|batch(999999999, 'x')|list }}", (TOO_LARGE,)),
    "slice_count": ("{{ [1]|slice(999999999)|list }}", (TOO_LARGE,)),
    "round_precision": ("{{ 1.5|round(999999999, 'ceil') }}", ("precision",)),
    "tojson_indent": ("{{ [[1]]|tojson(indent=999999999) }}", (TOO_LARGE,)),
    "filters_chained": ("{{ 'aaaa'" + "|list|string" * 30 + " }}", (TOO_LARGE,)),
    "str_ljust": ("{{ 'x'.ljust(10**9) }}", (TOO_LARGE,)),
    "str_expandtabs": ("{{ ('\t' * 100000).expandtabs(100000) }}", (TOO_LARGE,)),
    "str_replace": ("{{ ('x' * 100000).replace('', 'y' * 100000) }}", (TOO_LARGE,)),
    # the 100,000 strings take the sandbox ~0.5 s to make: on a busy machine the timeout comes first
    "str_join": ("{{ ('y' * 100000).join(range(100000)|map('string')) }}", (TOO_LARGE, TIMEOUT)),
    "str_translate": ("{{ ('x' * 100000).translate({120: 'y' * 100000}) }}", (TOO_LARGE,)),
    "int_to_bytes": ("{{ (1).to_bytes(10**9, 'big') }}", (TOO_LARGE,)),
    "lipsum": ("{{ lipsum(1000000, max=1000000) }}", (TOO_LARGE,)),
    "nested_loops_without_output": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        (TIMEOUT,),
    ),
    "nested_loops_with_output": (
        "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
        (TOO_LARGE,),
    ),
    "many_large_outputs": (
        "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
        (TOO_LARGE,),
    ),
    "macro_recursion": ("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}", ("Recursion",)),
    "macro_exponential": (
        "{% macro m(n) %}{% if n %}{{ m(n-1) }}{{ m(n-1) }}{% endif %}{% endmacro %}{{ m(40) }}",
        (TIMEOUT,),
    ),
    "include_itself": ('{% include "evil/text.j2" %}', ("Recursion",)),
    "string_doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        (TOO_LARGE,),
    ),
    "captured_output_doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
        "{% set b %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = b %}{% endfor %}",
        (TOO_LARGE,),
    ),
    "shared_list_doubling": (
        "{% set ns = namespace(a=[0]) %}{% for i in range(64) %}"
        "{% set ns.a = [ns.a, ns.a] %}{% endfor %}{{ ns.a }}",
        (TOO_LARGE, TIMEOUT),
    ),
    "varargs_doubling": (
        "{% macro d(n) %}{% if n %}{{ d(n-1, varargs, varargs) }}"
        "{% else %}{{ varargs }}{% endif %}{% endmacro %}{{ d(60) }}",
        (TOO_LARGE, TIMEOUT),
    ),
    "shared_dict_values": ("{{ {}.fromkeys(range(100000), 'x' * 100000) }}", (TOO_LARGE,)),
    "deep_nesting": (
        "{% set ns = namespace(t=()) %}{% for i in range(100000) %}"
        "{% set ns.t = (ns.t,) %}{% endfor %}{{ {ns.t: 1} }}",
        ("levels deep",),
    ),
    "concatenation": ("{% set s = 'x' * 1000000 %}{{ s ~ s ~ s ~ s }}", (TOO_LARGE,)),
    "format_repeated_field": (
        "{% set s = 'x' * 1000000 %}{{ ('{0}' * 100).format(s) }}",
        (TOO_LARGE,),
    ),
    "printf_repeated_key": (
        "{% set s = 'x' * 1000000 %}{{ ('%(a)s' * 100) % {'a': s} }}",
        (TOO_LARGE,),
    ),
    "imported_template_body": ('{% import "big.j2" as m %}{{ m }}', (TOO_LARGE,)),
    "autoescape_expression": (
        "{% autoescape 'x'|center(999999999) %}x{% endautoescape %}",
        (TOO_LARGE,),
    ),
    "list_grown_in_place": (
        "{% set l = [1] %}{% for i in range(64) %}{{ l.extend(l) }}{% endfor %}",
        ("unsafe",),
    ),
}
#: An imported template whose output is too large (``imported_template_body``).
BIG_IMPORT = "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}"


def write(templates: Path, path: str, text: str | bytes) -> Path:
    """Write ``templates/path`` (parents created)."""
    file = templates / path
    file.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        file.write_bytes(text)
    else:
        file.write_text(text)
    return file


def write_template(
    templates: Path, name: str, text: str | bytes, app: str = "acme/billing"
) -> None:
    write(templates, f"{app}/{name}/subject.j2", f"Mail {name}")
    write(templates, f"{app}/{name}/text.j2", text)


def mail(template: str, **fields: Any) -> dict[str, Any]:
    return {"tenant": "acme", "app": "billing", "to": [RECIPIENT], "template": template, **fields}


def ready_worker(worker_thread: Callable[..., WorkerThread], settings: Settings) -> WorkerThread:
    handle = worker_thread(settings)
    wait_until(lambda: handle.worker.readiness() is None)
    return handle


@pytest.fixture
def limited(make_settings: Callable[..., Settings]) -> Settings:
    """Settings with a render_timeout of LIMIT, two sender threads, topology declared."""
    settings = make_settings(render_timeout=f"{LIMIT}s", threads=2)
    declare(settings)
    return settings


@pytest.mark.parametrize("case", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_template_is_a_template_error_within_the_limit_while_other_mails_flow(
    limited: Settings,
    catcher: MailCatcher,
    templates: Path,
    worker_thread: Callable[..., WorkerThread],
    case: tuple[str, tuple[str, ...]],
) -> None:
    text, reasons = case
    write_template(templates, "evil", text)
    write(templates, "acme/billing/big.j2", BIG_IMPORT)
    write_template(templates, "good", "Hello {{ name }}")
    ready_worker(worker_thread, limited)
    with Producer(limited) as producer:
        started = time.monotonic()
        producer.submit(mail("evil"))
        producer.submit(mail("good", data={"name": "Anna"}))
        [good] = catcher.wait_for(lambda mails: len(mails) == 1, timeout=LIMIT + MARGIN)
        [(properties, _)] = wait_until(lambda: dead_letters(limited), timeout=LIMIT + MARGIN)
        ended = time.monotonic() - started
    assert good.parsed()["Subject"] == "Mail good"
    assert properties.headers[REASON_HEADER] == "template_error"
    error = properties.headers[ERROR_HEADER]
    assert "evil" in error
    assert any(reason in error for reason in reasons), error
    assert ended < LIMIT + MARGIN
    assert catcher.mails == [good]


@pytest.mark.parametrize(
    ("path", "content"),
    [
        ("evil/subject.j2", "Grüße".encode("latin-1")),
        ("evil/text.j2", b"Hello \xff\xfe"),
        ("evil/text.j2", "Hello".encode("utf-16")),
        ("evil/html.j2", "<p>Caf\xe9</p>".encode("cp1252")),
        ("footer.j2", "Mit freundlichen Grüßen".encode("latin-1")),
    ],
    ids=["subject-latin-1", "text-invalid-bytes", "text-utf-16", "html-cp1252", "included-latin-1"],
)
def test_a_template_file_that_is_not_utf8_is_a_template_error_on_the_first_attempt(
    limited: Settings, catcher: MailCatcher, templates: Path, path: str, content: bytes
) -> None:
    write_template(templates, "evil", 'Hello{% include "footer.j2" %}')
    write(templates, "acme/billing/evil/html.j2", "<p>Hello</p>")
    write(templates, "acme/billing/footer.j2", "-- Acme")
    write(templates, f"acme/billing/{path}", content)
    with Producer(limited) as producer:
        producer.submit(mail("evil"))
    drain(limited)
    assert catcher.attempts == []
    [(properties, _)] = dead_letters(limited)
    assert properties.headers[REASON_HEADER] == "template_error"
    assert properties.headers[ATTEMPTS_HEADER] == 1
    assert f"{path} is not UTF-8" in properties.headers[ERROR_HEADER]


@pytest.mark.parametrize(
    "case",
    [
        ("evil/text.j2", "x" * 3000, 2048, "max_template_bytes (2048)"),
        ("footer.j2", "y" * 3000, 2048, "max_template_bytes (2048)"),
        ("evil/text.j2", "{{ a }}" * 7000, 65536, "more than 20000 tokens"),
    ],
    ids=["template-file", "included-file", "too-many-tokens"],
)
def test_a_template_too_large_to_compile_quickly_is_a_template_error(
    make_settings: Callable[..., Settings],
    catcher: MailCatcher,
    templates: Path,
    case: tuple[str, str, int, str],
) -> None:
    path, text, cap, reason = case
    settings = make_settings(max_template_bytes=cap)
    declare(settings)
    write_template(templates, "evil", 'Hello{% include "footer.j2" %}')
    write(templates, "acme/billing/footer.j2", "-- Acme")
    write(templates, f"acme/billing/{path}", text)
    with Producer(settings) as producer:
        producer.submit(mail("evil", data={"a": 1}))
    drain(settings)
    assert catcher.attempts == []
    [(properties, _)] = dead_letters(settings)
    assert properties.headers[REASON_HEADER] == "template_error"
    assert properties.headers[ATTEMPTS_HEADER] == 1
    assert reason in properties.headers[ERROR_HEADER]


def _other_tenants_files(templates: Path) -> None:
    write(templates, "globex/shop/secret.j2", SECRET)
    write(templates, "globex/shop/macros.j2", f"{{% macro secret() %}}{SECRET}{{% endmacro %}}")
    write(templates, "acme/other/secret.j2", SECRET)


#: Templates (text.j2 of acme/billing/evil) that try to read files outside acme/billing,
#: with a symlink (path, target) made first; TEMPLATES stands for the templates directory.
OUTSIDE: dict[str, tuple[str, tuple[str, str] | None]] = {
    "include-parent-dirs": ('{% include "../../globex/shop/secret.j2" %}', None),
    "include-sibling-app": ('{% include "../other/secret.j2" %}', None),
    "include-absolute": ('{% include "/etc/passwd" %}', None),
    "include-absolute-other-tenant": ('{% include "TEMPLATES/globex/shop/secret.j2" %}', None),
    "include-backslashes": ('{% include "..\\\\..\\\\globex\\\\shop\\\\secret.j2" %}', None),
    "include-other-tenants-name": ('{% include "globex/shop/secret.j2" %}', None),
    "include-ignore-missing": ('{% include "../../globex/shop/secret.j2" ignore missing %}', None),
    "include-first-of-list": ('{% include ["no.j2", "../../globex/shop/secret.j2"] %}', None),
    "include-name-from-data": ("{% include name %}", None),
    "extends": ('{% extends "../../globex/shop/secret.j2" %}', None),
    "import": ('{% import "../../globex/shop/macros.j2" as m %}{{ m.secret() }}', None),
    "from-import": ('{% from "../../globex/shop/macros.j2" import secret %}{{ secret() }}', None),
    "symlinked-file": (
        '{% include "link.j2" %}',
        ("acme/billing/link.j2", "TEMPLATES/globex/shop/secret.j2"),
    ),
    "symlinked-directory": (
        '{% include "shared/secret.j2" %}',
        ("acme/billing/shared", "TEMPLATES/globex/shop"),
    ),
    "relative-symlink": (
        '{% include "rel.j2" %}',
        ("acme/billing/rel.j2", "../../globex/shop/secret.j2"),
    ),
    "symlink-to-a-system-file": (
        '{% include "host.j2" %}',
        ("acme/billing/host.j2", "/etc/passwd"),
    ),
}


@pytest.mark.parametrize(("text", "link"), OUTSIDE.values(), ids=OUTSIDE.keys())
def test_a_template_cannot_read_files_outside_its_apps_directory(
    limited: Settings,
    catcher: MailCatcher,
    templates: Path,
    text: str,
    link: tuple[str, str] | None,
) -> None:
    _other_tenants_files(templates)
    if link is not None:
        path, target = link
        (templates / path).parent.mkdir(parents=True, exist_ok=True)
        (templates / path).symlink_to(target.replace("TEMPLATES", str(templates)))
    write_template(templates, "evil", text.replace("TEMPLATES", str(templates)))
    with Producer(limited) as producer:
        producer.submit(mail("evil", data={"name": "../../globex/shop/secret.j2"}))
    drain(limited)
    assert catcher.attempts == []
    [(properties, _)] = dead_letters(limited)
    assert properties.headers[REASON_HEADER] == "template_error"
    assert properties.headers[ATTEMPTS_HEADER] == 1
    assert SECRET not in properties.headers[ERROR_HEADER]


def test_a_template_part_that_is_a_symlink_out_of_the_app_is_refused(
    limited: Settings, catcher: MailCatcher, templates: Path
) -> None:
    _other_tenants_files(templates)
    write(templates, "acme/billing/evil/subject.j2", "Hi")
    (templates / "acme/billing/evil/text.j2").symlink_to(templates / "globex/shop/secret.j2")
    with Producer(limited) as producer:
        producer.submit(mail("evil"))
    drain(limited)
    assert catcher.attempts == []
    [(properties, _)] = dead_letters(limited)
    assert properties.headers[REASON_HEADER] == "template_error"
    assert "outside acme/billing" in properties.headers[ERROR_HEADER]


#: Templates that use other files of their own app's directory, and what they render.
INSIDE: dict[str, tuple[dict[str, str], str, str]] = {
    "include-beside": (
        {"notice/footer.j2": "-- {{ name }}"},
        'Hi{% include "notice/footer.j2" %}',
        "Hi-- Anna",
    ),
    "include-shared-directory": (
        {"shared/footer.j2": "-- Acme"},
        'Hi{% include "shared/footer.j2" %}',
        "Hi-- Acme",
    ),
    "extends-a-layout": (
        {"layouts/base.j2": "[{% block body %}{% endblock %}]"},
        '{% extends "layouts/base.j2" %}{% block body %}Hi {{ name }}{% endblock %}',
        "[Hi Anna]",
    ),
    "import-macros": (
        {"macros.j2": "{% macro greet(n) %}Hello {{ n }}{% endmacro %}"},
        '{% import "macros.j2" as m %}{{ m.greet(name) }}',
        "Hello Anna",
    ),
    "from-import": (
        {"macros.j2": "{% macro greet(n) %}Hello {{ n }}{% endmacro %}"},
        '{% from "macros.j2" import greet %}{{ greet(name) }}',
        "Hello Anna",
    ),
    "dot-segments": (
        {"shared/footer.j2": "-- Acme"},
        'Hi{% include "./shared/footer.j2" %}',
        "Hi-- Acme",
    ),
}


@pytest.mark.parametrize("case", INSIDE.values(), ids=INSIDE.keys())
def test_a_template_uses_files_of_its_own_apps_directory(
    limited: Settings, catcher: MailCatcher, templates: Path, case: tuple[dict[str, str], str, str]
) -> None:
    files, text, expected = case
    for path, content in files.items():
        write(templates, f"acme/billing/{path}", content)
    write_template(templates, "notice", text)
    with Producer(limited) as producer:
        producer.submit(mail("notice", data={"name": "Anna"}))
    drain(limited)
    [sent] = catcher.mails
    assert sent.parsed().get_content().strip() == expected


def test_symlinks_inside_the_apps_directory_are_followed(
    limited: Settings, catcher: MailCatcher, templates: Path, tmp_path: Path
) -> None:
    # The app's directory itself may live elsewhere (a deployment's checkout).
    checkout = tmp_path / "checkout"
    write(checkout, "shared/footer.j2", "-- Acme")
    write(checkout, "notice/subject.j2", "Notice")
    write(checkout, "notice/text.j2", 'Hi{% include "footer.j2" %}')
    (templates / "acme").mkdir()
    (templates / "acme/billing").symlink_to(checkout)
    (checkout / "footer.j2").symlink_to(checkout / "shared/footer.j2")
    with Producer(limited) as producer:
        producer.submit(mail("notice"))
    drain(limited)
    [sent] = catcher.mails
    assert sent.parsed().get_content().strip() == "Hi-- Acme"


# -- the renderer on its own ---------------------------------------------------------


def _renderer(templates: Path, **limits: Any) -> TemplateRenderer:
    values = {"timeout": 5.0, "max_bytes": 4096, "max_template_bytes": 65536, **limits}
    return TemplateRenderer(templates, RenderLimits(**values))


def _container(template: str, data: dict[str, Any] | None = None) -> MailContainer:
    return MailContainer.model_validate(
        {**mail(template), "id": str(uuid.uuid4()), "data": data or {}}
    )


@pytest.mark.parametrize(
    ("text", "fits"),
    [
        ("x" * 4000, True),
        ("x" * 4100, False),
        ("ü" * 2000, True),  # 4,000 bytes of UTF-8
        ("ü" * 2100, False),  # 2,100 characters, but 4,200 bytes
        ("{% for i in range(2100) %}€{% endfor %}", False),
    ],
    ids=["ascii-fits", "ascii-too-long", "umlauts-fit", "umlauts-too-many-bytes", "loop"],
)
def test_the_output_limit_counts_utf8_bytes_of_the_whole_mail(
    templates: Path, text: str, fits: bool
) -> None:
    write_template(templates, "notice", text)
    renderer = _renderer(templates)
    try:
        if fits:
            assert renderer.render(_container("notice")).text == text
        else:
            with pytest.raises(RenderError, match=r"max_render_bytes \(4096\)"):
                renderer.render(_container("notice"))
    finally:
        renderer.close()


#: Ordinary uses of what the sandbox bounds, and what they render.
ORDINARY: dict[str, tuple[str, str]] = {
    "filters": (
        "{{ items|sum(attribute='price') }} {{ '%.2f'|format(total) }} {{ names|join(', ') }}",
        "3.5 3.50 Anna, Ben",
    ),
    "namespace": (
        "{% set ns = namespace(n=0) %}{% for i in items %}{% set ns.n = ns.n + 1 %}"
        "{% endfor %}{{ ns.n }}",
        "2",
    ),
    "operators": (
        "{{ (names * 2)|length }} {{ [1, 2] + [3] }} {{ 'ab' ~ 'cd' }} {{ '%-3s|' % 'x' }}",
        "4 [1, 2, 3] abcd x  |",
    ),
    "numbers": (
        "{{ 2 ** 64 }} {{ 3 * 4 }} {{ 7 % 3 }} {{ 1.5 * 2 }}",
        "18446744073709551616 12 1 3.0",
    ),
    "bounded-filters": (
        "{{ 'x'|center(5) }}|{{ 'a b c'|wordwrap(3) }}|{{ 'a\nb'|indent(2) }}",
        "  x  |a b\nc|a\n  b",
    ),
    "methods": (
        "{{ '{:>4}'.format(total) }} {{ 'a-b'.replace('-', '+') }} {{ '/'.join(names) }}",
        " 3.5 a+b Anna/Ben",
    ),
    "json-and-batches": (
        "{{ {'a': [1, (2, 3)]}|tojson }} {{ names|batch(1)|list }}",
        "{\"a\": [1, [2, 3]]} [['Anna'], ['Ben']]",
    ),
}


@pytest.mark.parametrize("case", ORDINARY.values(), ids=ORDINARY.keys())
def test_ordinary_templates_render_as_before(templates: Path, case: tuple[str, str]) -> None:
    text, expected = case
    write_template(templates, "notice", text)
    renderer = _renderer(templates)
    data = {"items": [{"price": 1.5}, {"price": 2}], "total": 3.5, "names": ["Anna", "Ben"]}
    try:
        assert renderer.render(_container("notice", data)).text == expected
    finally:
        renderer.close()


@pytest.mark.parametrize(
    ("data", "fits"),
    [
        ({"text": "x" * 4000}, True),
        ({"text": "x" * 5000}, False),
        ({"numbers": list(range(5000))}, False),
        ({"rows": [{"a": "xx"}] * 1000}, False),
    ],
    ids=["small-string", "long-string", "long-list", "many-rows"],
)
def test_data_larger_than_the_limit_is_refused_before_rendering(
    templates: Path, data: dict[str, Any], fits: bool
) -> None:
    # A template could hand it to one long C step (sorting it, printing it).
    write_template(templates, "notice", "{{ data|length }}")
    renderer = _renderer(templates)
    try:
        if fits:
            assert renderer.render(_container("notice", {"data": data})).text == "1"
        else:
            with pytest.raises(RenderError, match=r"data of \d+ or more .* \(4096\)"):
                renderer.render(_container("notice", {"data": data}))
    finally:
        renderer.close()


def test_a_deadline_that_passes_while_leaving_never_surfaces_after_the_block() -> None:
    watchdog = RenderWatchdog(0.01)
    escaped, timeouts = 0, 0
    try:
        for i in range(300):
            try:
                try:
                    with watchdog:
                        end = time.monotonic() + 0.009 + (i % 7) * 0.0003
                        while time.monotonic() < end:
                            pass
                except RenderTimeout:
                    timeouts += 1
                for _ in range(2000):  # code after the block: nothing may be raised here
                    pass
            except RenderTimeout:
                escaped += 1
    finally:
        watchdog.close()
    assert escaped == 0
    assert timeouts > 0  # the race was exercised


def test_renders_in_other_threads_go_on_while_one_runs_into_its_deadline(
    templates: Path,
) -> None:
    write_template(templates, "spin", "{% for a in range(100000) %}{% for b in range(100000) %}"
                   "{% endfor %}{% endfor %}")  # fmt: skip
    write_template(templates, "good", "Hello")
    renderer = _renderer(templates, timeout=1.0)
    done = threading.Event()
    rendered = 0

    def render_good() -> None:
        nonlocal rendered
        while not done.is_set():
            renderer.render(_container("good"))
            rendered += 1

    other = threading.Thread(target=render_good)
    other.start()
    try:
        with pytest.raises(RenderError, match="render_timeout"):
            renderer.render(_container("spin"))
    finally:
        done.set()
        other.join()
        renderer.close()
    assert rendered >= 10  # thousands on an idle machine; 93 seen with the suite on 2 cores


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"render_timeout": "0s"}, "render_timeout"),
        ({"max_render_bytes": 100}, "max_render_bytes"),
        ({"max_template_bytes": 0}, "max_template_bytes"),
    ],
)
def test_render_limits_out_of_range_are_refused_naming_the_key(
    make_settings: Callable[..., Settings], overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        make_settings(**overrides)


def test_render_limits_default_to_five_seconds_one_mebibyte_and_256_kibibytes(
    make_settings: Callable[..., Settings],
) -> None:
    limits = RenderLimits.of(make_settings())
    assert limits == RenderLimits(timeout=5.0, max_bytes=1024 * 1024, max_template_bytes=262144)


def test_a_fifo_in_place_of_a_template_is_refused_without_waiting(
    templates: Path,
) -> None:
    write(templates, "acme/billing/evil/subject.j2", "Hi")
    os.mkfifo(templates / "acme/billing/evil/text.j2")
    renderer = _renderer(templates)
    try:
        with pytest.raises(RenderError, match="not a regular file"):
            renderer.render(_container("evil"))
    finally:
        renderer.close()
