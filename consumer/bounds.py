"""Size bounds on what a template computes, checked before C code builds it.

CPython runs one C-level operation (``'x' * n``, ``10 ** n``, ``str.center``,
``"".join``, ``str(a_list)``) to its end without letting another thread run or the
render deadline strike. So every operation a template can use to build something
large is checked *before* it runs: no value a template builds may be larger than
``limit`` (characters of strings plus items of containers, a shared part counted
each time it can be reached), nested deeper than MAX_DEPTH, or an integer longer
than MAX_INT_BITS. Each single C-level step then costs at most about ``limit``.
"""

from __future__ import annotations

import functools
import marshal
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

from jinja2.exceptions import SecurityError
from jinja2.utils import Namespace
from markupsafe import Markup

#: Above Python's own limit for printing an int (4,300 digits are about 14,300 bits).
MAX_INT_BITS = 16_384
#: Deeper values recurse in C (hashing nested tuples has no recursion guard).
MAX_DEPTH = 100

_SCALARS = frozenset({int, float, bool, type(None)})
_FLAT = (str, bytes, bytearray)
_ITERABLE: tuple[type, ...] = (
    list,
    tuple,
    set,
    frozenset,
    type({}.keys()),
    type({}.values()),
    type({}.items()),
)
#: printf conversions: %[(key)][flags][width][.precision][length]type
_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?.", re.DOTALL)
_DIGITS = re.compile(r"\d+")


class ValueTooLarge(SecurityError):
    """A template operation would build a value beyond the limits."""


def size_of(value: Any, limit: int) -> int:
    """Characters and items reachable from ``value``; stops counting once past ``limit``."""
    kind = type(value)
    if kind is str or kind is Markup:
        return len(value)
    if kind in _SCALARS:
        return 0
    if isinstance(value, _FLAT):
        return len(value)
    return _walk(value, limit)


def _walk(value: Any, limit: int) -> int:
    total = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack and total <= limit:
        item, depth = stack.pop()
        children = _children(item)
        if children is None:
            continue
        if depth >= MAX_DEPTH:
            raise ValueTooLarge(f"a value nested more than {MAX_DEPTH} levels deep")
        total += 1 + len(children)
        for child in children:
            kind = type(child)
            if kind is str or kind is Markup:
                total += len(child)
            elif kind in _SCALARS:
                continue
            elif isinstance(child, _FLAT):
                total += len(child)
            else:
                stack.append((child, depth + 1))
    return total


def data_size(data: Any, limit: int) -> int:
    """``size_of`` a mail's data (JSON values), or a bound above it when that is within limit.

    Walking the data costs about 20 µs for an invoice with ten lines; serialising it
    with marshal costs a third of that. Format 2 writes no back-references, and at
    least one byte more for every item than ``size_of`` counts, so its length bounds
    the size from above.
    """
    try:
        bound = len(marshal.dumps(data, 2))
    except ValueError:  # nested too deep for marshal, or not made of JSON values
        bound = limit + 1
    return bound if bound <= limit else size_of(data, limit)


def arguments_size(args: tuple[Any, ...], kwargs: Mapping[str, Any], limit: int) -> int:
    """The size of a call's arguments taken together (``*args`` splats build tuples too)."""
    total = len(args) + len(kwargs)
    for value in args:
        total += size_of(value, limit)
    if kwargs:
        for value in kwargs.values():
            total += size_of(value, limit)
    return total


def _children(item: Any) -> Sequence[Any] | None:
    kind = type(item)
    if kind is list or kind is tuple:
        return cast("Sequence[Any]", item)
    if kind is dict or isinstance(item, Mapping):
        return [*item.keys(), *item.values()]
    if isinstance(item, Namespace):
        return list(item._Namespace__attrs.values())
    if isinstance(item, _ITERABLE):
        return list(cast("Iterable[Any]", item))
    return None


def refuse(what: str, size: int, limit: int) -> ValueTooLarge:
    """The error for ``what`` building ``size`` characters or items, above ``limit``."""
    return ValueTooLarge(
        f"{what} would build a value of {size} or more characters or items, "
        f"more than max_render_bytes ({limit})"
    )


def check_size(value: Any, limit: int, what: str) -> Any:
    """Return ``value`` if it is within ``limit``; else ValueTooLarge naming ``what``."""
    size = size_of(value, limit)
    if size > limit:
        raise refuse(what, size, limit)
    return value


def check_binop(operator: str, left: Any, right: Any, limit: int) -> None:
    """Refuse ``left <operator> right`` if its result would be too large to build."""
    if operator == "**":
        _check_power(left, right)
    elif operator == "*":
        _check_product(left, right, limit)
    elif operator == "%" and isinstance(left, str | bytes):
        args = arguments_size(right, {}, limit) if type(right) is tuple else size_of(right, limit)
        check_printf(left, args, limit)


