"""TopicRouter: pattern compilation, matching, instance keys, and finding it in an application."""

from __future__ import annotations

import pytest
from channels.routing import ProtocolTypeRouter

from gateway.mqtt.routing import (
    TopicPattern,
    TopicRouter,
    find_topic_router,
    run_innermost,
    topic,
)


async def app_a(scope, receive, send):
    return ("a", scope["url_route"])


async def app_b(scope, receive, send):
    return ("b", scope["url_route"])


DEVICE_PATTERNS = [
    "devices/{device_id}/telemetry",
    "devices/{device_id}/telemetry/{metric}",
    "devices/{device_id}/status",
    "devices/{device_id}/commands/ack",
]


def make_router() -> TopicRouter:
    return TopicRouter(
        [
            topic(DEVICE_PATTERNS, app_a, name="device"),
            topic("tele/{device_id}/{kind}", app_b, key=["device_id"], name="tasmota"),
            topic("logs/{path:#}", app_b, name="logs"),
            topic("+/broadcast", app_b),
        ]
    )


@pytest.mark.parametrize(
    ("pattern", "mqtt_filter", "params"),
    [
        ("devices/{device_id}/telemetry", "devices/+/telemetry", ("device_id",)),
        ("a/{x}/b/{y}", "a/+/b/+", ("x", "y")),
        ("a/+/{x}/#", "a/+/+/#", ("x",)),
        ("logs/{rest:#}", "logs/#", ("rest",)),
        ("plain/topic", "plain/topic", ()),
        ("a//b", "a//b", ()),
    ],
)
def test_pattern_compiles_to_filter(pattern, mqtt_filter, params):
    compiled = TopicPattern.compile(pattern)
    assert compiled.filter == mqtt_filter
    assert compiled.params == params


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "a/#/b",
        "a/{x:#}/b",
        "a/{x}/{x}",
        "a/dev-{x}",
        "a/b+",
        "a/#b",
        "a/{1x}",
        "a/{x:+}",
        "a/{}",
        "a\0b",
    ],
)
def test_invalid_patterns_raise(pattern):
    with pytest.raises(ValueError):
        TopicPattern.compile(pattern)


def test_invalid_routes_raise():
    with pytest.raises(ValueError, match="key parameter"):
        topic(["a/{x}", "b/{y}"], app_a, key=["x"])
    with pytest.raises(ValueError, match="at least one"):
        topic([], app_a)
    with pytest.raises(ValueError, match="duplicate"):
        TopicRouter([topic("a", app_a, name="n"), topic("b", app_a, name="n")])
    with pytest.raises(ValueError, match="not callable"):
        topic("a", "nope")


def test_resolve_params_and_key_grouping():
    router = make_router()
    topics = [
        "devices/d1/telemetry",
        "devices/d1/telemetry/temperature",
        "devices/d1/status",
        "devices/d1/commands/ack",
    ]
    matches = [router.resolve(t) for t in topics]
    assert all(m is not None and m.route == "device" for m in matches)
    # Every topic of device d1 belongs to the same instance.
    assert {m.instance_key for m in matches} == {("device", "d1")}
    assert matches[1].params == {"device_id": "d1", "metric": "temperature"}
    assert matches[1].key_params == {"device_id": "d1"}
    assert matches[1].pattern == "devices/{device_id}/telemetry/{metric}"
    assert router.resolve("devices/d2/status").instance_key == ("device", "d2")


def test_explicit_key_unnamed_route_and_multilevel():
    router = make_router()
    m = router.resolve("tele/plug-1/SENSOR")
    assert (m.route, m.params, m.key_params) == (
        "tasmota",
        {"device_id": "plug-1", "kind": "SENSOR"},
        {"device_id": "plug-1"},
    )
    assert router.resolve("tele/plug-1/LWT").instance_key == m.instance_key
    logs = router.resolve("logs/a/b/c")
    assert logs.params == {"path": "a/b/c"} and logs.instance_key == ("logs", "a/b/c")
    assert router.resolve("logs").params == {"path": ""}  # '#' matches the parent level
    unnamed = router.resolve("x/broadcast")
    assert unnamed.route == 3 and unnamed.instance_key == (3,)


@pytest.mark.parametrize(
    "topic_name",
    [
        "devices/d1",
        "devices//telemetry",  # a parameter is never empty
        "devices/d1/telemetry/a/b",
        "devices/d1/unknown",
        "other",
        "$SYS/broadcast",  # '$' topics never match a leading wildcard
    ],
)
def test_non_matching_topics(topic_name):
    assert make_router().resolve(topic_name) is None


