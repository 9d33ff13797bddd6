"""Topic routing for the `mqtt` protocol, in the spirit of Channels' `URLRouter`.

A route maps MQTT topic patterns with named parameters (`devices/{device_id}/telemetry`) to an
ASGI application. Each pattern is also an MQTT subscription filter (`devices/+/telemetry`); the
interface server subscribes to the router's filters and asks `resolve(topic)` which application
instance (route + key parameters) a message belongs to.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from channels.routing import ProtocolTypeRouter

_PARAM = re.compile(r"^\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<multi>:#)?\}$")
_SINGLE, _MULTI, _PLUS, _HASH = "{}", "{#}", "+", "#"


@dataclass(frozen=True)
class TopicPattern:
    """One compiled pattern: its text, MQTT subscription filter and per-level matcher."""

    text: str
    filter: str
    levels: tuple[tuple[str, str], ...]  # (kind, literal-or-param-name) per level
    params: tuple[str, ...]

    @classmethod
    def compile(cls, text: str) -> TopicPattern:
        """Compile a pattern; raise ValueError when it is not a valid topic pattern."""
        if not isinstance(text, str) or not text:
            raise ValueError(f"topic pattern must be a non-empty string, not {text!r}")
        if "\0" in text:
            raise ValueError(f"topic pattern {text!r} contains NUL")
        raw = text.split("/")
        levels: list[tuple[str, str]] = []
        names: list[str] = []
        for i, level in enumerate(raw):
            last = i == len(raw) - 1
            match = _PARAM.match(level)
            if match:
                name, multi = match["name"], bool(match["multi"])
                if name in names:
                    raise ValueError(f"topic pattern {text!r} repeats parameter {name!r}")
                if multi and not last:
                    raise ValueError(f"in {text!r}, {{{name}:#}} must be the last level")
                names.append(name)
                levels.append((_MULTI if multi else _SINGLE, name))
            elif level == "+":
                levels.append((_PLUS, ""))
            elif level == "#":
                if not last:
                    raise ValueError(f"in {text!r}, '#' must be the last level")
                levels.append((_HASH, ""))
            elif any(c in level for c in "+#{}"):
                raise ValueError(
                    f"topic pattern {text!r}: level {level!r} mixes text with a wildcard or "
                    "parameter; a parameter or wildcard must be a whole level"
                )
            else:
                levels.append(("", level))
        mqtt_filter = "/".join(
            {_SINGLE: "+", _MULTI: "#", _PLUS: "+", _HASH: "#"}.get(kind, value)
            for kind, value in levels
        )
        return cls(text, mqtt_filter, tuple(levels), tuple(names))

    def match(self, topic_levels: list[str]) -> dict[str, str] | None:
        """The parameters captured from a topic split on '/', or None when it does not match."""
        levels = self.levels
        n = len(levels)
        # MQTT: a topic starting with '$' never matches a filter starting with a wildcard.
        if topic_levels[0][:1] == "$" and levels[0][0]:
            return None
        params: dict[str, str] = {}
        for i, (kind, value) in enumerate(levels):
            if kind == _MULTI or kind == _HASH:
                # '#' also matches the parent level itself ("a/#" matches "a").
                if kind == _MULTI:
                    params[value] = "/".join(topic_levels[i:])
                return params
            if i >= len(topic_levels):
                return None
            level = topic_levels[i]
            if not kind:
                if level != value:
                    return None
            elif kind == _SINGLE:
                if not level:  # a parameter is never empty
                    return None
                params[value] = level
        return params if len(topic_levels) == n else None


@dataclass(frozen=True, slots=True)
class Match:
    """The outcome of `TopicRouter.resolve`: which route and instance a topic belongs to."""

    route: str | int
    instance_key: Hashable
    key_params: dict[str, str]
    params: dict[str, str]
    pattern: str


#: A route's check of a new instance's key parameters: None admits, a string is the reason
#: (a `gateway_messages_rejected_total` label) the message is refused for. It may also have an
#: async ``prepare()`` (load what it decides on), awaited before every subscription.
Admit = Callable[[Mapping[str, str]], str | None]


@dataclass
class TopicRoute:
    """Patterns routed to one ASGI application; `key` names the params that pick the instance."""

    patterns: tuple[TopicPattern, ...]
    app: Any
    key: tuple[str, ...]
    name: str | None = None
    static: bool = False
    admit: Admit | None = None
    subscribe: bool = True
    accepts: Callable[[str], bool] | None = None
    id: str | int = field(default="", init=False)


def topic(
    patterns: str | Sequence[str],
    app: Any,
    *,
    key: Sequence[str] | None = None,
    name: str | None = None,
    static: bool = False,
    admit: Admit | None = None,
    subscribe: bool = True,
    accepts: Callable[[str], bool] | None = None,
) -> TopicRoute:
    """Route MQTT topic patterns to `app`; one app instance per distinct value of `key` params.

    `key` defaults to the parameters common to all patterns (e.g. `device_id`). A `static`
    route has no key (one instance), started on connect without waiting for a message and
    never retired for idleness: a service that publishes on its own (docs/asgi-mqtt.md).
    `admit(key_params)` is asked before an instance is created for a new key: a reason string
    refuses the message (counted and acknowledged) before anything is allocated for it.
    With `subscribe=False` its patterns are not subscribed by the server (the application
    subscribes what it wants with `mqtt.subscribe`), and `accepts(topic)`, when given, must
    also say yes for a topic to match it.
    """
    texts = [patterns] if isinstance(patterns, str) else list(patterns)
    if not texts:
        raise ValueError("topic() needs at least one pattern")
    compiled = tuple(TopicPattern.compile(text) for text in texts)
    common = [p for p in compiled[0].params if all(p in c.params for c in compiled[1:])]
    key_names = tuple(common if key is None else key)
    for pattern in compiled:
        missing = [k for k in key_names if k not in pattern.params]
        if missing:
            raise ValueError(f"key parameter(s) {missing} not captured by pattern {pattern.text!r}")
    if not callable(app):
        raise ValueError(f"route application {app!r} is not callable")
    if static and key_names:
        raise ValueError(f"a static route has one instance: no key parameters, not {key_names}")
    if admit is not None and not callable(admit):
        raise ValueError(f"admit {admit!r} is not callable")
    return TopicRoute(compiled, app, key_names, name, static, admit, subscribe, accepts)


class TopicRouter:
    """An ASGI app dispatching `mqtt` scopes to routes by `scope["route"]`; resolves topics."""

    def __init__(self, routes: Sequence[TopicRoute]) -> None:
        self.routes = list(routes)
        self._by_id: dict[str | int, TopicRoute] = {}
        for index, route in enumerate(self.routes):
            if not isinstance(route, TopicRoute):
                raise ValueError(f"TopicRouter expects topic() routes, got {route!r}")
            route.id = route.name if route.name is not None else index
            if route.id in self._by_id:
                raise ValueError(f"duplicate route name {route.id!r}")
            self._by_id[route.id] = route
        # Each pattern with its literal first level (None: a wildcard or parameter), compared
        # before matching: most patterns a topic passes differ there.
        self._table = [
            (route, pattern, None if pattern.levels[0][0] else pattern.levels[0][1])
            for route in self.routes
            for pattern in route.patterns
        ]

    @property
    def static_matches(self) -> list[Match]:
        """One `Match` per static route: the instances the server starts on connect."""
        return [
            Match(route.id, (route.id,), {}, {}, route.patterns[0].text)
            for route in self.routes
            if route.static
        ]

    @property
    def subscriptions(self) -> list[str]:
        """The MQTT subscription filters covering every pattern, deduplicated, in route order."""
        return list(
            dict.fromkeys(pattern.filter for route, pattern, _ in self._table if route.subscribe)
        )

    async def prepare(self) -> None:
        """Await every route's ``admit.prepare()`` (the server calls it before subscribing)."""
        for route in self.routes:
            prepare = getattr(route.admit, "prepare", None)
            if prepare is not None:
                await prepare()

    def refusal(self, match: Match) -> str | None:
        """Why a new instance for `match` is refused (its route's `admit`), or None."""
        admit = self._by_id[match.route].admit
        return None if admit is None else admit(match.key_params)

    def resolve(self, topic_name: str) -> Match | None:
        """The first route whose pattern matches `topic_name`, with its params, else None."""
        levels = topic_name.split("/")
        head = levels[0]
        for route, pattern, first in self._table:
            if first is not None and first != head:
                continue
            if route.accepts is not None and not route.accepts(topic_name):
                continue
            params = pattern.match(levels)
            if params is not None:
                key_params = {k: params[k] for k in route.key}
                key = (route.id, *key_params.values())
                return Match(route.id, key, key_params, params, pattern.text)
        return None

    def app_for(self, scope: Mapping[str, Any]) -> Any:
        """The application `__call__` runs for `scope` (None: it would raise)."""
        route = self._by_id.get(scope.get("route")) if scope.get("type") == "mqtt" else None
        return None if route is None else route.app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        """Run the application of the route named by `scope["route"]`."""
        if scope.get("type") != "mqtt":
            raise ValueError(f"TopicRouter handles 'mqtt' scopes, not {scope.get('type')!r}")
        try:
            route = self._by_id[scope["route"]]
        except KeyError:
            raise ValueError(f"no route {scope.get('route')!r} in this TopicRouter") from None
        return await route.app(scope, receive, send)


