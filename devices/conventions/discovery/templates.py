"""Home Assistant templates (``value_template``, ``command_template``…) in a bounded sandbox.

Jinja2's `SandboxedEnvironment` keeps a template away from Python internals; on top of it each
render is bounded so a hostile or careless document cannot stall the bridge or eat its memory:

- the source is at most `MAX_SOURCE` characters and is compiled once per distinct text (the
  last `MAX_COMPILED` kept), shared by every entity that ships it;
- statically refused (`Unsupported`, with the reason): macros and call blocks (recursion),
  ``include``/``import``/``extends``, a ``for`` inside a ``for``, ``~`` inside ``set``, and any
  filter, test or global that is not in the tables below;
- while rendering: at most `MAX_STEPS` operations (calls, filters, tests, ``range`` steps,
  arithmetic), every string or list a filter or operator builds at most `MAX_OUTPUT` long and
  every integer at most `MAX_INT_BITS` bits, ``**`` with an exponent of at most 64, ``round``
  to at most 15 places, regexes without nested quantifiers, quantified alternations or
  backreferences on at most 4096 characters, the output at most `MAX_OUTPUT` characters and
  the whole render at most `MAX_SECONDS`; past any of these the render fails (`RenderError`).

Filters and globals are the ones device templates use (Home Assistant's template docs): the
Jinja built-ins that cannot allocate (`lower`, `upper`, `trim`, `replace` (bounded), `round`,
`int`, `float`, `default`, `string`, `length`, `join`, `first`, `last`, `abs`, `min`, `max`,
`list`, `tojson`…) plus HA's `float`/`int` with a default, `is_defined`, `iif`,
`as_timestamp`, `timestamp_custom`, `bitwise_and`/`bitwise_or`, `from_json`/`to_json`,
`regex_match`/`regex_search`… (regexes are limited to `MAX_REGEX` characters of pattern).

The commonest shapes (``{{ value_json.x | float(0) }}``…) are read without a render by
`direct` (same text, same filters; anything else still renders, direct.py says how).

Over 400 lines on purpose: Home Assistant's filters and the bounds on every one of them are
one sandbox; split, a filter could escape its bound.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from jinja2 import Undefined, nodes
from jinja2.exceptions import TemplateError
from jinja2.sandbox import SandboxedEnvironment

from devices.conventions.discovery.direct import FALLBACK, Direct, plan

MAX_SOURCE = 4096
MAX_OUTPUT = 65536
MAX_STEPS = 20_000
MAX_SECONDS = 0.05
MAX_REGEX = 200
MAX_EXPONENT = 64
MAX_INT_BITS = 4096
MAX_PRECISION = 15
MAX_REGEX_SUBJECT = 4096
MAX_COMPILED = 1024  # distinct template sources kept compiled (least recently used goes)
# Nested quantifiers and quantified alternations: the patterns that backtrack exponentially.
_EXPLOSIVE = re.compile(r"\([^)]*[+*}][^)]*\)[+*{]|\([^)]*\|[^)]*\)[+*{]|\\[1-9]")


class Unsupported(ValueError):
    """A template this gateway will not run; the message says why."""


class RenderError(ValueError):
    """A render that failed or broke a bound; the message says which."""


class _Budget:
    """Steps and time left for the render in progress (one per render)."""

    __slots__ = ("steps", "deadline")

    def __init__(self) -> None:
        self.steps = MAX_STEPS
        self.deadline = time.monotonic() + MAX_SECONDS

    def spend(self, n: int = 1) -> None:
        self.steps -= n
        if self.steps < 0:
            raise RenderError(f"more than {MAX_STEPS} template operations")
        if not self.steps % 256 and time.monotonic() > self.deadline:
            raise RenderError(f"template ran longer than {MAX_SECONDS} s")


_current: list[_Budget] = []  # the render in progress (renders never interleave: sync code)


def _spend(n: int = 1) -> None:
    if _current:
        _current[-1].spend(n)


def _bounded(value: Any) -> Any:
    if isinstance(value, str | bytes | list | tuple | dict) and len(value) > MAX_OUTPUT:
        raise RenderError(f"a value of {len(value)} items or characters is too large")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise RenderError(f"an integer of over {MAX_INT_BITS} bits is too large")
    return value


def _counted(func: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _spend()
        return _bounded(func(*args, **kwargs))

    wrapper.__name__ = getattr(func, "__name__", "filter")
    # Keep Jinja's pass_context / pass_environment markers of the wrapped filter.
    if hasattr(func, "jinja_pass_arg"):
        wrapper.jinja_pass_arg = func.jinja_pass_arg  # type: ignore[attr-defined]
    return wrapper


def _number(value: Any, default: Any, convert: Callable[[Any], Any], name: str) -> Any:
    try:
        if isinstance(value, str):
            value = value.strip()
        result = convert(value)
        if isinstance(result, float) and not math.isfinite(result):
            raise ValueError
        return result
    except (TypeError, ValueError, OverflowError):
        if default is _MISSING:
            raise RenderError(f"{name}: cannot convert {str(value)[:40]!r}") from None
        return default


_MISSING = object()


def ha_float(value: Any, default: Any = _MISSING) -> Any:
    """HA's ``float``: a number, else the default (an error without one)."""
    return _number(value, default, float, "float")


