"""Bounded rendering for untrusted Jinja templates (a GGUF's chat template is code from whoever
made the file). jinja2's sandbox refuses escapes to Python internals but not work: two nested
`range(100000)` loops spin for hours and `'x' * 1000000000` takes gigabytes. Here every render
gets a deadline, a cap on its output, and a cap on each string or list the template builds, and
any breach is one ChatTemplateError.

- time: a trace function on the template's own frames counts the lines it runs (each loop
  iteration is one) and checks the clock every few thousand;
- output: the render is streamed, and stops past MAX_OUTPUT characters;
- sizes: `*`, `**`, `+` and `~` check the size of their result before computing it, and integer
  arguments to functions and filters (`range`, `center`, `ljust`, ...) are capped.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmx.errors import ChatTemplateError

MAX_SECONDS = 1.0
MAX_OUTPUT = 1_000_000  # characters of rendered prompt
MAX_SIZE = 1_000_000  # items of any one string or list a template builds; any integer argument
CHECK_EVERY = 4096  # traced lines between two looks at the clock


class TemplateBudgetError(ChatTemplateError):
    """A template ran past its time, output or size budget."""


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


def _check_size(n: int, what: str) -> None:
    if n > MAX_SIZE:
        raise TemplateBudgetError(f"builds a {what} of {n:,} items (at most {MAX_SIZE:,})")


class _BoundedCodeGenerator(CodeGenerator):
    """`a ~ b` calls the environment's size-checked join instead of jinja2's own."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.bounded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(["*", "**", "+"])

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if _size(seq) is not None and isinstance(times, int):
                    _check_size(_size(seq) * max(times, 0), "repetition")
        elif operator == "+" and _size(left) is not None and _size(right) is not None:
            _check_size(_size(left) + _size(right), "concatenation")
        elif operator == "**" and isinstance(right, int) and abs(right) > 64 and isinstance(left, int) \
                and abs(left) > 1:
            raise TemplateBudgetError(f"computes {left} ** {right} (exponents above 64 are refused)")
        return super().call_binop(context, operator, left, right)

    def bounded_join(self, parts) -> str:
        texts = [str(p) for p in parts]
        _check_size(sum(map(len, texts)), "string")
        return "".join(texts)

    def call(self, context, obj, *args, **kwargs):
        _check_int_arguments(args, kwargs)
        return super().call(context, obj, *args, **kwargs)


def _check_int_arguments(args, kwargs) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SIZE:
            raise TemplateBudgetError(f"passes {value:,} to a function (at most {MAX_SIZE:,})")


def _capped_filter(fn):
    def capped(*args, **kwargs):
        _check_int_arguments(args, kwargs)
        return fn(*args, **kwargs)

    for attr in ("jinja_pass_arg",):  # keep jinja2's pass_context / pass_environment marks
        if hasattr(fn, attr):
            setattr(capped, attr, getattr(fn, attr))
    return capped


def bounded_environment() -> BoundedEnvironment:
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters = {name: _capped_filter(fn) for name, fn in env.filters.items()}
    return env


def render_bounded(template, origin: str, context: dict[str, Any]) -> str:
    """template.render(**context) within MAX_SECONDS and MAX_OUTPUT, or TemplateBudgetError."""
    deadline = time.perf_counter() + MAX_SECONDS
    lines = 0

    def trace_lines(frame, event, arg):
        nonlocal lines
        lines += 1
        if lines % CHECK_EVERY == 0 and time.perf_counter() > deadline:
            raise TemplateBudgetError(f"ran longer than {MAX_SECONDS:g} s")
        return trace_lines

    def trace_calls(frame, event, arg):  # only the template's own code is traced line by line
        return trace_lines if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(trace_calls)
    try:
        pieces, total = [], 0
        for piece in template.generate(**context):
            total += len(piece)
            if total > MAX_OUTPUT:
                raise TemplateBudgetError(f"renders more than {MAX_OUTPUT:,} characters")
            pieces.append(piece)
        return "".join(pieces)
    except TemplateBudgetError as e:
        raise TemplateBudgetError(f"the chat template ({origin}) {e}; refusing it") from None
    finally:
        sys.settrace(previous)
