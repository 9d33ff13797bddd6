"""The commonest template shapes, evaluated without a Jinja render, to exactly the render's text.

Device templates are mostly one expression: a variable, a path into it and a few filters
(``{{ value }}``, ``{{ value_json.temperature }}``, ``{{ value_json['ENERGY'].Power }}``,
``{{ value_json.temperature | float(0) | round(1) }}``). A render of one costs a Jinja context
and a generator (~10 µs); `plan` recognises the shape once, at compile time, and its `Direct`
evaluates it per message in well under one, by the render's own rules:

- only ``value``/``value_json``, then attribute or item steps with constant keys, then filters
  of `FILTERS` with constant arguments, around it at most literal text, and the result is
  ``str()`` of the value between the texts, stripped, as the render's;
- a step is taken only where the sandbox would read that very item (a key present in a JSON
  object and no attribute of ``dict``, an index inside a JSON array); each filter is the
  environment's own callable (with its bounds), so the sandbox rules are the same ones;
- anything else (the variable missing, a key absent, a filter failing, output past the
  bound) answers `FALLBACK` and the caller renders, so errors and undefined values read
  exactly as a render reads them.

tests/test_discovery_templates_fast.py compares it with the render on real templates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from jinja2 import nodes

#: Filters evaluated directly: pure functions of the value and constant arguments (none takes
#: Jinja's context or environment). The callables come from the sandbox's own table.
FILTERS = frozenset(
    "float int round abs lower upper trim string title capitalize default d iif is_defined "
    "multiply bitwise_and bitwise_or replace as_timestamp timestamp_custom".split()
)
VARIABLES = frozenset({"value", "value_json"})
MAX_STEPS = 8  # path steps and filters, each
FALLBACK: Any = object()
_DICT_ATTRIBUTES = frozenset(dir(dict))

Step = tuple[bool, Any]  # (by attribute, key)
Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class Direct:
    """One recognised template: variable, steps, filters, literal text around."""

    __slots__ = ("variable", "steps", "calls", "before", "after", "limit")

    def __init__(
        self, variable: str, steps: list[Step], calls: list[Call], before: str, after: str,
        limit: int,
    ) -> None:  # fmt: skip
        self.variable = variable
        self.steps = tuple(steps)
        self.calls = tuple(calls)
        self.before = before
        self.after = after
        self.limit = limit

    def __call__(self, variables: Mapping[str, Any]) -> Any:
        """The render's text, or `FALLBACK` when only a render can say what it is."""
        value = variables.get(self.variable, FALLBACK)
        if value is FALLBACK:
            return FALLBACK
        for by_attribute, key in self.steps:
            kind = type(value)
            if kind is dict:
                if key not in value or (by_attribute and key in _DICT_ATTRIBUTES):
                    return FALLBACK
            elif kind is list:
                if by_attribute or type(key) is not int or not -len(value) <= key < len(value):
                    return FALLBACK
            else:
                return FALLBACK
            value = value[key]
        try:
            for func, args, kwargs in self.calls:
                value = func(value, *args, **kwargs)
            text = self.before + str(value) + self.after
        except Exception:
            return FALLBACK  # the render raises the same, with its own message
        if len(text) > self.limit:
            return FALLBACK
        return text.strip()


def plan(
    tree: nodes.Template, filters: Mapping[str, Callable[..., Any]], limit: int
) -> Direct | None:
    """A `Direct` for a parsed template of the recognised shape, else None."""
    if len(tree.body) != 1 or not isinstance(tree.body[0], nodes.Output):
        return None
    parts = tree.body[0].nodes
    exprs = [i for i, node in enumerate(parts) if not isinstance(node, nodes.TemplateData)]
    if len(exprs) != 1:
        return None
    at = exprs[0]
    before = "".join(node.data for node in parts[:at])
    after = "".join(node.data for node in parts[at + 1 :])
    node = parts[at]
    calls: list[Call] = []
    while isinstance(node, nodes.Filter):
        call = _call(node, filters)
        if call is None or len(calls) == MAX_STEPS:
            return None
        calls.append(call)
        node = node.node
    steps: list[Step] = []
    while isinstance(node, nodes.Getattr | nodes.Getitem):
        if isinstance(node, nodes.Getattr):
            steps.append((True, node.attr))
        else:
            key = _key(node.arg)
            if key is None:
                return None
            steps.append((False, key))
        if len(steps) > MAX_STEPS:
            return None
        node = node.node
    if not isinstance(node, nodes.Name) or node.name not in VARIABLES:
        return None
    return Direct(node.name, steps[::-1], calls[::-1], before, after, limit)


def _call(node: nodes.Filter, filters: Mapping[str, Callable[..., Any]]) -> Call | None:
    func = filters.get(node.name)
    if node.name not in FILTERS or func is None or hasattr(func, "jinja_pass_arg"):
        return None
    if node.dyn_args is not None or node.dyn_kwargs is not None:
        return None
    args = tuple(_literal(arg) for arg in node.args)
    kwargs = {kw.key: _literal(kw.value) for kw in node.kwargs}
    if NOT_LITERAL in args or NOT_LITERAL in kwargs.values():
        return None
    return func, args, kwargs


NOT_LITERAL: Any = object()


def _literal(node: nodes.Node) -> Any:
    """The value of a constant (``-1`` parses as a negation), else `NOT_LITERAL`. A float
    must be finite: Jinja writes ``inf`` and ``nan`` as names that do not exist."""
    if isinstance(node, nodes.Neg):
        value = _literal(node.node)
        if type(value) in (int, float):
            return -value
        return NOT_LITERAL
    if not isinstance(node, nodes.Const):
        return NOT_LITERAL
    if isinstance(node.value, float) and not math.isfinite(node.value):
        return NOT_LITERAL
    return node.value


def _key(node: nodes.Node) -> str | int | None:
    """A constant item key: a string or an integer."""
    key = _literal(node)
    return key if type(key) in (str, int) else None
