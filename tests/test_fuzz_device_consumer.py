"""Hostile devices at the consumer boundary, property-based, through the real router and DB.

Each example is one device instance (as the MQTT or serial server would start it) fed a hostile
``mqtt.message`` / ``serial.frame`` and then a good reading, through `MqttCommunicator` /
`SerialCommunicator`, the real `TopicRouter`, the in-memory channel layer, the telemetry
pipeline and the test database. Per message: either something is stored, or exactly one
rejection is counted with a documented reason; never a ``consumer_error`` (a crash the boundary
had to catch is still a bug); and the good reading behind the garbage is always stored.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time

import orjson
import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from hypothesis import example, given
from hypothesis import strategies as st

from devices.conventions import mirror
from devices.conventions.serial import SerialDeviceConsumer
from devices.conventions.tasmota_payloads import device_id_for
from devices.models import Reading
from devices.routing import mqtt_routes
from devices.telemetry.parsing import FUTURE_SLACK, MIN_TS, valid_device_id
from gateway.metrics import MESSAGES_REJECTED
from gateway.mqtt.routing import TopicRouter
from gateway.mqtt.testing import MqttCommunicator
from gateway.serial.testing import SerialCommunicator
from tests.support.fuzz import REASONS, clean_metric_name, fuzz
from tests.support.runtime import stop_loop_services
from tests.test_fuzz_parsing import odd_text, telemetry_payload
from tests.test_fuzz_serial import hostile_line

pytestmark = pytest.mark.django_db(transaction=True)

ROUTER = TopicRouter(mqtt_routes)
SERIAL_APP = SerialDeviceConsumer.as_asgi()
PROBE = "__probe__"  # longer than any key the payload strategies generate
GOOD_IDS = ["fz-1", "fz_2", "F"]

device_id = st.one_of(st.sampled_from(GOOD_IDS), odd_text.filter(lambda s: s and "/" not in s))
payload = st.one_of(
    telemetry_payload(),
    st.sampled_from([b"online", b" OFFLINE ", b"on", b"21.5", b"-1e999", b"true", b"", b"\xff"]),
    st.binary(max_size=40),
    st.fixed_dictionaries({"id": odd_text, "ok": st.booleans()}).map(orjson.dumps),
)
topic_template = st.sampled_from(
    [
        "devices/{}/telemetry",
        "devices/{}/telemetry/temp",
        "devices/{}/telemetry/{}",
        "devices/{}/status",
        "devices/{}/commands/ack",
        "tele/{}/SENSOR",
        "tele/{}/STATE",
        "tele/{}/LWT",
        "stat/{}/POWER",
        "stat/{}/POWER2",
        "stat/{}/POWER\n",
        "stat/{}/power",
        "stat/{}/RESULT",
        "stat/{}/STATUS8",
        "stat/{}/LOGGING",
    ]
)


def rejections() -> dict[str, float]:
    return {
        sample.labels["reason"]: sample.value
        for sample in MESSAGES_REJECTED.collect()[0].samples
        if sample.name.endswith("_total")
    }


def new_rejections(before: dict[str, float]) -> dict[str, float]:
    after = rejections()
    return {r: n - before.get(r, 0.0) for r, n in after.items() if n != before.get(r, 0.0)}


@database_sync_to_async
def readings_since(stored_before: frozenset) -> list[Reading]:
    """Readings whose key (device, metric, ts) was not stored at `stored_before`."""
    return [r for r in Reading.objects.order_by("ts") if r.pk not in stored_before]


@database_sync_to_async
def stored_keys() -> frozenset:
    return frozenset(Reading.objects.values_list("device_id", "metric", "ts"))


class Bench:
    """One event loop for all examples: the layer, the pipeline and timers live across them."""

    def __init__(self) -> None:
        self.runner = asyncio.Runner()
        self.probe = itertools.count(1)

    def __enter__(self) -> Bench:
        self.runner.__enter__()
        self.runner.run(get_channel_layer().flush())
        return self

    def __exit__(self, *exc_info) -> None:
        self.runner.run(stop_loop_services())
        self.runner.__exit__(*exc_info)

    async def deliver_serial(self, spec: str, line: bytes) -> None:
        """Open a port's instance, send a hostile frame then a good line, close the port."""
        from devices.telemetry.pipeline import get_pipeline

        comm = SerialCommunicator(SERIAL_APP, spec)
        await comm.connect()
        await comm.send_frame(line)
        self.value = float(next(self.probe))
        await comm.send_frame(f"{PROBE}={self.value!r}")
        await comm.disconnect(timeout=5)
        await get_pipeline().flush()

    async def deliver(self, topic_name: str, body: bytes) -> None:
        """Start the instance the topic routes to, connect it, send garbage then a good reading
        on the same instance, and retire it (which waits until it handled both)."""
        from devices.telemetry.pipeline import get_pipeline

        comm = MqttCommunicator(ROUTER, topic=topic_name)
        await comm.connect()
        await comm.send_message(topic_name, body)
        good_topic, good = self.good_message(comm.scope["route"], comm.scope)
        await comm.send_message(good_topic, good)
        await comm.retire(timeout=5)
        await get_pipeline().flush()

    def good_message(self, route: str, scope: dict) -> tuple[str, bytes]:
        device = scope["url_route"]["kwargs"]["device_id"]
        self.value = float(next(self.probe))
        body = orjson.dumps({PROBE: self.value})
        if route == "tasmota":
            return f"tele/{device}/SENSOR", body
        return f"devices/{device}/telemetry", body


