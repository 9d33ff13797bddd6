"""Hostile serial bytes, property-based: the framers and the line codecs never let garbage win.

The framers must cut any byte stream the same way however the reads split it, keep their buffer
bounded, count every dropped frame with a reason, and always deliver the good frame that
follows garbage. The codecs must turn any frame into telemetry that respects the contract, an
ack, a blank (None), or a `Rejected` carrying one of the documented reasons, never anything else.
"""

from __future__ import annotations

import string

import orjson
from hypothesis import example, given
from hypothesis import strategies as st

from devices.conventions.codecs import MAX_LINE_BYTES, decode_frame
from devices.telemetry.parsing import (
    Ack,
    Telemetry,
)
from gateway.exceptions import Rejected
from gateway.serial.framing import DelimiterFramer, FixedFramer, IdleFramer, make_framer
from gateway.serial.spec import Framing
from tests.support.fuzz import REASONS, assert_contract_telemetry, fuzz

FUZZ = fuzz(75)
NOW = 1_764_214_000.0

# Delimiters none of whose proper prefixes is also a suffix: with a self-overlapping one (b"aa")
# the tail of garbage can legitimately complete a delimiter, so "the next frame" is ambiguous.
DELIMITERS = [b"\n", b"\r\n", b"\x00", b"\x7e", b"<EOF>"]


# --- strategies ---------------------------------------------------------------------------


@st.composite
def delimited_stream(draw) -> tuple[bytes, int, bytes]:
    """(delimiter, max_frame, stream): pieces of random bytes, delimiters and their halves."""
    delim = draw(st.sampled_from(DELIMITERS))
    max_frame = draw(st.integers(1, 24))
    piece = st.one_of(
        st.binary(max_size=40),
        st.just(delim),
        st.sampled_from([delim[:i] for i in range(1, len(delim))] or [delim]),
        st.binary(min_size=1, max_size=4).map(repeated),  # runs long enough to overflow
    )
    stream = b"".join(draw(st.lists(piece, max_size=25)))
    return delim, max_frame, stream


def repeated(b: bytes) -> bytes:
    return b * (1 + b[0] % 16)


