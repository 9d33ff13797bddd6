"""The test servers themselves: start, stop and restart on the same port."""

import socket

from tests.support.servers import wait_for_port


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
