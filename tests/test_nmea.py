"""NMEA 0183 from a GPS receiver on a serial line: sentences → position, speed, fix readings.

The four sentences below are the worked examples of Dale DePriest's "NMEA data" reference
(gpsinformation.org/dale/nmea.htm), the page gpsd's "NMEA Revealed" builds on: a fix at
48°07.038' N 11°31.000' E, 545.4 m, 8 satellites, HDOP 0.9, 22.4 knots at 84.4° true.
Their checksums are the published ones.
"""

from __future__ import annotations

from functools import reduce

import pytest

from devices.conventions.codecs import decode_frame
from devices.conventions.nmea import decode_sentence
from devices.conventions.serial import SerialDeviceConsumer
from gateway.exceptions import Rejected
from gateway.metrics import MESSAGES_REJECTED
from gateway.serial.testing import SerialCommunicator
from tests.support.checks import dashboard_frame
from tests.test_serial_device import no_mirror  # noqa: F401 - fixture

GGA = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
RMC = b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"
VTG = b"$GPVTG,054.7,T,034.4,M,005.5,N,010.2,K*48"
GSA = b"$GPGSA,A,3,04,05,,09,12,,,24,,,,,2.5,1.3,2.1*39"


def with_checksum(body: str) -> bytes:
    """A sentence built here (not from a document), with its XOR checksum."""
    return f"${body}*{reduce(lambda a, c: a ^ ord(c), body, 0):02X}".encode()


def test_gga_position_altitude_fix_and_satellites():
    reading = decode_frame(GGA, 1764214000.0)
    assert reading.ts == 1764214000.0
    assert reading.metrics == {
        "fix_quality": 1.0,
        "satellites": 8.0,
        "latitude": 48.1173,
        "longitude": 11.5166667,
        "altitude": 545.4,
        "hdop": 0.9,
    }


def test_rmc_speed_in_kmh_and_course():
    assert decode_frame(RMC, 0.0).metrics == {
        "fix_valid": True,
        "latitude": 48.1173,
        "longitude": 11.5166667,
        "speed": 41.485,  # 22.4 knots
        "course": 84.4,
    }


def test_vtg_and_gsa():
    assert decode_frame(VTG, 0.0).metrics == {"course": 54.7, "speed": 10.2}
    assert decode_frame(GSA, 0.0).metrics == {
        "fix_type": 3.0,
        "pdop": 2.5,
        "hdop": 1.3,
        "vdop": 2.1,
    }


def test_no_fix_reports_the_fix_state_and_no_made_up_position():
    gga = with_checksum("GNGGA,123520,,,,,0,00,99.99,,,,,,")
    assert decode_sentence(gga, 0.0).metrics == {"fix_quality": 0.0, "satellites": 0.0}
    rmc = with_checksum("GNRMC,123520,V,,,,,,,230394,,,N")
    assert decode_sentence(rmc, 0.0).metrics == {"fix_valid": False}


def test_other_sentence_types_are_skipped():
    assert decode_sentence(with_checksum("GPGSV,1,1,01,04,45,120,38"), 0.0) is None


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (GGA[:-2] + b"48", "bad_checksum"),  # one bit off
        (GGA.replace(b"545.4", b"545.5"), "bad_checksum"),  # a field changed in transit
        (GGA[: GGA.index(b"*")], "bad_checksum"),  # no checksum at all
        (b"$GPGGA,\xff\xfe*00", "bad_encoding"),
        (b"$" + b"A" * 2000, "too_large"),
    ],
)
def test_damaged_sentences_are_rejected(line, reason):
    with pytest.raises(Rejected) as caught:
        decode_frame(line, 0.0)
    assert caught.value.reason == reason


@pytest.mark.django_db(transaction=True)
async def test_gps_on_a_serial_port_is_a_device_and_bad_checksums_are_counted(layer, dashboard):
    bad = MESSAGES_REJECTED.labels(reason="bad_checksum")._value.get()
    comm = SerialCommunicator(SerialDeviceConsumer.as_asgi(), "loop://?device=gps-1")
    await comm.connect()
    await comm.send_frame(GGA[:-2] + b"00\r")
    await comm.send_frame(GGA + b"\r")
    frame = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert frame["device"] == "gps-1"
    assert frame["metrics"]["latitude"] == 48.1173 and frame["metrics"]["altitude"] == 545.4
    assert MESSAGES_REJECTED.labels(reason="bad_checksum")._value.get() == bad + 1
    await comm.disconnect()


def test_simulated_gps_receiver_speaks_checksummed_nmea():
    from firmware_sim.serial_device import SerialSimDevice

    burst = SerialSimDevice(-1, fmt="nmea", seed=1).telemetry_line()
    lines = burst.split(b"\r\n")[:-1]
    assert [line[3:6] for line in lines] == [b"GGA", b"RMC", b"VTG", b"GSA"]
    readings = [decode_frame(line, 0.0).metrics for line in lines]
    assert abs(readings[0]["latitude"] - 48.1173) < 0.01 and readings[0]["satellites"] == 8
    assert readings[1]["fix_valid"] is True and abs(readings[1]["speed"] - 36.0) < 0.2
    assert readings[2]["speed"] == 36.0 and readings[3]["fix_type"] == 3