def ha_int(value: Any, default: Any = _MISSING, base: int = 10) -> Any:
    """HA's ``int``: floats truncate, strings parse in `base`, else the default."""

    def convert(v: Any) -> int:
        if isinstance(v, str):
            try:
                return int(v, base)
            except ValueError:
                return int(float(v))
        return int(v)

    return _number(value, default, convert, "int")


def ha_round(
    value: Any, precision: int = 0, method: str = "common", default: Any = _MISSING
) -> Any:
    """HA's ``round``: ``common``, ``ceil``, ``floor`` or ``half``."""
    number = ha_float(value, default)
    if number is default and default is not _MISSING:
        return default
    if not isinstance(precision, int) or not 0 <= precision <= MAX_PRECISION:
        raise RenderError(f"round: precision must be 0-{MAX_PRECISION}")
    if method == "ceil":
        scale = 10**precision
        return math.ceil(number * scale) / scale
    if method == "floor":
        scale = 10**precision
        return math.floor(number * scale) / scale
    if method == "half":
        return round(number * 2) / 2
    return round(number, precision) if precision else round(number)


def iif(value: Any, if_true: Any = True, if_false: Any = False, if_none: Any = _MISSING) -> Any:
    """HA's ``iif``: `if_true` when truthy, `if_false` when falsy, `if_none` for None."""
    if value is None and if_none is not _MISSING:
        return if_none
    return if_true if value else if_false


def is_defined(value: Any) -> Any:
    """HA's ``is_defined``: the value itself, an error when it is undefined."""
    if isinstance(value, Undefined):
        raise RenderError("is_defined: the value is not defined")
    return value


def as_timestamp(value: Any, default: Any = _MISSING) -> Any:
    """HA's ``as_timestamp``: an ISO 8601 string or datetime as epoch seconds."""
    try:
        if isinstance(value, datetime):
            moment = value
        elif isinstance(value, int | float):
            return float(value)
        else:
            text = str(value).strip()[:64]
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    except (TypeError, ValueError, OverflowError):
        if default is _MISSING:
            raise RenderError(f"as_timestamp: cannot read {str(value)[:40]!r}") from None
        return default


def timestamp_custom(value: Any, fmt: str = "%Y-%m-%d %H:%M:%S", local: bool = True) -> Any:
    """HA's ``timestamp_custom``: epoch seconds formatted with strftime (UTC here)."""
    if len(fmt) > 100:
        raise RenderError("timestamp_custom: format too long")
    return datetime.fromtimestamp(ha_float(value), UTC).strftime(fmt)


def _regex(pattern: str) -> re.Pattern[str]:
    """A regex that cannot backtrack for ever: short, no nested quantifiers, quantified
    alternations or backreferences (Python's `re` has no time limit)."""
    if not isinstance(pattern, str) or len(pattern) > MAX_REGEX:
        raise RenderError(f"regex patterns are limited to {MAX_REGEX} characters")
    if _EXPLOSIVE.search(pattern):
        raise RenderError("regex with nested quantifiers, alternations or backreferences")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise RenderError(f"regex: {exc}") from None


