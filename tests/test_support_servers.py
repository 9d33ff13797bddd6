"""The test servers themselves: start, stop and restart on the same port."""

import asyncio
import socket

import aiomqtt
import pytest

from tests.support.checks import retained
from tests.support.servers import Mosquitto, wait_for_port
from tests.support.waiting import until


def test_mosquitto_restarts_on_the_same_port(mosquitto):
    port = mosquitto.port
    mosquitto.stop()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        raise AssertionError("broker still accepting after stop()")
    except OSError:
        pass
    mosquitto.start()
    wait_for_port(port)
    assert mosquitto.url == f"mqtt://127.0.0.1:{port}"


def test_redis_answers_ping(redis_server):
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(64).startswith(b"+PONG")


@pytest.mark.parametrize("keep_state", [True, False])
@pytest.mark.parametrize("outage", ["stop", "kill"])
async def test_mosquitto_keeps_or_loses_its_state_for_any_user(keep_state, outage):
    """A retained message survives a restart or a crash (once saved) exactly when the broker
    keeps its state, whoever runs the tests (as root mosquitto runs as its own user)."""
    with Mosquitto(keep_state=keep_state) as broker:
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.publish("state/probe", b"kept", qos=1, retain=True)
        if keep_state and outage == "kill":
            saved = broker.saved_at()
            await until(lambda: broker.saved_at() != saved, what="a save after the publish")
            saved = broker.saved_at()
            await until(lambda: broker.saved_at() != saved, what="a save begun after it")
        getattr(broker, outage)()
        broker.start()
        if keep_state:
            assert await retained(broker.port, "state/probe") == b"kept"
        else:  # a retained message comes right after the SUBACK, before a later publish
            async with aiomqtt.Client("127.0.0.1", broker.port) as client:
                await client.subscribe("state/probe", qos=1)
                await client.publish("state/probe", b"live", qos=1)
                async with asyncio.timeout(5):
                    first = await anext(client.messages)
            assert (first.payload, first.retain) == (b"live", False)
