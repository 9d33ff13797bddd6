"""Alerts end to end: a real mosquitto, the real `rungateway` process, devices as MQTT clients,
a logged-in dashboard WebSocket, an MQTT subscriber on the alert topic and a local HTTP
receiver standing in for an Apprise ``json://`` notification target."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import aiomqtt
import pytest

from tests.support.alerts import receiver
from tests.support.gateway import GatewayProcess
from tests.support.publishers import vanishing_device
from tests.support.waiting import until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PASSWORD = secrets.token_urlsafe(12)


async def call(gw: GatewayProcess, method: str, path: str, cookie: str, body: Any = None):
    """An HTTP request to the gateway without blocking this loop (the receiver lives here)."""
    return await asyncio.to_thread(gw.http_request, method, path, cookie=cookie, body=body)


async def create_rule(gw: GatewayProcess, cookie: str, **rule: Any) -> int:
    status, body = await call(gw, "POST", "/api/alerts/rules", cookie, rule)
    assert status == 201, body
    return body["id"]


async def next_alert(ws: Any, wait: float = 15.0) -> dict:
    """The next ``alert`` frame's alert on a dashboard WebSocket."""
    async with asyncio.timeout(wait):
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "alert":
                return frame["alert"]


async def next_event(events: aiomqtt.Client, wait: float = 15.0) -> tuple[str, dict, bool]:
    async with asyncio.timeout(wait):
        message = await anext(aiter(events.messages))
    return str(message.topic), json.loads(message.payload), bool(message.retain)


async def publish(port: int, device: str, **metrics: Any) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"dev-{secrets.token_hex(3)}") as c:
        await c.publish(f"devices/{device}/telemetry", json.dumps(metrics), qos=1)


async def test_threshold_for_fires_and_clears_and_a_restart_repeats_nothing(mosquitto):
    async with receiver() as (inbox, url):
        env = {"GATEWAY_ALERT_NOTIFY_URLS": url}
        with GatewayProcess(mosquitto.url, env=env) as gw:
            gw.create_user("operator", PASSWORD, staff=True)
            cookie = gw.login("operator", PASSWORD)
            rule = await create_rule(
                gw, cookie, name="Boiler too hot", device="boiler-*", metric="temperature",
                op="above", threshold=80, **{"for": 1}, severity="critical",
            )  # fmt: skip
            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as events:
                await events.subscribe(f"gateway/{gw.gateway_id}/alerts/#", qos=1)
                async with gw.ws_connect(cookie) as ws:
                    assert json.loads(await ws.recv())["type"] == "snapshot"
                    hot_since = time.time()
                    await publish(mosquitto.port, "boiler-1", temperature=91.5)
                    raised = await next_alert(ws)  # the first alert frame: none before it
                assert raised["raised_at"] >= hot_since + 1 - 0.01  # held for its 1 s first
                assert raised["rule"] == rule and raised["device"] == "boiler-1"
                assert raised["state"] == "active" and raised["value"] == 91.5
                topic, event, retained = await next_event(events)
                assert topic == f"gateway/{gw.gateway_id}/alerts/boiler-1" and not retained
                assert event["id"] == raised["id"] and event["state"] == "active"
                status, active = await call(gw, "GET", "/api/alerts/?state=active", cookie)
                assert status == 200 and [a["id"] for a in active] == [raised["id"]]
                assert len(await inbox.wait_for(1)) == 1

                # kettle-2 starts its 3 s just before the gateway stops: its timer must
                # survive the restart; boiler-1's active alert must not be raised again.
                rule2 = await create_rule(
                    gw, cookie, name="Kettle slow", device="kettle-2", metric="temperature",
                    op="above", threshold=80, **{"for": 3}, severity="warning",
                )  # fmt: skip
                await asyncio.to_thread(gw.wait_for_log, r"alerts: 2 rules")
                started = time.time()
                await publish(mosquitto.port, "kettle-2", temperature=85)
                await until(lambda: gw.history(cookie, "kettle-2", "temperature"), what="stored")
                await asyncio.to_thread(gw.stop)
                await asyncio.to_thread(gw.start, False)
                cookie = gw.login("operator", PASSWORD)
                async with gw.ws_connect(cookie) as ws:
                    assert json.loads(await ws.recv())["type"] == "snapshot"
                    await publish(mosquitto.port, "boiler-1", temperature=95)  # still hot
                    second = await next_alert(ws)
                    assert second["rule"] == rule2 and second["state"] == "active"
                    assert second["raised_at"] >= started + 3 - 0.5  # its `for`, restart or not
                    await publish(mosquitto.port, "boiler-1", temperature=20)
                    cleared = await next_alert(ws)
                    assert cleared["id"] == raised["id"] and cleared["state"] == "cleared"
                    # Sentinel: another boiler raised after the clear is the next alert
                    # everywhere; nothing was repeated before it.
                    await publish(mosquitto.port, "boiler-sentinel", temperature=99)
                    sentinel = await next_alert(ws)
                    assert (sentinel["device"], sentinel["state"]) == ("boiler-sentinel", "active")
                topic, event, _ = await next_event(events)
                assert event["id"] == second["id"]
                topic, event, _ = await next_event(events)
                assert event["id"] == raised["id"] and event["state"] == "cleared"
                topic, event, _ = await next_event(events)
                assert event["id"] == sentinel["id"], event
            bodies = await inbox.wait_for(4)  # one notifier, in order: the sentinel's last
            titles = [b["title"] for b in inbox.bodies]
            assert len(titles) == 4, titles  # raised, raised, cleared, sentinel: none repeated
            assert "raised on boiler-1" in titles[0] and "cleared on boiler-1" in titles[2]
            assert bodies[1]["title"].endswith("raised on kettle-2")
            assert titles[3].endswith("raised on boiler-sentinel"), titles