def test_dollar_topics_match_literal_patterns_only():
    router = TopicRouter([topic("$SYS/broker/{stat:#}", app_a), topic("#", app_b)])
    assert router.resolve("$SYS/broker/load").route == 0
    assert router.resolve("$other/x") is None
    assert router.resolve("normal/x").route == 1


def test_first_matching_route_wins():
    router = TopicRouter([topic("a/{x}", app_a, name="first"), topic("a/+", app_b, name="second")])
    assert router.resolve("a/1").route == "first"


def test_subscriptions_are_deduplicated_filters():
    router = TopicRouter(
        [
            topic(["devices/{id}/telemetry", "devices/{id}/status"], app_a),
            topic("devices/+/status", app_b),
        ]
    )
    assert router.subscriptions == ["devices/+/telemetry", "devices/+/status"]
    assert make_router().subscriptions == [
        "devices/+/telemetry",
        "devices/+/telemetry/+",
        "devices/+/status",
        "devices/+/commands/ack",
        "tele/+/+",
        "logs/#",
        "+/broadcast",
    ]


async def test_router_dispatches_by_scope_route():
    router = make_router()
    scope = {
        "type": "mqtt",
        "route": "tasmota",
        "url_route": {"args": (), "kwargs": {"device_id": "p"}},
    }
    assert await router(scope, None, None) == ("b", scope["url_route"])
    assert (await router({**scope, "route": "device"}, None, None))[0] == "a"
    with pytest.raises(ValueError, match="no route"):
        await router({**scope, "route": "nope"}, None, None)
    with pytest.raises(ValueError, match="mqtt"):
        await router({"type": "http"}, None, None)


class Middleware:
    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        return await self.inner(scope, receive, send)


def test_find_topic_router():
    router = make_router()
    assert find_topic_router(router) is router
    app = Middleware(ProtocolTypeRouter({"http": app_a, "mqtt": Middleware(Middleware(router))}))
    assert find_topic_router(app) is router
    with pytest.raises(ValueError, match="no TopicRouter"):
        find_topic_router(ProtocolTypeRouter({"http": app_a}))
    with pytest.raises(ValueError, match="no TopicRouter"):
        find_topic_router(app_a)


def test_a_route_refuses_a_new_key_with_its_reason():
    router = TopicRouter(
        [
            topic(
                "devices/{device_id}/telemetry",
                app_a,
                name="device",
                admit=lambda key: None if len(key["device_id"]) <= 8 else "bad_device_id",
            ),
            topic("logs/{path:#}", app_b, name="logs"),
        ]
    )
    assert router.refusal(router.resolve("devices/short/telemetry")) is None
    assert router.refusal(router.resolve("devices/" + "x" * 9 + "/telemetry")) == "bad_device_id"
    assert router.refusal(router.resolve("logs/a/b")) is None, "no admit: every key is admitted"
    with pytest.raises(ValueError, match="not callable"):
        topic("x/{a}", app_a, admit="yes")


class Tagging(Middleware):
    """Middleware that changes the scope: it must run, not be skipped."""

    async def __call__(self, scope, receive, send):
        return await self.inner({**scope, "tag": "seen"}, receive, send)


async def tagged(scope, receive, send):
    return scope.get("tag", "skipped")


async def test_run_innermost_starts_past_the_routers_and_never_past_middleware():
    router = make_router()
    scope = {"type": "mqtt", "route": "device", "url_route": {"args": (), "kwargs": {}}}
    coro = run_innermost(ProtocolTypeRouter({"mqtt": router}), scope, None, None)
    assert coro.cr_code is app_a.__code__, "the route's application, no router frame"
    assert (await coro)[0] == "a"

    wrapped = TopicRouter([topic("x/{device_id}", Tagging(tagged), name="t")])
    app = ProtocolTypeRouter({"mqtt": Tagging(wrapped)})
    assert await run_innermost(app, {"type": "mqtt", "route": "t"}, None, None) == "seen"
    inner = ProtocolTypeRouter({"mqtt": wrapped})
    assert await run_innermost(inner, {"type": "mqtt", "route": "t"}, None, None) == "seen"
    # A scope the routers would refuse goes to them, so they raise as before.
    with pytest.raises(ValueError, match="no route"):
        await run_innermost(inner, {"type": "mqtt", "route": "nope"}, None, None)
