"""Serial SPEC parsing and the framers: pure units, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.serial.framing import make_framer
from gateway.serial.spec import Framing, parse_delimiter, parse_spec, parse_specs


def test_spec_defaults_and_options():
    spec = parse_spec("/dev/ttyUSB0?baudrate=9600&device=weather-1")
    assert spec.url == "/dev/ttyUSB0" and spec.port == "/dev/ttyUSB0"
    assert spec.baudrate == 9600 and spec.device == "weather-1"
    assert spec.framing == Framing()  # newline-delimited, 8 KiB max
    plain = parse_spec("/dev/serial/by-id/usb-FTDI_A50285BI-if00-port0")
    assert plain.baudrate == 115200 and plain.device is None


def test_spec_keeps_pyserial_options_in_url():
    spec = parse_spec("socket://127.0.0.1:7000?logging=debug&device=net-1&baudrate=57600")
    assert spec.url == "socket://127.0.0.1:7000?logging=debug"
    assert spec.port == "socket://127.0.0.1:7000"
    assert spec.device == "net-1"
    assert (
        parse_spec("rfc2217://host:2217?ign_set_control").url
        == "rfc2217://host:2217?ign_set_control="
    )


def test_spec_framing_modes():
    assert parse_spec("loop://?delimiter=hex:0d0a").framing.delimiter == b"\r\n"
    assert parse_spec("loop://?delimiter=\\r\\n").framing.delimiter == b"\r\n"
    assert parse_spec("loop://?delimiter=;").framing.delimiter == b";"
    fixed = parse_spec("loop://?length=8&stale_ms=100").framing
    assert (fixed.mode, fixed.length, fixed.stale_ms) == ("fixed", 8, 100.0)
    idle = parse_spec("loop://?idle_ms=20&max_frame=64").framing
    assert (idle.mode, idle.idle_ms, idle.max_frame) == ("idle", 20.0, 64)
    serial = parse_spec("/dev/ttyS0?parity=E&stopbits=2&rtscts=1&bytesize=7")
    assert serial.serial_kwargs == {"parity": "E", "stopbits": 2.0, "rtscts": True, "bytesize": 7}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "?baudrate=1",
        "loop://?baudrate=fast",
        "loop://?baudrate=0",
        "loop://?framing=magic",
        "loop://?framing=fixed",
        "loop://?framing=idle",
        "loop://?length=100&max_frame=10",
        "loop://?delimiter=hex:zz",
        "loop://?delimiter=hex:",
        "loop://?io=fast",
        "loop://?device=a&device=b",
        "loop://?rtscts=maybe",
    ],
)
def test_bad_specs_are_clear_errors(text):
    with pytest.raises(ValueError):
        parse_spec(text)


def test_same_port_twice_is_an_error():
    with pytest.raises(ValueError, match="twice"):
        parse_specs(["/dev/ttyUSB0", "/dev/ttyUSB0?baudrate=9600"])


def test_parse_delimiter_escapes():
    assert parse_delimiter("\\n") == b"\n"
    assert parse_delimiter("END\\0") == b"END\0"
    assert parse_delimiter("HEX:FF00") == b"\xff\x00"


def framer(spec: str):
    return make_framer(parse_spec(spec).framing)


def test_delimiter_frames_split_across_reads():
    f = framer("loop://?delimiter=hex:0d0a")
    assert f.feed(b"a=1\r", 0) == []
    assert f.feed(b"\nb=2\r\nc", 0) == [b"a=1", b"b=2"]
    assert f.feed(b"=3\r\n\r\n", 0) == [b"c=3"]  # the empty frame is skipped
    assert f.drops == [] and f.pending == 0


def test_over_long_frame_dropped_until_next_delimiter_and_counted_once():
    f = framer("loop://?max_frame=16")
    frames = []
    for _ in range(100):  # 100 × 1000 bytes without a newline
        frames += f.feed(b"x" * 1000, 0)
        assert f.pending <= 16
    frames += f.feed(b"xxx\ngood=1\n", 0)
    assert frames == [b"good=1"]
    assert f.drops == ["frame_too_long"]


def test_over_long_frame_in_one_read_is_dropped():
    f = framer("loop://?max_frame=8")
    assert f.feed(b"0123456789\nok\n", 0) == [b"ok"]
    assert f.drops == ["frame_too_long"]


def test_stale_partial_frame_dropped_after_silence():
    f = framer("loop://?stale_ms=100")
    assert f.feed(b'{"temperature": 2', 0.0) == []
    assert f.feed(b'{"t": 1}\n', 1.0) == [b'{"t": 1}']
    assert f.drops == ["bad_frame"]
    # Without stale_ms the partial frame corrupts the next one (the device's problem).
    g = framer("loop://")
    assert g.feed(b"tem", 0.0) + g.feed(b"p=1\n", 5.0) == [b"temp=1"]


def test_fixed_length_and_resync():
    f = framer("loop://?length=4&stale_ms=50")
    assert f.feed(b"abcdefg", 0.0) == [b"abcd"]
    assert f.feed(b"h", 0.01) == [b"efgh"]
    assert f.feed(b"xy", 0.02) == []
    assert f.feed(b"1234", 1.0) == [b"1234"]  # the stale "xy" was dropped
    assert f.drops == ["bad_frame"]


def test_idle_framer_flushes_and_bounds():
    f = framer("loop://?idle_ms=10&max_frame=8")
    assert f.feed(b"abc", 0) == [] and f.feed(b"def", 0) == []
    assert f.flush() == b"abcdef"
    assert f.flush() is None
    f.feed(b"0123456789", 0)
    assert f.drops == ["frame_too_long"] and f.pending == 0
    f.feed(b"more", 0)  # still the same over-long burst: discarded until the silence
    assert f.flush() is None
    f.feed(b"ok", 0)
    assert f.flush() == b"ok"


@given(
    lines=st.lists(
        st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b), max_size=20
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_delimiter_framer_any_chunking_gives_the_same_frames(lines, cuts):
    data = b"".join(line + b"\n" for line in lines)
    f = framer("loop://")
    frames, prev = [], 0
    for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
        frames += f.feed(data[prev:cut], 0)
        prev = cut
    assert frames == lines