async def test_an_offline_rule_fires_from_the_devices_last_will(mosquitto):
    with GatewayProcess(mosquitto.url) as gw:
        gw.create_user("operator", PASSWORD, staff=True)
        cookie = gw.login("operator", PASSWORD)
        rule = await create_rule(
            gw, cookie, name="Sensor gone", device="lwt-*", op="offline", severity="warning",
            **{"for": 1},
        )  # fmt: skip
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as events:
            await events.subscribe(f"gateway/{gw.gateway_id}/alerts/+", qos=1)
            async with gw.ws_connect(cookie) as ws:
                assert json.loads(await ws.recv())["type"] == "snapshot"
                async with vanishing_device(mosquitto.port, "lwt-1") as device:
                    killed_at = time.time()
                    device.kill()  # no DISCONNECT: the broker publishes the will
                    alert = await next_alert(ws, 20)  # the first alert: none while online
            assert alert["rule"] == rule and alert["device"] == "lwt-1"
            assert alert["state"] == "active"
            assert alert["raised_at"] >= killed_at - 0.01, "raised before the device went away"
            topic, event, _ = await next_event(events)
            assert topic.endswith("/alerts/lwt-1") and event["id"] == alert["id"]

            viewer_password = secrets.token_urlsafe(12)
            gw.create_user("viewer", viewer_password, staff=False)
            viewer = gw.login("viewer", viewer_password)
            status, _ = await call(gw, "POST", f"/api/alerts/{alert['id']}/ack", viewer, {})
            assert status == 403
            status, body = await call(gw, "POST", f"/api/alerts/{alert['id']}/ack", cookie, {})
            assert status == 200 and body["acknowledged_by"] == "operator"
            topic, event, _ = await next_event(events)
            assert event["id"] == alert["id"] and event["acknowledged"] is True