def _subject(value: Any) -> str:
    text = str(value)
    if len(text) > MAX_REGEX_SUBJECT:
        raise RenderError(f"regex on more than {MAX_REGEX_SUBJECT} characters")
    return text


def from_json(value: Any) -> Any:
    """HA's ``from_json``."""
    try:
        return orjson.loads(value)
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise RenderError(f"from_json: {exc}") from None


def to_json(value: Any) -> str:
    """HA's ``to_json`` (compact)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError as exc:
        raise RenderError(f"to_json: {exc}") from None


def bounded_replace(value: Any, old: str, new: str, count: int = -1) -> str:
    """Jinja's ``replace``, refused when the result would pass `MAX_OUTPUT`."""
    text, old, new = str(value), str(old), str(new)
    hits = text.count(old) if old else len(text) + 1
    if count >= 0:
        hits = min(hits, count)
    if len(text) + hits * max(0, len(new) - len(old)) > MAX_OUTPUT:
        raise RenderError("replace: the result would be too large")
    return text.replace(old, new, count)


def _range(*args: int) -> Iterator[int]:
    """``range`` whose every step is counted."""
    for number in range(*args):
        _spend()
        yield number


_KEPT_FILTERS = (
    "abs batch capitalize count d default dictsort e escape first join last length list lower "
    "map max min reject rejectattr reverse select selectattr sort string sum title trim unique "
    "upper urlencode tojson items"
)
HA_FILTERS: dict[str, Callable[..., Any]] = {
    "float": ha_float,
    "int": ha_int,
    "round": ha_round,
    "iif": iif,
    "is_defined": is_defined,
    "as_timestamp": as_timestamp,
    "timestamp_custom": timestamp_custom,
    "from_json": from_json,
    "to_json": to_json,
    "replace": bounded_replace,
    "bitwise_and": lambda a, b: ha_int(a) & ha_int(b),
    "bitwise_or": lambda a, b: ha_int(a) | ha_int(b),
    "regex_match": lambda v, p: bool(_regex(p).match(_subject(v))),
    "regex_search": lambda v, p: bool(_regex(p).search(_subject(v))),
    "regex_findall_index": lambda v, p, i=0: _regex(p).findall(_subject(v))[i],
    "multiply": lambda v, f: ha_float(v) * ha_float(f),
}
HA_GLOBALS: dict[str, Any] = {
    "float": ha_float,
    "int": ha_int,
    "iif": iif,
    "as_timestamp": as_timestamp,
    "now": lambda: datetime.now(UTC),
    "utcnow": lambda: datetime.now(UTC),
    "range": _range,
    "is_number": lambda v: _number(v, None, float, "") is not None and not isinstance(v, bool),
}
_KEPT_TESTS = (
    "defined undefined none number string mapping sequence iterable boolean true false "
    "integer float lower upper eq ne lt le gt ge in odd even divisibleby"
)