@pytest.fixture
def bench():
    saved = dict(mirror._config)
    mirror.configure(enabled=False)  # no broker here: the serial→MQTT mirror is tested elsewhere
    try:
        with Bench() as bench:
            yield bench
    finally:
        mirror._config.update(saved)


def assert_clean_readings(readings: list[Reading], device: str) -> None:
    """Whatever garbage got stored is contract-clean: valid name, finite value, ts in range."""
    for reading in readings:
        assert reading.device_id == device and clean_metric_name(reading.metric)
        assert math.isfinite(reading.value)
        assert MIN_TS <= reading.ts.timestamp() <= time.time() + FUTURE_SLACK


def test_every_hostile_message_is_stored_or_rejected_once_and_the_next_one_arrives(bench):
    @fuzz(40)
    @given(topic_template, device_id, odd_text, payload)
    @example("stat/{}/POWER\n", "fz-1", "", b"ON")  # stored a metric named "POWER\n"
    @example("devices/{}/telemetry", "fz-1", "", b'{"t": NaN}')
    @example("devices/{}/telemetry", "fz-1", "", b'{"a":' * 9 + b"1" + b"}" * 9)
    @example("devices/{}/status", "d1\n", "", b"online")
    @example("devices/{}/telemetry", "fz-1", "", b"")
    @example("devices/{}/telemetry", ":", "", b"")
    def check(template, device, metric, body):
        """One hostile message then a good one, on one device's fresh instance."""
        topic_name = template.format(device, metric.replace("/", ""))
        match = ROUTER.resolve(topic_name)
        if match is None:
            return  # the server counts it as bad_topic (tests/test_fuzz_routing.py)
        before, keys = rejections(), bench.runner.run(stored_keys())
        bench.runner.run(bench.deliver(topic_name, body))
        delivered.append(valid_device_id(device))
        counted = new_rejections(before)
        stored = bench.runner.run(readings_since(keys))
        probes = [r for r in stored if r.metric == PROBE]
        garbage = [r for r in stored if r.metric != PROBE]

        assert set(counted) <= REASONS and "consumer_error" not in counted, counted
        if match.route == "tasmota":  # any Tasmota topic is mapped to a valid id, never refused
            device = device_id_for(device)
        if not valid_device_id(device):
            # An empty payload (a cleared retained topic) is ignored, not counted.
            expected = 1.0 if body == b"" else 2.0
            assert counted == {"bad_device_id": expected} and stored == []
            return
        # The good reading behind the garbage always arrives, exactly once.
        assert [(r.device_id, r.value) for r in probes] == [(device, bench.value)]
        if body == b"":  # clearing a retained topic (docs/retained-and-presence.md)
            assert counted == {} and garbage == []
            return
        # Garbage: one rejection, or accepted (then whatever it stored is contract-clean).
        assert sum(counted.values()) in (0, 1)
        if counted:
            assert garbage == []
        assert_clean_readings(garbage, device)
        if template.startswith("devices/") and template.endswith(("telemetry", "telemetry/temp")):
            assert bool(counted) != bool(garbage), "a telemetry message neither stored nor counted"
        if template.endswith(("/status", "/LWT")):
            status_ok = len(body) <= 100 and body.strip().lower() in (b"online", b"offline")
            assert bool(counted) != status_ok and garbage == []
        if template.endswith("/commands/ack"):
            assert counted and garbage == []  # no command awaits any ack here

    delivered: list[bool] = []
    check()
    # Not vacuous: most examples reached a valid device's instance (not just unrouted topics).
    assert sum(delivered) >= 10, delivered


def is_ack_line(line: bytes) -> bool:
    """docs/interface.md §4: a JSON object with both ``id`` and ``ok`` is an ack, not telemetry."""
    try:
        data = orjson.loads(line.strip())
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and "id" in data and "ok" in data


def test_every_hostile_serial_line_is_stored_or_rejected_once_and_the_next_one_arrives(bench):
    @fuzz(40)
    @given(hostile_line, st.sampled_from(["fz-s", "bad id!"]))
    @example(b"\x00\xff garbage", "fz-s")
    @example(b'{"id": "x", "ok": true}', "fz-s")
    @example(b"t=1e999", "fz-s")
    @example(b"   ", "fz-s")
    def check(line, device):
        before, keys = rejections(), bench.runner.run(stored_keys())
        spec = f"loop://?device={device.replace(' ', '%20')}"
        bench.runner.run(bench.deliver_serial(spec, line))
        counted = new_rejections(before)
        stored = bench.runner.run(readings_since(keys))
        probes = [r for r in stored if r.metric == PROBE]
        garbage = [r for r in stored if r.metric != PROBE]

        assert set(counted) <= REASONS and "consumer_error" not in counted, counted
        if device != "fz-s":
            assert counted == {"bad_device_id": 2.0} and stored == []
            return
        assert [(r.device_id, r.value) for r in probes] == [(device, bench.value)]
        assert sum(counted.values()) in (0, 1)
        assert_clean_readings(garbage, device)
        if not line.strip():
            assert not counted and not garbage  # a blank line is nothing, not an error
        elif is_ack_line(line):
            assert counted and not garbage  # no command awaits any ack here
        else:
            assert bool(counted) != bool(garbage), "a line neither stored nor counted"

    check()
