"""Headers (cw.protocol) and lane framing (cw.lane) in-process: round trips, and malformed
input raising ProtocolError (a lane listener then cuts that one connection). Milliseconds."""
from __future__ import annotations

import os
import socket
import threading

import msgpack
import pytest
import zmq

from cw import protocol as P
from cw.conn import lane
from cw.errors import ProtocolError

D = b"d" * 16
HEADERS = [  # one of each shape the module docstring and cw.session / cw.worker send
    (P.HELLO, P.VERSION, "worker", {"name": "n:1", "pid": 1, "slots": 64, "alias": b"x+"}),
    (P.WELCOME, P.VERSION, "abc", {"workers": 3}),
    (P.REFUSE, "no"), (P.WHO,), (P.HEARTBEAT, 4), (P.BYE,),
    (P.SUBMIT, [D], [[1, D, 1, None], [2, D, 3, {"max_retries": 2, "losses": ["w: x"]}]]),
    (P.CANCEL, [1, 2], True), (P.CANCEL, [[7, 1]]), (P.CANCELLED, [[7, 1, True]]),
    (P.JOBS, [[7, "/cwd", ["/p"]]], [[7, D]], [[7, 1, D, 1, None]]),
    (P.RESULTS, [[7, 1]], [[7, 1, P.OK, 2]], 0.25, [[7, 9]]),
    (P.RESULTS, [1], [[1, P.ERROR, 3]]), (P.FORGET, [7]),
    (P.LANE, "/tmp/x.sock", 7), (P.LANE_LOST, "/tmp/x.sock", "gone", False),
    (P.LANE_BUSY, 7, 1), (P.LANE_REFUSED, 7), (P.LANE_RESULT, 7, 1, P.OK, 1),
    (P.LJOB, 7, 1, D, 1, "/tmp/in.sock", True), (P.LRESULT, 1, P.OK, 1), (P.LSTARTED, 1),
    (P.BOUNCE, 1), (P.DIED, 42, -9, 1.5), (P.STATUS,), (P.STATUS_REPLY, {"queue": 0}),
]


@pytest.mark.parametrize("header", HEADERS, ids=lambda h: str(h[0]))
def test_every_header_shape_survives_a_round_trip(header):
    frame = P.pack(*header)
    for carrier in (frame, memoryview(frame), zmq.Frame(frame)):
        assert P.unpack(carrier) == list(header)


@pytest.mark.parametrize("frame", [
    b"", b"\xc1", b"\x93\x01", msgpack.packb({"kind": 1}), msgpack.packb(5),
    msgpack.packb([]), msgpack.packb(["HELLO", 1]), msgpack.packb([1.5]),
    P.pack(P.HELLO)[:-1] + b"\xdc",  # truncated
], ids=["empty", "reserved", "short", "map", "int", "no-kind", "str-kind", "float-kind",
        "truncated"])
def test_a_malformed_header_raises_protocol_error(frame):
    with pytest.raises(ProtocolError):
        P.unpack(frame)


GOOD_INFO = {"name": "h:1", "host": "h", "pid": 1, "python": "3.11", "machine": "m",
             "alias": b"a+", "slots": 2, "lane": "/tmp/l.sock", "inbox": True, "cwd": "/",
             "path": ["/a"], "unknown": object()}


@pytest.mark.parametrize("bad", [
    {"pid": b"1"}, {"pid": True}, {"pid": -1}, {"pid": 1 << 63}, {"slots": 0},
    {"name": "x" * 257}, {"path": ["/a", 3]}, {"path": ["x" * 5000]}, {"inbox": 1},
    {"alias": "a+"}, {"lane": 7},
], ids=str)
def test_hello_info_of_the_wrong_type_or_size_is_refused(bad):
    P.check_hello_info(GOOD_INFO)  # unknown fields are ignored
    with pytest.raises(ProtocolError):
        P.check_hello_info({**GOOD_INFO, **bad})


