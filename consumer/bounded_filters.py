"""jinja2's filters, checked so none can build a value beyond the size limit.

A filter that can build more than its input is wrapped to take the context, which
also keeps jinja2 from running it while compiling (it folds filters with constant
arguments, out of the reach of the render deadline). Where a template chooses by how
much the result outgrows the input (``center(10**9)``, ``join`` with a long
separator, ``batch`` with a fill value) the size is checked before the filter runs;
every result of a wrapped filter is checked after.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import Environment
from jinja2.exceptions import FilterArgumentError
from jinja2.filters import make_attrgetter
from jinja2.runtime import Context
from jinja2.utils import pass_context, pass_environment
from markupsafe import soft_str

from rohrpost.consumer.bounds import (
    ValueTooLarge,
    arguments_size,
    check_printf,
    check_size,
    refuse,
    replaced_size,
    size_of,
)

Filter = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class _Arguments:
    """The arguments of one filter call, after its value, and their size."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    size: int
    limit: int

    def get(self, index: int, name: str) -> Any:
        """The argument at ``index`` or named ``name``, else None."""
        return self.args[index] if len(self.args) > index else self.kwargs.get(name)

    def at_most(self, what: str, number: Any) -> None:
        """Refuse ``what`` if ``number`` (a size it would build) is over the limit."""
        if isinstance(number, int) and number > self.limit:
            raise refuse(what, number, self.limit)


#: A check before a filter runs; returns the value to give the filter.
PreCheck = Callable[[Any, _Arguments], Any]


def _center(value: Any, call: _Arguments) -> Any:
    call.at_most("center", call.get(0, "width"))
    return value


def _indent(value: Any, call: _Arguments) -> Any:
    width = call.get(0, "width")
    pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 4
    text = str(value)
    call.at_most("indent", len(text) + (text.count("\n") + 1) * pad)
    return value


def _replace(value: Any, call: _Arguments) -> Any:
    text = str(value)
    old, new, count = call.get(0, "old"), call.get(1, "new"), call.get(2, "count")
    call.at_most("replace", replaced_size(text, str(old), str(new), -1 if count is None else count))
    return value


def _join(value: Any, call: _Arguments) -> Any:
    items = list(value)
    separator = call.get(0, "d")
    call.at_most("join", size_of(items, call.limit) + len(str(separator or "")) * len(items))
    return items


def _filled(what: str, count_name: str) -> PreCheck:
    def check(value: Any, call: _Arguments) -> Any:
        count = call.get(0, count_name)
        call.at_most(what, count)
        fill = call.get(1, "fill_with")
        if fill is not None and isinstance(count, int):
            call.at_most(what, size_of(fill, call.limit) * count)
        return value

    return check


def _round(value: Any, call: _Arguments) -> Any:
    precision = call.get(0, "precision")
    if isinstance(precision, int) and abs(precision) > 1000:
        raise ValueTooLarge("round: precision beyond 1000 digits")
    return value


def _tojson(value: Any, call: _Arguments) -> Any:
    indent = call.get(0, "indent")
    if isinstance(indent, int):
        call.at_most("tojson", (size_of(value, call.limit) + 1) * indent)
    return value


_PRE_CHECKS: dict[str, PreCheck] = {
    "center": _center,
    "indent": _indent,
    "replace": _replace,
    "join": _join,
    "batch": _filled("batch", "linecount"),
    "slice": _filled("slice", "slices"),
    "round": _round,
    "tojson": _tojson,
}


@dataclass(frozen=True)
class _WrapOptions:
    """The arguments of jinja2's wordwrap after the text, positional or by name."""

    width: int = 79
    break_long_words: bool = True
    wrapstring: str | None = None
    break_on_hyphens: bool = True


