"""Hostile devices against the real gateway: every bad message counted, none of them harmful.

Hundreds of malformed messages go through a real broker into a real `rungateway` process; each
must be rejected exactly once with a reason, the process must stay healthy, and the good
reading published right behind them must still reach a logged-in dashboard as strict JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import time

import aiomqtt
import pytest

from tests.support.gateway import GatewayProcess

pytestmark = pytest.mark.e2e

PASSWORD = secrets.token_urlsafe(12)
UNKNOWN_ACK = b'{"id": "00000000-0000-0000-0000-000000000000", "ok": true}'


def hostile_messages() -> list[tuple[str, bytes]]:
    """(topic, payload) pairs the gateway must each reject exactly once."""
    deep = b'{"a":' * 5000 + b"1" + b"}" * 5000
    return [
        ("devices/bad id!/telemetry", b'{"t": 1}'),
        ("devices/" + "x" * 65 + "/telemetry", b'{"t": 1}'),
        ("devices/d\u00e9vice/telemetry", b'{"t": 1}'),
        ("devices/h1/telemetry", b"not json"),
        ("devices/h1/telemetry", b"{"),
        ("devices/h1/telemetry", b"[1, 2, 3]"),
        ("devices/h1/telemetry", b'{"t": NaN}'),
        ("devices/h1/telemetry", b'{"t": Infinity}'),
        ("devices/h1/telemetry", b'{"t": -Infinity}'),
        ("devices/h1/telemetry", b"\xff\xfe\x00garbage"),
        ("devices/h1/telemetry", b'{"t": ' + b"1" * 1_000_000 + b"}"),
        ("devices/h1/telemetry", deep),
        ("devices/h1/telemetry", b"{}"),
        ("devices/h1/telemetry", b'{"name": "only strings"}'),
        ("devices/h1/telemetry", b'{"t": 1, "ts": "yesterday-ish"}'),
        ("devices/h1/telemetry", b'{"t": 1, "ts": 1}'),
        ("devices/h1/telemetry", b'{"t": 1, "ts": 99999999999999999}'),
        ("devices/h1/telemetry", b'{"\\u0000": 1}'),
        ("devices/h1/telemetry", os.urandom(48).replace(b"{", b"(")),
        ("devices/h1/telemetry/temperature", b"warm"),
        ("devices/h1/telemetry/temperature", b"NaN"),
        ("devices/h1/status", b"maybe"),
        # (An empty payload is no hostile message: it clears a retained topic, and is ignored;
        # tests/test_retained_and_presence.py.)
        ("devices/h1/commands/ack", UNKNOWN_ACK),
        ("devices/h1/commands/ack", b'{"id": "not-a-command", "ok": false, "error": "x"}'),
        ("devices/h1/commands/ack", b"ack!"),
    ]


def rejected_total(gw: GatewayProcess) -> tuple[float, dict[str, float]]:
    """Sum and per-reason values of gateway_messages_rejected_total."""
    _, text = gw.http_get("/metrics")
    by_reason = {
        m.group(1): float(m.group(2))
        for m in re.finditer(
            r'^gateway_messages_rejected_total\{reason="([^"]+)"\} (\S+)$', str(text), re.M
        )
    }
    return sum(by_reason.values()), by_reason


def strict_json(text: str) -> dict:
    """Parse a frame, refusing NaN/Infinity the way a browser's JSON.parse would."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"frame is not strict JSON: contains {constant}")

    return json.loads(text, parse_constant=refuse)


async def test_hundreds_of_hostile_messages_are_counted_and_the_next_good_one_arrives(mosquitto):
    rounds = 10
    messages = hostile_messages() * rounds
    with GatewayProcess(mosquitto.url) as gw:
        gw.create_user("operator", PASSWORD, staff=True)
        cookie = gw.login("operator", PASSWORD)
        before, _ = rejected_total(gw)
        async with gw.ws_connect(cookie, max_size=2**22) as ws:
            assert strict_json(await asyncio.wait_for(ws.recv(), 10))["type"] == "snapshot"
            async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="hostile") as dev:
                for topic, payload in messages:
                    await dev.publish(topic, payload, qos=1)
                await dev.publish("devices/good1/telemetry", b'{"temperature": 20.5}', qos=1)
            async with asyncio.timeout(30):
                while True:
                    frame = strict_json(await ws.recv())
                    if frame.get("type") == "telemetry" and frame.get("device") == "good1":
                        break
        assert frame["metrics"] == {"temperature": 20.5}

        # Every hostile message rejected exactly once (the counters settle right after).
        deadline = time.monotonic() + 10
        while True:
            after, reasons = rejected_total(gw)
            if after - before >= len(messages) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert after - before == len(messages), reasons
        for reason in ("bad_device_id", "bad_json", "too_large", "bad_status", "unknown_command"):
            assert reasons.get(reason, 0) >= rounds, (reason, reasons)

        status, health = gw.http_get("/healthz")
        assert status == 200, health
        status, devices = gw.http_get("/api/devices/", cookie)
        assert status == 200
        assert {d["id"] for d in devices} <= {"good1", "h1"}
