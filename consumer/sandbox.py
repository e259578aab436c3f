"""jinja2's sandbox with every way to build a large value bounded (see ``bounds``).

On top of ``ImmutableSandboxedEnvironment`` (templates cannot reach Python internals,
nor grow a list in place):

* ``*``, ``**``, ``%`` and ``+`` go through ``call_binop``, which also keeps jinja2
  from folding them while compiling, where no deadline reaches;
* every call (methods, macros, globals) has its arguments and result checked, and
  ``str.format`` its widths and output;
* list, tuple and dict literals and ``~`` are checked by the code generator;
* captured output (macros, ``{% set %}`` blocks, imported templates) is joined only
  within the limit;
* filters are bounded (``bounded_filters``);
* a template of more than MAX_TOKENS tokens is refused: Python's ``compile()`` of
  the generated code is C that no deadline stops (measured: 0.5 to 1 s for 50,000
  tokens of ``{{ a }}`` or ``{{ [a, a, a] }}``, so at most about 0.4 s for 20,000).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import BuiltinMethodType, MethodType
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.environment import Template, TemplateModule
from jinja2.exceptions import TemplateSyntaxError
from jinja2.ext import Extension
from jinja2.lexer import Token, TokenStream
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.utils import Namespace, generate_lorem_ipsum
from markupsafe import Markup

from rohrpost.consumer.bounded_filters import bounded_filters
from rohrpost.consumer.bounds import (
    ValueTooLarge,
    check_binop,
    check_call,
    check_size,
    check_width,
    refuse,
    size_of,
)

MAX_TOKENS = 20_000
_NUMBERS = frozenset({int, float})
_CHEAP = frozenset({"+", "%"})
#: Objects without methods that change them in place.
_IMMUTABLE = (str, int, float, LoopContext, Namespace)
_METHODS = (MethodType, BuiltinMethodType)
_FORMAT = frozenset({"format", "format_map"})


class TokenLimit(Extension):
    """Refuses a template of more than MAX_TOKENS tokens before it is compiled."""

    def filter_stream(self, stream: TokenStream) -> Iterator[Token]:
        for count, token in enumerate(stream, 1):
            if count > MAX_TOKENS:
                raise TemplateSyntaxError(
                    f"more than {MAX_TOKENS} tokens; split the template",
                    token.lineno,
                    stream.name,
                    stream.filename,
                )
            yield token


class BoundedCodeGenerator(CodeGenerator):
    """Generates template code that checks what literals and ``~`` build."""

    def _checked(self, visit: Any, node: nodes.Expr, frame: Frame) -> None:
        self.write("environment.checked(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self._checked(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self._checked(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx == "load":
            self._checked(super().visit_Tuple, node, frame)
        else:  # an assignment target
            super().visit_Tuple(node, frame)

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        else:
            join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write(f"environment.checked_join({join}, (")
        for item in node.nodes:
            self.visit(item, frame)
            self.write(", ")
        self.write("))")


class BoundedTemplate(Template):
    """A template whose imported form (``{% import %}``) renders within the limit."""

    def make_module(
        self,
        vars: dict[str, Any] | None = None,
        shared: bool = False,
        locals: Any = None,
    ) -> TemplateModule:
        context = self.new_context(vars, shared, locals)
        environment: BoundedEnvironment = self.environment  # type: ignore[assignment]
        body = environment.collect(self.root_render_func(context), "an imported template")
        return TemplateModule(self, context, body)


class BoundedNamespace(Namespace):
    """``namespace()``: its attributes together stay within ``limit``."""

    limit = 0

    def __setitem__(self, name: str, value: Any) -> None:
        limit = type(self).limit
        # The size of each attribute is kept, so a counter set in a loop costs
        # nothing even when a large list sits in the same namespace.
        try:
            sizes: dict[str, int] = object.__getattribute__(self, "_sizes")
        except AttributeError:
            attrs = self._Namespace__attrs
            sizes = {key: size_of(item, limit) for key, item in attrs.items()}
            object.__setattr__(self, "_sizes", sizes)
        size = size_of(value, limit)
        total = sum(sizes.values()) - sizes.get(name, 0) + size
        if total > limit:
            raise refuse(f"namespace attribute {name}", total, limit)
        sizes[name] = size
        super().__setitem__(name, value)


class _BoundedFormatting:
    """``str.format``: widths and the whole output within the limit."""

    limit = 0
    written = 0

    def format_field(self, value: Any, format_spec: str) -> Any:
        width = check_width(format_spec, self.limit)
        self.written += size_of(value, self.limit) + width
        if self.written > self.limit:
            raise refuse("format", self.written, self.limit)
        return super().format_field(value, format_spec)  # type: ignore[misc]


class _Formatter(_BoundedFormatting, SandboxedFormatter):
    pass


class _EscapeFormatter(_BoundedFormatting, SandboxedEscapeFormatter):
    pass


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with nothing a template builds larger than ``max_size``."""

    code_generator_class = BoundedCodeGenerator
    template_class = BoundedTemplate
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, *, max_size: int, **options: Any) -> None:
        options["extensions"] = [*options.get("extensions", ()), TokenLimit]
        super().__init__(**options)
        self.max_size = max_size
        self.filters = bounded_filters(self.filters, max_size)
        self.globals["lipsum"] = self._lipsum
        self.globals["namespace"] = type("namespace", (BoundedNamespace,), {"limit": max_size})

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, _IMMUTABLE):  # skip the immutable sandbox's slower checks
            return SandboxedEnvironment.is_safe_attribute(self, obj, attr, value)
        return super().is_safe_attribute(obj, attr, value)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        kinds = {type(left), type(right)}
        if kinds <= _NUMBERS and (operator in _CHEAP or float in kinds):
            # Cannot grow: int + int, int % int, and anything with a float (it overflows).
            return self.binop_table[operator](left, right)
        check_binop(operator, left, right, self.max_size)
        return self.checked(self.binop_table[operator](left, right))

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        args = check_call(obj, args, kwargs, self.max_size)
        return self.checked(super().call(context, obj, *args, **kwargs))

    def checked(self, value: Any) -> Any:
        """``value``, if a template may build it."""
        return check_size(value, self.max_size, "the template")

    def checked_join(self, join: Any, values: tuple[Any, ...]) -> str:
        """``~``: join ``values`` if the result stays within the limit."""
        size = sum(size_of(value, self.max_size) for value in values)
        if size > self.max_size:
            raise refuse("'~'", size, self.max_size)
        result: str = join(values)
        return result

    def collect(self, chunks: Iterable[str], what: str) -> list[str]:
        """The chunks of rendered output, as long as they stay within the limit."""
        collected, size = [], 0
        for chunk in chunks:
            size += len(chunk)
            if size > self.max_size:
                raise refuse(what, size, self.max_size)
            collected.append(chunk)
        return collected

    def concat(self, chunks: Iterable[str]) -> str:
        """Join captured output (macros, blocks, ``{% set %}`` blocks) within the limit."""
        return "".join(self.collect(chunks, "captured output"))

    def wrap_str_format(self, value: Any) -> Any:
        """``str.format`` and ``format_map`` with bounded widths and output."""
        if not isinstance(value, _METHODS) or value.__name__ not in _FORMAT:
            return None
        owner, name = value.__self__, value.__name__
        if not isinstance(owner, str):
            return None
        limit = self.max_size

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            if name == "format_map":
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                kwargs = args[0]
                args = ()
            formatter: _Formatter | _EscapeFormatter
            if isinstance(owner, Markup):
                formatter = _EscapeFormatter(self, escape=owner.escape)
            else:
                formatter = _Formatter(self)
            formatter.limit = limit
            return type(owner)(formatter.vformat(owner, args, kwargs))

        return bounded_format

    def _lipsum(self, n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
        """``lipsum()`` within the limit (about ten characters a word)."""
        if n * max * 10 > self.max_size:
            raise ValueTooLarge(f"lipsum({n}, max={max}) would be larger than max_render_bytes")
        return generate_lorem_ipsum(n=n, html=html, min=min, max=max)