@pytest.mark.postgres
async def test_two_bridges_raise_one_alert_and_notify_once(mosquitto, redis_server):
    """Two `runmqtt --shared-group` bridges split one device's readings (Redis, PostgreSQL);
    a rule posted to the web tier reaches both; each episode is one alert, one notification."""
    from tests.support.gateway import postgres_database, split_deployment
    from tests.test_scaleout import running

    common = {"GATEWAY_ID": f"alerts-{secrets.token_hex(3)}"}
    async with receiver() as (inbox, url):
        common["GATEWAY_ALERT_NOTIFY_URLS"] = url
        with postgres_database() as database_url:
            process = split_deployment(mosquitto.url, database_url, redis_server.url, common)
            bridges = [process("runmqtt", "--shared-group", "g") for _ in range(2)]
            web = process("uvicorn", "--no-access-log")
            async with running(*bridges, web):
                await asyncio.to_thread(web.create_user, "operator", PASSWORD, staff=True)
                cookie = await asyncio.to_thread(web.login, "operator", PASSWORD)
                rule = await create_rule(
                    web, cookie, name="Hot", device="shared-1", metric="t", op="above",
                    threshold=10, **{"for": 0.5}, severity="warning",
                )  # fmt: skip
                for bridge in bridges:
                    await asyncio.to_thread(bridge.wait_for_log, r"alerts: 1 rules")
                async with web.ws_connect(cookie) as ws:
                    assert json.loads(await ws.recv())["type"] == "snapshot"
                    for value in (11, 12, 13, 14):  # both bridges hear the episode
                        await publish(mosquitto.port, "shared-1", t=value)
                    raised = await next_alert(ws)
                    assert raised["rule"] == rule and raised["state"] == "active"
                    for value in (5, 4):
                        await publish(mosquitto.port, "shared-1", t=value)
                    cleared = await next_alert(ws)
                    assert cleared["id"] == raised["id"] and cleared["state"] == "cleared"
                    # Each next episode is the sentinel of the one before: its frame is the
                    # next alert, so the other bridge's clear found nothing to clear, and
                    # its raise raised nothing a second time.
                    for value in (20, 21, 22, 23):  # a new episode, whichever bridge hears it
                        await publish(mosquitto.port, "shared-1", t=value)
                    again = await next_alert(ws)
                    assert again["state"] == "active" and again["id"] != raised["id"], again
                    status, active = await call(web, "GET", "/api/alerts/?state=active", cookie)
                    assert [a["id"] for a in active] == [again["id"]]
                    for value in (5, 4):
                        await publish(mosquitto.port, "shared-1", t=value)
                    over = await next_alert(ws)
                    assert (over["id"], over["state"]) == (again["id"], "cleared"), over
                status, every = await call(web, "GET", "/api/alerts/", cookie)
                assert status == 200 and [a["id"] for a in every] == [again["id"], raised["id"]]
                await inbox.wait_for(4)
                titles = [body["title"] for body in inbox.bodies]
                assert len(titles) == 4, titles  # raised, cleared, raised, cleared: none twice


async def test_runserial_evaluates_its_serial_devices(mosquitto, redis_server, tmp_path):
    """`runserial` beside a web process (Redis): a rule posted to the web reaches it; its serial
    device's reading raises an alert every dashboard sees; unplugging raises `offline`."""
    from tests.test_serial_e2e import plugged

    link = tmp_path / "usb-alerts"
    async with plugged(link) as port:
        with GatewayProcess(mosquitto.url, redis_url=redis_server.url) as web:
            web.create_user("operator", PASSWORD, staff=True)
            cookie = web.login("operator", PASSWORD)
            bridge = web.beside("runserial", "--serial", f"{link}?device=tty-1")
            with bridge:
                bridge.wait_for_log(r"usb-alerts opened")
                hot = await create_rule(
                    web, cookie, name="Hot", device="tty-*", metric="temperature", op="above",
                    threshold=30, severity="critical",
                )  # fmt: skip
                gone = await create_rule(
                    web, cookie, name="Unplugged", device="tty-1", op="offline",
                    severity="warning",
                )  # fmt: skip
                await asyncio.to_thread(bridge.wait_for_log, r"alerts: 2 rules")
                async with web.ws_connect(cookie) as ws:
                    assert json.loads(await ws.recv())["type"] == "snapshot"
                    await port.send(b"temperature=31.5\n")
                    alert = await next_alert(ws)
                    assert alert["rule"] == hot and alert["device"] == "tty-1"
                    assert alert["value"] == 31.5
                    port.unplug()
                    offline = await next_alert(ws)
                    assert offline["rule"] == gone and offline["state"] == "active"
                    # Evaluated once, not again by the web's bridge: a reading that bridge
                    # evaluates after the unplug raises the next alert.
                    await publish(mosquitto.port, "tty-sentinel", temperature=40)
                    sentinel = await next_alert(ws)
                    assert (sentinel["rule"], sentinel["device"]) == (hot, "tty-sentinel"), sentinel
