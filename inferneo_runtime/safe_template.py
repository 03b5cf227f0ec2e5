"""Chat templates rendered with bounds: a template is the artifact author's code, run on every chat request.

Jinja's sandbox stops attribute escapes, not work: nested `{% for %}` loops can run 10**10 iterations and
`'x' * 400000000` allocates gigabytes. Here every loop's iterable is wrapped (in the parsed template, before
it is compiled) by a per-render counter that raises after `max_iterations` items or past the render's deadline,
`*` and `**` are checked before they are computed, and the output is cut off at `max_output_chars`.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator, Optional

from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from .errors import RequestError

MAX_ITERATIONS = 1_000_000
MAX_OUTPUT_CHARS = 4_000_000
MAX_SECONDS = 5.0
_COUNTER = "__inferneo_loop__"  # the name the wrapped loops call; passed in each render's context
_CONCAT = "__inferneo_concat__"  # what `a ~ b` becomes: a join that checks its size first


class TemplateLimitExceeded(RequestError):
    """A chat template needed more loop iterations, output or time than a render may take."""

    code = "template_limit_exceeded"
    param = "messages"


class _Budget:
    def __init__(self, max_iterations: int, deadline: float):
        self.left = max_iterations
        self.max_iterations = max_iterations
        self.deadline = deadline

    def __call__(self, iterable: Iterable) -> Iterator:
        for i, item in enumerate(iterable):
            self.left -= 1
            if self.left < 0:
                raise TemplateLimitExceeded(f"chat template: more than {self.max_iterations} loop iterations")
            if not i & 1023 and time.monotonic() > self.deadline:
                raise TemplateLimitExceeded("chat template: rendering took too long")
            yield item


class _Bound(NodeTransformer):
    """Loops iterate through the counter; `~` joins through the size check."""

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name(_COUNTER, "load"), [node.iter], [], None, None)
        return node

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        return nodes.Call(nodes.Name(_CONCAT, "load"), [nodes.List(node.nodes)], [], None, None)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with loops counted, and `*`, `**`, `+`, `~` and widening filters sized before
    they run."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self, *args, max_output_chars: int = MAX_OUTPUT_CHARS, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_output_chars = max_output_chars
        self.globals[_CONCAT] = self._concat
        for name in ("center", "indent", "wordwrap", "truncate", "batch", "slice", "format", "replace"):
            if name in self.filters:
                self.filters[name] = self._sized_filter(self.filters[name])

    def _too_big(self, size: int, what: str) -> None:
        if size > self.max_output_chars:
            raise TemplateLimitExceeded(f"chat template: {what} of {size} characters is more than "
                                        f"{self.max_output_chars}")

    def _concat(self, parts: list) -> str:
        texts = [str(p) for p in parts]
        self._too_big(sum(len(t) for t in texts), "a joined string")
        return "".join(texts)

    def _sized_filter(self, fn):
        """A filter whose int arguments (widths, counts) and replacement growth stay within the output bound."""
        def sized(*args, **kwargs):
            values = [a for a in (*args, *kwargs.values()) if isinstance(a, int) and not isinstance(a, bool)]
            if any(abs(v) > self.max_output_chars for v in values):
                raise TemplateLimitExceeded(f"chat template: a filter argument above {self.max_output_chars}")
            strings = [a for a in args if isinstance(a, str)]
            if fn.__name__ == "do_replace" and len(strings) >= 3:
                self._too_big((len(strings[0]) + 1) * max(len(strings[2]), 1), "a replacement")
            return fn(*args, **kwargs)

        for attr in ("jinja_pass_arg",):  # keep what tells Jinja to pass the environment/context
            if hasattr(fn, attr):
                setattr(sized, attr, getattr(fn, attr))
        sized.__name__ = fn.__name__
        return sized

    def call_binop(self, context, operator: str, left, right):
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            self._too_big(len(left) + len(right), "a sum")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and \
                        len(seq) * times > self.max_output_chars:
                    raise TemplateLimitExceeded(f"chat template: a repetition of {len(seq) * times} items is more "
                                                f"than {self.max_output_chars}")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
            raise TemplateLimitExceeded(f"chat template: exponent {right} is too large")
        return super().call_binop(context, operator, left, right)

    def bounded(self, source: str):
        """Compile `source` with every `{% for %}` iterating through the render's counter."""
        return self.from_string(_Bound().visit(self.parse(source)))


def render(template, env: BoundedEnvironment, context: dict, max_iterations: int = MAX_ITERATIONS,
           max_seconds: Optional[float] = MAX_SECONDS) -> str:
    """Render a template compiled by `env.bounded`, within the limits."""
    deadline = time.monotonic() + (max_seconds if max_seconds is not None else float("inf"))
    out, size = [], 0
    try:
        for chunk in template.generate(**context, **{_COUNTER: _Budget(max_iterations, deadline)}):
            size += len(chunk)
            if size > env.max_output_chars:
                raise TemplateLimitExceeded(f"chat template: output longer than {env.max_output_chars} characters")
            out.append(chunk)
    except RecursionError:
        raise TemplateLimitExceeded("chat template: recursion too deep") from None
    return "".join(out)
