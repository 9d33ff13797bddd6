"""deploy/mosquitto: a real mosquitto with the shipped config and ACL file confines each device.

The broker runs deploy/mosquitto/gateway.conf with only its paths and listener rewritten (a
free loopback port, files in a temporary folder); the ACL file is used as shipped and the
passwords are made with `mosquitto_passwd`, as docs/deploy.md says. A refused publish or
is seen in its MQTT v5 PUBACK reason code; a message that must not arrive is proven absent by a
later allowed one on the same connection arriving first (the broker keeps their order).
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.servers import Mosquitto, require_binary

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
USERS = {"gateway": "gw-secret-1", "dev-a": "a-secret-1", "dev-b": "b-secret-1", "tas-1": "t-1"}
NOT_AUTHORIZED = 135  # MQTT v5 reason code 0x87


class DeployedMosquitto(Mosquitto):
    """mosquitto on the shipped gateway.conf: listener and file paths moved, nothing else."""

    name = "mosquitto-deploy"

    def start(self) -> None:
        try:
            super().start()
        except TimeoutError:
            self.kill()
            raise AssertionError((self.workdir / "log.txt").read_text()) from None

    def command(self) -> list[str]:
        # Started as root, mosquitto drops to the `mosquitto` user: it must reach the files.
        self.workdir.chmod(0o755)
        acl = self.workdir / "gateway.acl"
        shutil.copy(DEPLOY / "gateway.acl", acl)
        passwd = self.workdir / "gateway.passwd"
        mosquitto_passwd = require_binary("mosquitto_passwd", "mosquitto")
        passwd.touch()
        for user, password in USERS.items():
            subprocess.run([mosquitto_passwd, "-b", str(passwd), user, password], check=True)
        conf = (DEPLOY / "gateway.conf").read_text()
        conf, n = re.subn(r"(?m)^listener 1883 .*$", f"listener {self.port} 127.0.0.1", conf)
        assert n == 1, "gateway.conf has no plain `listener 1883` line"
        conf = conf.replace("/etc/mosquitto/gateway.passwd", str(passwd))
        conf = conf.replace("/etc/mosquitto/gateway.acl", str(acl))
        assert str(passwd) in conf and str(acl) in conf, "paths not found in gateway.conf"
        path = self.workdir / "mosquitto.conf"
        path.write_text(conf + "\nlog_type error\nlog_type warning\n")
        return [require_binary("mosquitto", "mosquitto"), "-c", str(path)]


class Client:
    """A paho MQTT v5 client whose CONNACK, SUBACK, PUBACK and messages land in queues."""

    def __init__(self, broker: DeployedMosquitto, user: str | None, password: str | None = None):
        self.connacks: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.pubacks: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{user}", protocol=mqtt.MQTTv5
        )
        if user is not None:
            self.client.username_pw_set(user, password if password is not None else USERS[user])
        self.client.on_connect = lambda c, u, f, rc, p: self.connacks.put(rc.value)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(rcs[0].value)
        self.client.on_publish = lambda c, u, mid, rc, p: self.pubacks.put(rc.value)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.connect("127.0.0.1", broker.port, properties=Properties(PacketTypes.CONNECT))
        self.client.loop_start()
        self.connack = self.connacks.get(timeout=5)

    def subscribe(self, topic: str) -> int:
        """Subscribe at QoS 1; the SUBACK reason code (0-2 granted, 135 not authorized)."""
        self.client.subscribe(topic, qos=1)
        return self.subacks.get(timeout=5)

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1; the PUBACK reason code (0 success, 135 not authorized)."""
        self.client.publish(topic, payload, qos=1)
        return self.pubacks.get(timeout=5)

    def next_message(self) -> tuple[str, bytes]:
        return self.messages.get(timeout=5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker():
    with DeployedMosquitto() as server:
        yield server


@pytest.fixture
def connect(broker):
    clients: list[Client] = []

    def _connect(user: str | None, password: str | None = None) -> Client:
        client = Client(broker, user, password)
        clients.append(client)
        return client

    yield _connect
    for client in clients:
        client.close()


def test_a_device_publishes_its_own_telemetry_but_not_another_devices(connect):
    gateway, device_a = connect("gateway"), connect("dev-a")
    assert gateway.connack == 0 and device_a.connack == 0
    assert gateway.subscribe("devices/#") == 1

    assert device_a.publish("devices/dev-b/telemetry", b'{"t": 666}') == NOT_AUTHORIZED
    assert device_a.publish("devices/dev-b/status", b"offline") == NOT_AUTHORIZED
    assert device_a.publish("devices/dev-a/commands", b"{}") == NOT_AUTHORIZED  # read only
    for topic in ("telemetry", "telemetry/temp", "status", "commands/ack"):
        assert device_a.publish(f"devices/dev-a/{topic}", b"1") == 0
    # Only dev-a's own four arrive, in order: the refused ones were never delivered.
    received = [gateway.next_message()[0] for _ in range(4)]
    assert received == [
        "devices/dev-a/telemetry",
        "devices/dev-a/telemetry/temp",
        "devices/dev-a/status",
        "devices/dev-a/commands/ack",
    ]
    assert gateway.messages.empty()


def test_a_device_receives_its_own_commands_but_cannot_read_another_devices(connect):
    gateway, device_a = connect("gateway"), connect("dev-a")
    # mosquitto 2.0 grants any subscription and checks the ACL per message it would deliver.
    assert device_a.subscribe("devices/dev-b/commands") in (1, NOT_AUTHORIZED)
    assert device_a.subscribe("devices/+/commands") == 1
    assert device_a.subscribe("devices/dev-a/commands") == 1

    assert gateway.publish("devices/dev-b/commands", b'{"id": "b"}') == 0
    assert gateway.publish("devices/dev-a/commands", b'{"id": "a"}') == 0
    # dev-a gets its own command (through its two subscriptions), never dev-b's.
    assert device_a.next_message() == ("devices/dev-a/commands", b'{"id": "a"}')
    assert device_a.next_message() == ("devices/dev-a/commands", b'{"id": "a"}')
    assert device_a.messages.empty()


def test_tasmota_devices_are_confined_too(connect):
    gateway, tasmota = connect("gateway"), connect("tas-1")
    assert gateway.subscribe("tele/#") == 1 and gateway.subscribe("stat/#") == 1
    assert tasmota.subscribe("cmnd/dev-a/#") in (1, NOT_AUTHORIZED)
    assert tasmota.subscribe("cmnd/tas-1/#") == 1
    assert tasmota.publish("tele/dev-a/SENSOR", b"{}") == NOT_AUTHORIZED
    assert tasmota.publish("devices/tas-1/commands", b"{}") == NOT_AUTHORIZED
    assert tasmota.publish("tele/tas-1/SENSOR", b'{"T": 1}') == 0
    assert tasmota.publish("stat/tas-1/RESULT", b'{"POWER": "ON"}') == 0
    received = [gateway.next_message()[0] for _ in range(2)]
    assert received == ["tele/tas-1/SENSOR", "stat/tas-1/RESULT"]
    assert gateway.publish("cmnd/dev-a/Power", b"OFF") == 0
    assert gateway.publish("cmnd/tas-1/Power", b"ON") == 0
    assert tasmota.next_message() == ("cmnd/tas-1/Power", b"ON")  # never dev-a's
    assert tasmota.messages.empty()


def test_the_gateway_user_reaches_everything_it_bridges(connect):
    gateway = connect("gateway")
    for topic in ("devices/#", "tele/#", "stat/#", "gateway/#", "homeassistant/#"):
        assert gateway.subscribe(topic) == 1, topic
    for topic in ("gateway/gw-1/status", "homeassistant/device/dev-a/config", "cmnd/x/Power"):
        assert gateway.publish(topic, b"x") in (0, 16), topic  # 16: no subscribers (yet ok)


def test_anonymous_and_wrong_passwords_are_refused(broker):
    for user, password in ((None, None), ("dev-a", "wrong"), ("nobody", "x")):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if user is not None:
            client.username_pw_set(user, password)
        codes: queue.Queue = queue.Queue()
        client.on_connect = lambda c, u, f, rc, p, codes=codes: codes.put(rc.value)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            code = codes.get(timeout=5)
        finally:
            client.disconnect()
            client.loop_stop()
        assert code in (NOT_AUTHORIZED, 134), (user, code)  # 134: bad user name or password
