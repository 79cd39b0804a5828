"""Prompt templates: the one place that parses, checks and renders a task's Jinja template.

Templates come from uploaded datasets, so they are untrusted. They are parsed and rendered only in a
`jinja2.sandbox.ImmutableSandboxedEnvironment` with no globals, a small filter/test allow-list and
StrictUndefined, and every template is checked by `validate_template` before it is compiled: plain field
names, string/number constants, `{% if %}`, comparisons, and the allowed filters; no attribute or item
access, calls, arithmetic, loops, `{% set %}`, macros, imports, includes or extends. Rendering is capped:
`MAX_TEMPLATE_CHARS` of template, and at most `MAX_RENDER_CHARS` of output beyond the fields' own text.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from shared.errors import BadInput

MAX_TEMPLATE_CHARS = 4096
MAX_RENDER_CHARS = 64 * 1024  # output allowed on top of the text of the fields passed in
MAX_NESTING = 32  # syntax-tree depth (Jinja's compiler recurses over the tree)
ALLOWED_FILTERS = ("capitalize", "default", "length", "lower", "replace", "title", "trim", "truncate", "upper")
ALLOWED_TESTS = ("defined", "none", "number", "string", "undefined")

__all__ = [
    "ALLOWED_FILTERS",
    "ALLOWED_TESTS",
    "MAX_NESTING",
    "MAX_RENDER_CHARS",
    "MAX_TEMPLATE_CHARS",
    "TemplateError",
    "parse_template",
    "render_template",
    "template_variables",
    "validate_template",
]


class TemplateError(BadInput):
    """A template that is refused or cannot be rendered; `lineno` is its 1-based template line when known."""

    def __init__(self, message: str, lineno: int | None = None, snippet: str | None = None) -> None:
        self.reason, self.lineno, self.snippet = message, lineno, snippet
        quoted = f" ({snippet!r})" if snippet else ""
        super().__init__(f"template line {lineno}{quoted}: {message}" if lineno is not None else message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.reason, self.lineno, self.snippet))


def _replace(value: Any, old: Any, new: Any, count: int | None = None) -> str:
    """`replace` whose result may grow by at most MAX_RENDER_CHARS (replacing "" inserts between characters)."""
    text, old, new = str(value), str(old), str(new)
    hits = text.count(old) if count is None or count < 0 else min(count, text.count(old))
    if hits * (len(new) - len(old)) > MAX_RENDER_CHARS:
        raise TemplateError(f"replace would add more than {MAX_RENDER_CHARS:,} characters")
    return text.replace(old, new, -1 if count is None else count)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)
    env.globals.clear()  # no range, lipsum, cycler, joiner, namespace, dict
    env.filters = {name: env.filters[name] for name in ALLOWED_FILTERS}
    env.filters["replace"] = _replace
    env.tests = {name: env.tests[name] for name in ALLOWED_TESTS}
    return env


ENV = _environment()

# Statements and expressions a template may use; anything else is refused with a reason.
_ALLOWED_NODES = (
    nodes.Template,
    nodes.Output,
    nodes.TemplateData,
    nodes.If,
    nodes.Name,
    nodes.Const,
    nodes.Compare,
    nodes.Operand,
    nodes.And,
    nodes.Or,
    nodes.Not,
    nodes.CondExpr,
    nodes.Filter,
    nodes.Test,
    nodes.List,
    nodes.Tuple,
    nodes.Keyword,
)
_REFUSED: tuple[tuple[type[nodes.Node], str], ...] = (
    (nodes.Getattr, "attribute access is not allowed; use plain field names"),
    (nodes.Getitem, "item access ([...]) is not allowed; use plain field names"),
    (nodes.Call, "function calls are not allowed"),
    (nodes.For, "loops ({% for %}) are not allowed"),
    (nodes.Assign, "{% set %} is not allowed"),
    (nodes.AssignBlock, "{% set %} is not allowed"),
    (nodes.Macro, "macros are not allowed"),
    (nodes.CallBlock, "{% call %} blocks are not allowed"),
    (nodes.FilterBlock, "{% filter %} blocks are not allowed"),
    (nodes.Include, "{% include %} is not allowed"),
    (nodes.Import, "{% import %} is not allowed"),
    (nodes.FromImport, "{% from ... import %} is not allowed"),
    (nodes.Extends, "{% extends %} is not allowed"),
    (nodes.Block, "{% block %} is not allowed"),
    (nodes.With, "{% with %} is not allowed"),
    (nodes.Concat, "the ~ operator is not allowed; write the parts side by side"),
    (nodes.BinExpr, "arithmetic is not allowed"),
    (nodes.UnaryExpr, "arithmetic is not allowed"),
    (nodes.Dict, "dict literals are not allowed"),
)


def _snippet(template: str, lineno: int | None) -> str | None:
    lines = template.splitlines()
    if lineno is None or not 1 <= lineno <= len(lines):
        return None
    line = lines[lineno - 1].strip()
    return line if len(line) <= 80 else line[:77] + "..."


def _describe(node: nodes.Node) -> str:
    """The offending construct, as the user wrote it (roughly)."""
    if isinstance(node, nodes.Getattr):
        return f".{node.attr}"
    if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Name):
        return f"{node.node.name}(...)"
    if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr):
        return f".{node.node.attr}(...)"
    return ""


def parse_template(template: str) -> nodes.Template:
    """The template's syntax tree, parsed in the sandbox (no compilation); TemplateError when unreadable or too long."""
    if not isinstance(template, str):
        raise TemplateError(f"template must be a string, got {type(template).__name__}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(
            f"template is {len(template):,} characters, over the {MAX_TEMPLATE_CHARS:,}-character limit"
        )
    try:
        return ENV.parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"invalid Jinja template: {exc.message}", exc.lineno, _snippet(template, exc.lineno)
        ) from None
    except RecursionError:
        raise TemplateError("invalid Jinja template: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal over Python's digit limit
        raise TemplateError(f"invalid Jinja template: unreadable literal ({str(exc).split(';')[0]})") from None


def _walk(tree: nodes.Node) -> Iterator[tuple[nodes.Node, int]]:
    """Every node with its depth, in source order."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        yield node, depth
        stack.extend((child, depth + 1) for child in reversed(list(node.iter_child_nodes())))


def validate_template(template: str, fields: Collection[str] | None = None) -> None:
    """Refuse anything but plain substitution of `fields` (None: any plain name) with a TemplateError naming
    the template line, the offending construct and, for unknown names, the available fields."""
    _checked_tree(template, fields)


def _checked_tree(template: str, fields: Collection[str] | None) -> nodes.Template:
    tree = parse_template(template)
    unknown: dict[str, int] = {}
    for node, depth in _walk(tree):
        lineno = getattr(node, "lineno", None)
        if depth > MAX_NESTING:
            raise TemplateError(f"nested more than {MAX_NESTING} levels deep", lineno, _snippet(template, lineno))
        if not isinstance(node, _ALLOWED_NODES):
            reason = next(
                (why for kind, why in _REFUSED if isinstance(node, kind)), f"{type(node).__name__} is not allowed"
            )
            found = _describe(node)
            raise TemplateError(f"{reason} (found {found!r})" if found else reason, lineno, _snippet(template, lineno))
        if isinstance(node, nodes.Filter) and (node.name not in ALLOWED_FILTERS or node.dyn_args or node.dyn_kwargs):
            listed = ", ".join(ALLOWED_FILTERS)
            raise TemplateError(
                f"filter {node.name!r} is not allowed (allowed: {listed}; no *args/**kwargs)",
                lineno,
                _snippet(template, lineno),
            )
        if isinstance(node, nodes.Test) and (node.name not in ALLOWED_TESTS or node.dyn_args or node.dyn_kwargs):
            listed = ", ".join(ALLOWED_TESTS)
            raise TemplateError(
                f"test {node.name!r} is not allowed (allowed: {listed})", lineno, _snippet(template, lineno)
            )
        if isinstance(node, nodes.Name):
            if node.ctx != "load":
                raise TemplateError(f"assigning to {node.name!r} is not allowed", lineno, _snippet(template, lineno))
            if fields is not None and node.name not in fields:
                unknown.setdefault(node.name, node.lineno)
        if isinstance(node, nodes.Const) and not isinstance(node.value, (str, int, float, bool, type(None))):
            raise TemplateError(f"constant {node.value!r} is not allowed", lineno, _snippet(template, lineno))
    if unknown:
        first = min(unknown.values())
        available = ", ".join(sorted(fields or ())) or "none"
        raise TemplateError(
            f"unknown field(s) {', '.join(sorted(unknown))}; available: {available}", first, _snippet(template, first)
        )
    return tree


def template_variables(template: str) -> tuple[str, ...]:
    """The field names a (valid) template uses, sorted; TemplateError when it is refused."""
    return tuple(sorted(meta.find_undeclared_variables(_checked_tree(template, None))))


@functools.lru_cache(maxsize=512)
def _compiled(template: str) -> jinja2.Template:
    validate_template(template)  # nothing unchecked is ever compiled
    try:
        return ENV.from_string(template)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"invalid Jinja template: {exc}") from None


def render_template(template: str, fields: Mapping[str, Any]) -> str:
    """`template` rendered with `fields` in the sandbox; TemplateError when refused, failing or over the output cap."""
    compiled = _compiled(template)
    budget = MAX_RENDER_CHARS + sum(len(v) for v in fields.values() if isinstance(v, str))
    parts: list[str] = []
    size = 0
    try:
        for piece in compiled.generate(dict(fields)):
            size += len(piece)
            if size > budget:
                raise TemplateError(
                    f"rendered prompt is over {budget:,} characters (the fields' text plus {MAX_RENDER_CHARS:,})"
                )
            parts.append(piece)
    except TemplateError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of an (untrusted) template is the template's problem
        raise TemplateError(f"template cannot be rendered: {type(exc).__name__}: {exc}") from None
    return "".join(parts)