def _wordwrap(limit: int) -> Filter:
    @pass_environment
    def wordwrap(environment: Environment, s: str, *args: Any, **kwargs: Any) -> str:
        """jinja2's wordwrap, with the size of the result known before it is joined."""
        options = _WrapOptions(*args, **kwargs)
        wrapstring = options.wrapstring
        wrapstring = environment.newline_sequence if wrapstring is None else str(wrapstring)
        paragraphs = [
            textwrap.wrap(
                line,
                width=options.width,
                expand_tabs=False,
                replace_whitespace=False,
                break_long_words=options.break_long_words,
                break_on_hyphens=options.break_on_hyphens,
            )
            for line in str(s).splitlines()
        ]
        breaks = sum(len(p) for p in paragraphs) + len(paragraphs)
        text = sum(len(line) for p in paragraphs for line in p)
        if (size := text + breaks * len(wrapstring)) > limit:
            raise refuse("wordwrap", size, limit)
        return wrapstring.join(wrapstring.join(p) for p in paragraphs)

    return wordwrap


def _format(limit: int) -> Filter:
    def format(value: Any, *args: Any, **kwargs: Any) -> str:
        """jinja2's format (``"%.2f"|format(x)``), refused when widths or result are too large."""
        if args and kwargs:
            raise FilterArgumentError(
                "can't handle positional and keyword arguments at the same time"
            )
        text = soft_str(value)
        if "%" in text:
            check_printf(text, arguments_size(args, kwargs, limit), limit)
        return text % (kwargs or args)

    return format


def _sum(
    context: Context, iterable: Any, attribute: str | int | None = None, start: Any = 0
) -> Any:
    """jinja2's sum, adding one item at a time with the checked ``+``."""
    environment = context.environment
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    total = start
    for item in iterable:
        total = environment.call_binop(context, "+", total, item)  # type: ignore[attr-defined]
    return total


#: What a filter asks for before its value, from the context (jinja2's pass_* decorators).
_PASSED: dict[str | None, Callable[[Context], Any] | None] = {
    "context": lambda context: context,
    "eval_context": lambda context: context.eval_ctx,
    "environment": lambda context: context.environment,
    None: None,
}


def bounded(name: str, func: Filter, limit: int) -> Filter:
    """``func`` as a filter whose arguments and result are checked against ``limit``."""
    pre_check = _PRE_CHECKS.get(name)
    passed = _PASSED[getattr(getattr(func, "jinja_pass_arg", None), "name", None)]
    what = f"filter {name}"

    @pass_context
    def checked(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        size = arguments_size(args, kwargs, limit) if args or kwargs else 0
        if size > limit:
            raise refuse(f"the arguments of {what}", size, limit)
        if pre_check is not None:
            value = pre_check(value, _Arguments(args, kwargs, size, limit))
        if passed is None:
            result = func(value, *args, **kwargs)
        else:
            result = func(passed(context), value, *args, **kwargs)
        return check_size(result, limit, what)

    checked.__name__ = checked.__qualname__ = name
    return checked


#: Filters that return part of their input, a number, or a string at most a few times
#: longer that the same filter does not lengthen again (``upper``, ``escape``): left
#: as they are, so they cost nothing, and folding them while compiling is harmless.
_UNCHANGED = frozenset(
    {
        "abs", "attr", "capitalize", "count", "d", "default", "e", "escape", "filesizeformat",
        "first", "float", "int", "last", "length", "lower", "map", "max", "min", "random",
        "reject", "rejectattr", "reverse", "safe", "select", "selectattr", "sort", "striptags",
        "title", "trim", "truncate", "unique", "upper", "wordcount",
    }
)  # fmt: skip


def bounded_filters(filters: Mapping[str, Filter], limit: int) -> dict[str, Filter]:
    """``filters`` with each that can build more than its input bounded.

    wordwrap and sum are replaced; every other filter that is not known to leave its
    input as long as it was (including ones a later jinja2 adds) is checked.
    """
    checked = {name: bounded(name, func, limit) for name, func in filters.items()}
    # Replaced by versions that check as they go: cheaper than checking around.
    own = {"wordwrap": _wordwrap(limit), "sum": pass_context(_sum), "format": _format(limit)}
    return {
        name: filters[name] if name in _UNCHANGED else own.get(name, checked[name])
        for name in filters
    }