@st.composite
def chunked(draw, data: bytes) -> list[bytes]:
    """`data` split at arbitrary points (any number of reads, empty ones included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def reference_frames(data: bytes, delim: bytes, max_frame: int) -> tuple[list[bytes], int]:
    """What a delimiter framer must produce from `data` fed at once: (frames, drops)."""
    *complete, tail = data.split(delim)
    frames = [p for p in complete if 0 < len(p) <= max_frame]
    # An unfinished tail is known too long once it is, even if it ends with half a delimiter.
    drops = sum(len(p) > max_frame for p in complete) + (len(tail) - (len(delim) - 1) > max_frame)
    return frames, drops


def feed_all(framer: DelimiterFramer, chunks: list[bytes], now: float = 0.0) -> list[bytes]:
    frames: list[bytes] = []
    for chunk in chunks:
        frames += framer.feed(chunk, now)
        # Between reads the buffer holds at most one frame's worth plus a split delimiter.
        assert framer.pending <= framer.max_frame + len(framer.delimiter) - 1
    return frames


# --- delimiter framing --------------------------------------------------------------------


@FUZZ
@given(st.data(), delimited_stream())
def test_delimiter_framing_does_not_depend_on_how_reads_split_the_stream(data, stream):
    """Any stream, cut into reads anywhere, gives exactly the frames and drops of one read:
    every non-empty frame up to max_frame, one `frame_too_long` per longer one, and a buffer
    bounded by max_frame plus a partial delimiter."""
    delim, max_frame, raw = stream
    chunks = data.draw(chunked(raw))
    framer = DelimiterFramer(Framing(delimiter=delim, max_frame=max_frame))
    frames = feed_all(framer, chunks)
    expected_frames, expected_drops = reference_frames(raw, delim, max_frame)
    assert frames == expected_frames
    assert framer.drops == ["frame_too_long"] * expected_drops


def test_a_full_length_frame_survives_its_delimiter_split_across_reads():
    """Hypothesis's first find: a max_frame-long frame whose read ended inside a two-byte
    delimiter (`abcd` `\r` | `\n`) was dropped as too long while the one-read stream kept it."""
    framer = DelimiterFramer(Framing(delimiter=b"\r\n", max_frame=4))
    assert framer.feed(b"abcd\r", 0.0) == []
    assert framer.feed(b"\nxy\r\n", 0.0) == [b"abcd", b"xy"]
    assert framer.drops == []


@FUZZ
@given(st.data(), delimited_stream(), st.binary(min_size=1, max_size=24))
def test_the_good_frame_after_any_garbage_is_delivered(data, stream, good):
    """Garbage, then a delimiter, then a good frame: the good frame always comes out last."""
    delim, max_frame, garbage = stream
    good = good.replace(delim[:1], b"g")[:max_frame]
    raw = garbage + delim + good + delim
    framer = DelimiterFramer(Framing(delimiter=delim, max_frame=max_frame))
    frames = feed_all(framer, data.draw(chunked(raw)))
    assert frames and frames[-1] == good
    assert framer.pending == 0


@FUZZ
@given(st.data(), st.sampled_from(DELIMITERS), st.binary(max_size=200), st.binary(min_size=1))
def test_a_partial_frame_before_silence_is_dropped_once_and_the_next_frame_survives(
    data, delim, garbage, good
):
    """With `stale_ms`, a device reset mid-line (garbage, then silence) costs exactly one
    counted drop, and the frame after the silence comes out whole."""
    garbage = garbage.replace(delim[:1], b"")
    good = good.replace(delim[:1], b"g")[:16]
    framer = DelimiterFramer(Framing(delimiter=delim, max_frame=16, stale_ms=50))
    assert feed_all(framer, data.draw(chunked(garbage)), now=1.0) == []
    frames = feed_all(framer, data.draw(chunked(good + delim)), now=2.0)
    assert frames == [good]
    assert len(framer.drops) == (1 if garbage else 0)
    assert set(framer.drops) <= {"bad_frame", "frame_too_long"}


# --- fixed-length and idle-gap framing ----------------------------------------------------


@FUZZ
@given(st.data(), st.binary(max_size=300), st.integers(1, 32))
def test_fixed_framing_cuts_consecutive_slices_whatever_the_reads(data, raw, length):
    framer = FixedFramer(Framing(mode="fixed", length=length))
    frames = []
    for chunk in data.draw(chunked(raw)):
        frames += framer.feed(chunk, 0.0)
        assert framer.pending < length
    whole = len(raw) // length * length
    assert frames == [raw[i : i + length] for i in range(0, whole, length)]
    assert framer.drops == []


@FUZZ
@given(st.data(), st.lists(st.binary(max_size=60), max_size=8), st.integers(1, 100))
def test_idle_framing_gives_one_frame_per_silence_or_one_counted_drop(data, bursts, max_frame):
    """Each burst (reads until a silence) is one frame if it fits, else one `frame_too_long`
    and nothing; the next burst is unaffected."""
    framer = make_framer(Framing(mode="idle", idle_ms=20, max_frame=max_frame))
    assert isinstance(framer, IdleFramer)
    for burst in bursts:
        before = len(framer.drops)
        for chunk in data.draw(chunked(burst)):
            assert framer.feed(chunk, 0.0) == []
            assert framer.pending <= max_frame
        frame = framer.flush()
        if len(burst) > max_frame:
            assert frame is None and framer.drops[before:] == ["frame_too_long"]
        else:
            assert frame == (burst or None) and len(framer.drops) == before


# --- line codecs --------------------------------------------------------------------------

metric_name = st.text(
    alphabet=st.characters(
        blacklist_characters="=, \t\r\n\x0b\x0c",
        blacklist_categories=["Cc", "Zs", "Zl", "Zp", "Cs"],
    ),
    min_size=1,
    max_size=12,
).filter(lambda s: s != "ts" and not s.startswith("{") and s.strip() == s)
odd_values = st.sampled_from(
    [
        "nan",
        "NaN",
        "inf",
        "-Infinity",
        "1e999",
        "-1e999",
        "0x10",
        "1_0",
        "+5",
        ".5",
        "5.",
        "true",
        "FALSE",
        "on",
        "v1.2",
        "",
        "=",
        "21.5x",
        "1e-999",
        "٣",
        "\u00a0",
    ]
)
value_text = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(-(10**30), 10**30).map(str),
    odd_values,
    st.text(max_size=8),
)
ts_text = st.one_of(
    st.floats().map(repr),
    st.integers(-(10**20), 10**20).map(str),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.text(max_size=30),
)


@st.composite
def key_value_line(draw) -> bytes:
    tokens = [f"{draw(metric_name)}={draw(value_text)}" for _ in range(draw(st.integers(0, 6)))]
    if draw(st.booleans()):
        tokens.insert(draw(st.integers(0, len(tokens))), f"ts={draw(ts_text)}")
    seps = st.sampled_from([",", " ", ", ", "\t", ",,", " , "])
    line = ""
    for token in tokens:
        line += (draw(seps) if line else "") + token
    return line.encode("utf-8", "surrogatepass")


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=25,
)


@st.composite
def json_line(draw) -> bytes:
    obj = draw(st.dictionaries(st.text(max_size=8), json_value, max_size=6))
    choice = draw(st.sampled_from(["plain", "ts", "ack", "deep", "nonfinite", "bigint"]))
    if choice == "ts":
        obj["ts"] = draw(st.one_of(json_leaf, st.datetimes().map(str)))
    elif choice == "ack":
        obj["id"] = draw(st.one_of(st.text(max_size=70), json_leaf))
        obj["ok"] = draw(json_leaf)
        obj["error"] = draw(json_value)
    text = orjson.dumps(obj)
    if choice == "deep":
        depth = draw(st.integers(1, 1100))
        text = b'{"a":' * depth + b"1" + b"}" * depth
    elif choice == "nonfinite":
        text = (
            text[:-1]
            + (b"," if len(obj) else b"")
            + b'"x": '
            + draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"nan"]))
            + b"}"
        )
    elif choice == "bigint":
        text = b'{"x": ' + b"9" * draw(st.integers(19, 400)) + b"}"
    return text


hostile_line = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
    key_value_line(),
    json_line(),
)


@FUZZ
@given(hostile_line)
@example(b"fw=" + b"x" * 120 + b",t=1")  # a long text value is text, not a reason to refuse
@example(b'{"a":' * 9 + b"1" + b"}" * 9)
def test_any_serial_line_is_a_reading_an_ack_a_blank_or_one_documented_rejection(line):
    try:
        decoded = decode_frame(line, NOW)
    except Rejected as exc:
        assert exc.reason in REASONS, exc.reason
        return
    if decoded is None:
        assert line.strip() == b""
    elif isinstance(decoded, Ack):
        assert isinstance(decoded.id, str) and 0 < len(decoded.id) <= 64
        assert type(decoded.ok) is bool
        assert decoded.error is None or isinstance(decoded.error, str)
    else:
        assert isinstance(decoded, Telemetry)
        assert_contract_telemetry(decoded, NOW)


finite = st.floats(allow_nan=False, allow_infinity=False)
plain_name = st.text(string.ascii_letters + string.digits + "_.-", min_size=1, max_size=20).filter(
    lambda s: s != "ts"
)


@FUZZ
@given(st.dictionaries(plain_name, st.one_of(finite, st.booleans()), min_size=1, max_size=20))
def test_good_lines_round_trip_in_both_serial_forms(metrics):
    """Every finite number and boolean survives `k=v` and JSON lines exactly."""
    kv = ",".join(
        f"{k}={str(v).lower() if isinstance(v, bool) else repr(v)}" for k, v in metrics.items()
    ).encode()
    for line in (kv, orjson.dumps(metrics)):
        if b"{" == line[:1] and any("." in k for k in metrics):
            continue  # JSON keys with dots are fine but may collide with nested ones
        decoded = decode_frame(line + b"\r", NOW)
        assert isinstance(decoded, Telemetry) and decoded.ts == NOW
        assert decoded.metrics == {
            k: (v if isinstance(v, bool) else float(v)) for k, v in metrics.items()
        }


@FUZZ
@given(
    st.dictionaries(plain_name, finite, min_size=1, max_size=5),
    plain_name,
    st.text(string.ascii_letters + "_:/ ", min_size=1, max_size=300).map(
        lambda s: s.replace(" ", "_")
    ),
)
@example({"t": 1.0}, "fw", "x" * 101)
def test_a_text_value_in_a_key_value_line_is_ignored_whatever_its_length(metrics, key, text):
    """Like a JSON string, `fw=v1-beta` is not a metric and does not cost the line its
    numbers (a text value over 100 bytes used to reject the whole line as too_large)."""
    metrics.pop(key, None)
    if text.lower() in ("true", "false"):
        return  # a boolean, hence a metric
    line = ",".join([f"{k}={v!r}" for k, v in metrics.items()] + [f"{key}={text}"])
    if not metrics:
        return
    decoded = decode_frame(line.encode(), NOW)
    assert isinstance(decoded, Telemetry) and decoded.metrics == metrics


@FUZZ
@given(st.binary(max_size=64), st.integers(0, 3))
def test_over_long_lines_are_refused_before_parsing(noise, extra):
    line = b"t=1," + noise.replace(b"\n", b"") + b"x" * (MAX_LINE_BYTES + extra)
    try:
        decode_frame(line, NOW)
    except Rejected as exc:
        assert exc.reason == "too_large"
    else:  # pragma: no cover - the property
        raise AssertionError("an over-long line was accepted")