def find_topic_router(application: Any) -> TopicRouter:
    """Find the TopicRouter inside an application (ProtocolTypeRouter["mqtt"], middleware)."""
    seen: set[int] = set()
    app = application
    while app is not None and id(app) not in seen:
        seen.add(id(app))
        if isinstance(app, TopicRouter):
            return app
        mapping = getattr(app, "application_mapping", None)
        if isinstance(mapping, dict):
            app = mapping.get("mqtt")
            continue
        app = getattr(app, "inner", None)
    raise ValueError(
        f"no TopicRouter found in {application!r}: expected a TopicRouter, a ProtocolTypeRouter "
        "with an 'mqtt' entry, or middleware (.inner) around one"
    )


def run_innermost(
    application: Any, scope: dict[str, Any], receive: Any, send: Any
) -> Coroutine[Any, Any, Any]:
    """`application(scope, receive, send)`, started past the routers.

    `ProtocolTypeRouter` and `TopicRouter` only pass the same scope, receive and send on to
    the application they pick, so the coroutine started is that application's: a long-lived
    instance holds no router frames (~0.5 KB at every one of 10,000 devices;
    docs/performance.md). Anything else (middleware, `as_asgi()`, a subclass with its own
    `__call__`) is called as it is.
    """
    app = application
    while True:
        call = type(app).__call__
        if call is ProtocolTypeRouter.__call__:
            inner = app.application_mapping.get(scope.get("type"))
        elif call is TopicRouter.__call__:
            inner = app.app_for(scope)
        else:
            inner = None
        if inner is None:
            return app(scope, receive, send)
        app = inner