def test_versions_exits_aliases_and_windows():
    P.check_version(P.VERSION)
    for other in (P.VERSION + 1, "1", None):
        with pytest.raises(ProtocolError):
            P.check_version(other)
    assert P.describe_exit(0) == "exit code 0" and P.describe_exit(3) == "exit code 3"
    assert P.describe_exit(-9) == "killed by SIGKILL (the OOM killer?)"
    assert P.describe_exit(-11) == "killed by SIGSEGV"
    assert P.describe_exit(-200) == "killed by signal 200"
    assert P.is_alias(P.alias_of(b"id")) and not P.is_alias(b"id")
    assert P.window(0) == P.window(1) == P.WINDOW_MIN
    assert P.window(100) == 100 * P.WINDOW_PER_WORKER


# ------------------------------------------------------------------- lane framing

MESSAGES = [[b"one"], [b"", b"x", b""], [bytearray(b"ba"), memoryview(b"mv")],
            [P.pack(P.LRESULT, 1, P.OK, 2), bytes(70_000), b"tail"],
            [bytes([i]) * i for i in range(1, 40)]]


def wire(frames: list) -> bytes:
    return b"".join(bytes(b) for b in lane.encode(frames))


def test_lane_messages_survive_a_round_trip_in_any_chunking():
    stream = b"".join(wire(m) for m in MESSAGES)
    expected = [[bytes(f) for f in m] for m in MESSAGES]
    for chunk in (len(stream), 4096, 7, 3):  # splits inside counts, lengths and frames
        decoder, got = lane.Decoder(), []
        for pos in range(0, len(stream), chunk):
            decoder.feed(stream[pos:pos + chunk])
            while (frames := decoder.next()) is not None:
                got.append([bytes(f) for f in frames])
        assert got == expected, f"chunks of {chunk}"
        assert not decoder.buf


@pytest.mark.parametrize("data", [
    lane.COUNT.pack(0),                                   # a message of no frames
    lane.COUNT.pack(lane.MAX_FRAMES + 1),
    lane.COUNT.pack(1) + lane.LENGTH.pack(lane.MAX_MESSAGE),  # announced too large
    lane.COUNT.pack(2) + lane.LENGTH.pack(1 << 62) + lane.LENGTH.pack(1 << 62),
], ids=["no-frames", "too-many-frames", "too-large", "overflowing"])
def test_malformed_lane_framing_raises_protocol_error_before_the_body(data):
    decoder = lane.Decoder()
    decoder.feed(data)  # only the prefix: refused without waiting for the body
    with pytest.raises(ProtocolError):
        decoder.next()


def test_a_lane_listener_cuts_a_bad_connection_and_serves_the_others():
    got, closed = [], []
    arrived = threading.Semaphore(0)

    def handler(frames):
        got.append([bytes(f) for f in frames])
        arrived.release()

    listener = lane.Listener("unit", handler, on_close=lambda peer: (closed.append(peer),
                                                                     arrived.release()))
    try:
        good = lane.connect(listener.endpoint, "/good", timeout=5)
        bad = lane.connect(listener.endpoint, "/bad", timeout=5)
        lane.send(bad, [b"first"])
        bad.sendall(lane.COUNT.pack(0))  # then a message of no frames: not our protocol
        bad.settimeout(5)
        assert bad.recv(1) == b""  # cut off
        lane.send(good, [b"still", b"here"])
        assert arrived.acquire(timeout=5) and arrived.acquire(timeout=5) and \
            arrived.acquire(timeout=5)
        assert [b"first"] in got and [b"still", b"here"] in got
        assert closed == ["/bad"] and os.path.exists(listener.endpoint)
        good.close()
        bad.close()
    finally:
        listener.stop()
    assert not os.path.exists(listener.endpoint)


def test_a_lane_send_to_nobody_is_an_unreachable_error():
    outlets = lane.Outlets("/me", timeout=1)
    error = outlets.send(lane.new_endpoint("nobody"), [b"x"])
    assert lane.unreachable(error) and not outlets.socks
    with pytest.raises(socket.error):
        lane.connect("/tmp/not-private/x.sock", "/me", 1)