class _BoundedSandbox(SandboxedEnvironment):
    """The sandbox with counted calls and bounded arithmetic."""

    intercepted_binops = frozenset({"+", "*", "**"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _spend()
        return _bounded(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _spend()
        if operator == "**" and isinstance(right, int | float):
            if abs(right) > MAX_EXPONENT:
                raise RenderError(f"exponent {right} is too large")
            if isinstance(left, int) and left.bit_length() * abs(right) > MAX_INT_BITS:
                raise RenderError("the power would be too large")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    if len(seq) * times > MAX_OUTPUT:
                        raise RenderError("a repeated string or list would be too large")
        return _bounded(super().call_binop(context, operator, left, right))


def _environment() -> _BoundedSandbox:
    env = _BoundedSandbox(undefined=Undefined, autoescape=False)
    env.filters = {name: _counted(env.filters[name]) for name in _KEPT_FILTERS.split()}
    env.filters.update({name: _counted(f) for name, f in HA_FILTERS.items()})
    tests = {name: env.tests[name] for name in _KEPT_TESTS.split()}
    tests["is_number"] = HA_GLOBALS["is_number"]
    env.tests = tests
    env.globals = {name: _counted(g) if name != "range" else g for name, g in HA_GLOBALS.items()}
    return env


ENV = _environment()
_FORBIDDEN = {
    nodes.Macro: "macros",
    nodes.CallBlock: "call blocks",
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "import",
    nodes.Extends: "extends",
}


def _check(tree: nodes.Template) -> None:
    """Refuse the constructs the module docstring lists (`Unsupported`)."""
    for kind, what in _FORBIDDEN.items():
        if tree.find(kind) is not None:
            raise Unsupported(f"{what} are not supported in templates")
    for loop in tree.find_all(nodes.For):
        for inner in loop.body + loop.else_:
            if isinstance(inner, nodes.For) or inner.find(nodes.For) is not None:
                raise Unsupported("nested for loops are not supported in templates")
    for assign in (*tree.find_all(nodes.Assign), *tree.find_all(nodes.AssignBlock)):
        if assign.find(nodes.Concat) is not None:
            raise Unsupported("'~' inside 'set' is not supported in templates")
    for node in tree.find_all(nodes.Filter):
        if node.name not in ENV.filters:
            raise Unsupported(f"filter {node.name!r} is not supported")
    for node in tree.find_all(nodes.Test):
        if node.name not in ENV.tests:
            raise Unsupported(f"test {node.name!r} is not supported")


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled, checked template; `render` fills in ``value``/``value_json`` and friends."""

    source: str
    _compiled: Any
    _direct: Direct | None = None  # the shape evaluated without a render (direct.py)

    def render(self, **variables: Any) -> str:
        """The rendered text, stripped; `RenderError` when it fails or breaks a bound."""
        return self.evaluate(variables)

    def evaluate(self, variables: dict[str, Any]) -> str:
        """`render` with the variables in a dict (one per message, shared by its templates)."""
        if self._direct is not None:
            text = self._direct(variables)
            if text is not FALLBACK:
                return text
        budget = _Budget()
        _current.append(budget)
        try:
            out: list[str] = []
            size = 0
            for chunk in self._compiled.generate(**variables):
                size += len(chunk)
                if size > MAX_OUTPUT:
                    raise RenderError(f"output longer than {MAX_OUTPUT} characters")
                out.append(chunk)
                budget.spend()
            return "".join(out).strip()
        except RenderError:
            raise
        except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
            raise RenderError(f"{type(exc).__name__}: {exc}"[:300]) from None
        except RecursionError:
            raise RenderError("template recursion") from None
        finally:
            _current.pop()


def compile_template(source: Any) -> Template:
    """Parse, check and compile a template once; `Unsupported` with the reason if refused."""
    if not isinstance(source, str):
        raise Unsupported("a template must be a string")
    if len(source) > MAX_SOURCE:
        raise Unsupported(f"template longer than {MAX_SOURCE} characters")
    return _compile(source)


@functools.lru_cache(maxsize=MAX_COMPILED)
def _compile(source: str) -> Template:
    """One compiled template per source text: a fleet of one model shares its templates."""
    try:
        tree = ENV.parse(source)
        _check(tree)
        shortcut = plan(tree, ENV.filters, MAX_OUTPUT)  # before compiling (it rewrites the tree)
        compiled = ENV.from_string(tree)
    except TemplateError as exc:
        raise Unsupported(f"template does not parse: {exc}"[:300]) from None
    return Template(source, compiled, shortcut)


def render_value(template: Template, payload: bytes | str) -> str:
    """Render a ``value_template`` for an MQTT payload: ``value`` and ``value_json``."""
    value = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    variables: dict[str, Any] = {"value": value}
    try:
        variables["value_json"] = orjson.loads(value)
    except orjson.JSONDecodeError:
        pass  # undefined, as in Home Assistant
    return template.render(**variables)


__all__ = [
    "MAX_OUTPUT",
    "MAX_SOURCE",
    "RenderError",
    "Template",
    "Unsupported",
    "compile_template",
    "render_value",
]