def _is_int(value: Any) -> bool:
    return isinstance(value, int)


def _check_power(base: Any, exponent: Any) -> None:
    if (
        _is_int(base)
        and _is_int(exponent)
        and abs(base) > 1
        and base.bit_length() * exponent > MAX_INT_BITS
    ):
        raise ValueTooLarge(f"'**' would build an integer of more than {MAX_INT_BITS} bits")


def _check_product(left: Any, right: Any, limit: int) -> None:
    if _is_int(left) and _is_int(right):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise ValueTooLarge(f"'*' would build an integer of more than {MAX_INT_BITS} bits")
        return
    for sequence, times in ((left, right), (right, left)):
        if _is_int(times) and isinstance(sequence, str | bytes | list | tuple) and times > 0:
            size = max(size_of(sequence, limit), 1) * times
            if size > limit:
                raise refuse("'*'", size, limit)


def check_printf(template: str | bytes, args_size: int, limit: int) -> None:
    """Refuse ``template % args`` (``args_size``: their size) if it would be too large."""
    text = template.decode("latin-1") if isinstance(template, bytes) else template
    specs, widths = _printf_specs(text, limit) if "%" in text else (0, 0)
    if (size := len(text) + widths + specs * args_size) > limit:
        raise refuse("'%' formatting", size, limit)


@functools.lru_cache(maxsize=1024)
def _printf_specs(text: str, limit: int) -> tuple[int, int]:
    """The number of conversions in ``text`` and the sum of their widths and precisions."""
    widths = 0
    specs = _PRINTF.findall(text)
    for width, precision in specs:
        if "*" in (width, precision):
            raise ValueTooLarge("'*' widths are not supported in templates")
        widths += check_width(f"{width}.{precision}", limit)
    return len(specs), widths


def check_width(spec: str, limit: int) -> int:
    """The widest width or precision in a format spec (``>20``, ``08.3f``), at most ``limit``."""
    widest = 0
    for digits in _DIGITS.findall(spec):
        if len(digits) > 12 or int(digits) > limit:
            raise ValueTooLarge(f"width or precision {digits[:20]} is more than {limit}")
        widest = max(widest, int(digits))
    return widest


def _int_arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], name: str, default: int) -> Any:
    return args[0] if args else kwargs.get(name, default)


def _padded(text: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    width = _int_arg(args, kwargs, "width", 0)
    return int(width) if _is_int(width) else 0


def _tabs(text: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    tabsize = _int_arg(args, kwargs, "tabsize", 8)
    tabs: int = text.count("\t" if isinstance(text, str) else b"\t")
    return len(text) + tabs * max(int(tabsize), 0)


def replaced_size(text: Any, old: Any, new: Any, count: Any = -1) -> int:
    """Size of ``text.replace(old, new, count)``, computed without building it."""
    if not isinstance(old, str | bytes) or not isinstance(new, str | bytes):
        return len(text)
    found = len(text) + 1 if not old else text.count(old)
    if _is_int(count) and count >= 0:
        found = min(found, count)
    return len(text) + found * max(len(new) - len(old), 0)


def _replace(text: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    return replaced_size(text, *args[:3], **kwargs)


def _translate(text: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    table = args[0] if args else None
    if not isinstance(table, Mapping):
        return len(text)
    longest = max((len(v) for v in table.values() if isinstance(v, str | bytes)), default=1)
    return len(text) * max(longest, 1)


#: Methods of str and bytes whose result can be much larger than the string.
_METHOD_SIZES: dict[str, Callable[[Any, tuple[Any, ...], Mapping[str, Any]], int]] = {
    "center": _padded,
    "ljust": _padded,
    "rjust": _padded,
    "zfill": _padded,
    "expandtabs": _tabs,
    "replace": _replace,
    "translate": _translate,
}


def check_call(
    obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int
) -> tuple[Any, ...]:
    """Refuse a call that would build too large a value; return the arguments to use.

    The arguments of a call are one value (a macro receives them as ``varargs``).
    ``str.join`` gets its iterable as a list, so its size is known before joining.
    """
    if (size := arguments_size(args, kwargs, limit)) > limit:
        raise refuse("the arguments of a call", size, limit)
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if isinstance(owner, str | bytes):
        if name == "join" and args:
            items = list(args[0])
            size = size_of(items, limit) + len(owner) * len(items)
            if size > limit:
                raise refuse("join", size, limit)
            return (items, *args[1:])
        estimate = _METHOD_SIZES.get(name)
        if estimate is not None and (size := estimate(owner, args, kwargs)) > limit:
            raise refuse(name, size, limit)
    elif _is_int(owner) and name == "to_bytes":
        length = _int_arg(args, kwargs, "length", 1)
        if _is_int(length) and length > limit:
            raise refuse(name, length, limit)
    return args
