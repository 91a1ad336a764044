"""The wire format: envelopes and frames round trip, and malformed input raises only ProtocolError."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmq import PayloadError, ProtocolError
from meshmq._message import FORMAT_BYTES, FORMAT_MSGPACK, Message
from meshmq._records import claim
from meshmq._wire import (
    ACK, ALIVE, BYE, DATA, DEAD, ENVELOPE_VERSION, HELLO, LEFT, MAX_INCARNATION, PING, PING_REQ, PROTOCOL_VERSION,
    RECEIPT, SUSPECT, SYNC, SYNC_LAST, SYNC_OPEN, SYNC_REPLY, Ack, Bye, Data, Entry, Hello, Limits, NodeRecord, Ping,
    PingReq, Receipt, Subscription, Sync, ack_frame, bye_frame, card_frame, check_headers, data_frame, decode_envelope,
    OtherVersion, decode_frame, encode_envelope, encode_payload, hello_frame, ping_frame, ping_req_frame, receipt_frame,
    speaks, split_entry, sync_frame,
)

LIMITS = Limits()
ID = bytes(range(16))


def envelope(
    data: Any = b"payload", *, topic: str = "orders.placed", type_: str | None = "OrderPlaced",
    headers: dict[str, str] | None = None, key: str | None = None, limits: Limits = LIMITS,
) -> bytes:
    fmt, raw = encode_payload(data, limits)
    return encode_envelope(ID, 1700000000.25, topic, type_, "orders", "node-1", 3, headers, key, fmt, raw)


def fields(**changes: Any) -> list[Any]:
    """The 12 envelope fields of a valid envelope, with some replaced by name."""
    names = ["ver", "id", "ts", "topic", "type", "source", "node", "schema", "headers", "key", "fmt", "raw"]
    values: dict[str, Any] = dict(zip(names, [
        ENVELOPE_VERSION, ID, 1.5, "orders.placed", "OrderPlaced", "orders", "node-1", 0, None, None,
        FORMAT_BYTES, b"x",
    ]))
    values.update(changes)
    return [values[n] for n in names]


def packed(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# --- envelope round trips ------------------------------------------------------------


def test_bytes_payload_round_trips_untouched() -> None:
    msg = decode_envelope(envelope(b"\x00\xffraw"), LIMITS, seq=7)
    assert isinstance(msg, Message)
    assert msg.data == b"\x00\xffraw" and msg.raw == b"\x00\xffraw"
    assert msg.id == ID.hex()
    assert msg.timestamp == 1700000000.25
    assert (msg.topic, msg.type, msg.source, msg.node) == ("orders.placed", "OrderPlaced", "orders", "node-1")
    assert msg.schema_version == 3
    assert msg.headers == {} and msg.key is None
    assert msg.seq == 7


@pytest.mark.parametrize("value", [
    {"orderId": "ORD-1", "items": [1, 2.5, None, True], "nested": {"k": b"bin"}},
    [],
    "text",
    0,
    -(2**63),
    2**64 - 1,
    None,
    False,
    1.25,
    {1: "int keys survive"},
])
def test_msgpack_payload_round_trips(value: Any) -> None:
    assert decode_envelope(envelope(value), LIMITS).data == value


@pytest.mark.parametrize("view", [bytearray(b"abc"), memoryview(b"abc")])
def test_bytes_like_payloads_travel_as_bytes(view: Any) -> None:
    assert encode_payload(view, LIMITS) == (FORMAT_BYTES, b"abc")
    assert decode_envelope(envelope(view), LIMITS).data == b"abc"


def test_headers_key_and_no_type_round_trip() -> None:
    msg = decode_envelope(envelope(headers={"traceparent": "00-ab-cd-01", "x": ""}, key="cust-9", type_=None),
                          LIMITS)
    assert msg.headers == {"traceparent": "00-ab-cd-01", "x": ""}
    assert msg.key == "cust-9"
    assert msg.type is None


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
_names = st.text(min_size=1, max_size=30)


@given(
    data=_values | st.binary(max_size=100),
    topic=st.lists(st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp", "Cf", "Co", "Cn"),
                                         blacklist_characters=".*>"), min_size=1, max_size=8),
                   min_size=1, max_size=5).map(".".join),
    type_=st.none() | _names,
    headers=st.none() | st.dictionaries(_names, st.text(max_size=30), max_size=5),
    key=st.none() | _names,
    id_=st.binary(min_size=16, max_size=16),
    ts=st.floats(allow_nan=False) | st.integers(0, 2**40),
    schema=st.integers(0, 2**32),
)
def test_envelope_round_trip_property(data: Any, topic: str, type_: str | None, headers: dict[str, str] | None,
                                      key: str | None, id_: bytes, ts: float, schema: int) -> None:
    fmt, raw = encode_payload(data, LIMITS)
    env = encode_envelope(id_, ts, topic, type_, "svc", "node", schema, headers, key, fmt, raw)
    msg = decode_envelope(env, LIMITS)
    assert msg.data == data
    assert (msg.id, msg.timestamp, msg.topic, msg.type, msg.key, msg.schema_version) == (
        id_.hex(), float(ts), topic, type_, key, schema)
    assert msg.headers == (headers or {})


# --- encode_payload and check_headers reject what cannot travel -----------------------


_recursive: list[Any] = []
_recursive.append(_recursive)


@pytest.mark.parametrize(("value", "problem"), [
    ({1, 2}, "set"),
    (object(), "object"),
    (2**64, "int"),
    (-(2**63) - 1, "int"),
    (datetime.datetime(2024, 1, 1), "datetime"),
    (_recursive, "list"),
    ({"ok": [1, {"deep": {3}}]}, "dict"),
])
def test_unserializable_payload_is_a_payload_error(value: Any, problem: str) -> None:
    with pytest.raises(PayloadError, match=f"data of type {problem} cannot be serialized"):
        encode_payload(value, LIMITS)


def test_payload_that_cannot_be_decoded_is_refused_at_publish() -> None:
    value = {(1, 2): "x"}
    try:
        fmt, raw = encode_payload(value, LIMITS)
    except PayloadError:
        return
    env = encode_envelope(ID, 0.0, "t", None, "s", "n", 0, None, None, fmt, raw)
    decode_envelope(env, LIMITS).data  # raises PayloadError on the receiving side


def test_oversized_payload_is_a_payload_error() -> None:
    small = Limits(max_payload_bytes=10)
    assert encode_payload(b"x" * 10, small) == (FORMAT_BYTES, b"x" * 10)
    with pytest.raises(PayloadError, match="11 bytes exceeds max_payload_bytes=10"):
        encode_payload(b"x" * 11, small)
    with pytest.raises(PayloadError, match="exceeds max_payload_bytes=10"):
        encode_payload("a string longer than ten bytes", small)


@pytest.mark.parametrize(("headers", "problem"), [
    (["a"], "headers must be a dict"),
    ({"a": 1}, "keys and values must be str"),
    ({1: "a"}, "keys and values must be str"),
    ({"": "a"}, "must not be empty"),
    ({f"h{i}": "" for i in range(65)}, "65 headers exceeds max_header_count=64"),
    ({"big": "x" * (16 * 1024)}, "exceeding max_header_bytes"),
])
def test_bad_headers_are_payload_errors(headers: Any, problem: str) -> None:
    with pytest.raises(PayloadError, match=problem):
        check_headers(headers, LIMITS)


def test_empty_headers_are_none() -> None:
    assert check_headers(None, LIMITS) is None
    assert check_headers({}, LIMITS) is None
    assert check_headers({"a": "b"}, LIMITS) == {"a": "b"}


# --- decoding rejects malformed envelopes ----------------------------------------------


def test_every_truncation_of_an_envelope_is_rejected() -> None:
    env = envelope({"k": "v"}, headers={"h": "v"}, key="k")
    for n in range(len(env)):
        with pytest.raises(ProtocolError):
            decode_envelope(env[:n], LIMITS)


@pytest.mark.parametrize(("change", "problem"), [
    ({"ver": 2}, "unknown envelope version 2"),
    ({"ver": "1"}, "unknown envelope version"),
    ({"id": b"short"}, "bad message id"),
    ({"id": ID.hex()}, "bad message id"),
    ({"ts": "now"}, "bad timestamp"),
    ({"ts": True}, "bad timestamp"),
    ({"topic": ""}, "bad topic"),
    ({"topic": 5}, "bad topic"),
    ({"topic": "t" * 257}, "bad topic"),
    ({"type": 5}, "bad type"),
    ({"type": "t" * 256}, "bad type"),
    ({"source": None}, "bad source or node"),
    ({"node": "n" * 256}, "bad source or node"),
    ({"schema": -1}, "bad schema version"),
    ({"schema": 1.0}, "bad schema version"),
    ({"schema": False}, "bad schema version"),
    ({"headers": ["a", "b"]}, "bad headers"),
    ({"headers": {"a": 1}}, "header name or value is not a str"),
    ({"headers": {b"a": "v"}}, "header name or value is not a str"),
    ({"key": 5}, "bad key"),
    ({"key": "k" * 256}, "bad key"),
    ({"fmt": 2}, "unknown payload format 2"),
    ({"fmt": True}, "unknown payload format"),
    ({"raw": "text"}, "bad or oversized payload"),
])
def test_wrong_field_types_are_rejected(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        decode_envelope(packed(fields(**change)), LIMITS)


@pytest.mark.parametrize("body", [[], fields()[:11], [*fields(), None], {"ver": 1}, "envelope", 1])
def test_envelope_must_be_a_12_field_array(body: Any) -> None:
    with pytest.raises(ProtocolError):
        decode_envelope(packed(body), LIMITS)


def test_oversized_fields_are_rejected() -> None:
    small = Limits(max_payload_bytes=10, max_topic_length=8, max_header_count=2, max_frame_bytes=4096)
    with pytest.raises(ProtocolError, match="oversized payload"):
        decode_envelope(packed(fields(raw=b"x" * 11, topic="a")), small)
    with pytest.raises(ProtocolError, match="bad topic"):
        decode_envelope(packed(fields(topic="a" * 9)), small)
    with pytest.raises(ProtocolError):
        decode_envelope(packed(fields(headers={"a": "", "b": "", "c": ""}, topic="a")), small)
    with pytest.raises(ProtocolError, match="larger than max_frame_bytes"):
        decode_envelope(b"\x00" * 4097, small)
    with pytest.raises(ProtocolError, match="max_header_bytes"):  # one header string beyond the bound
        decode_envelope(packed(fields(headers={"a": "x" * 20_000})), LIMITS)
    assert decode_envelope(packed(fields(raw=b"x" * 10, topic="a" * 8)), small).raw == b"x" * 10


def test_headers_beyond_max_header_bytes_are_rejected() -> None:
    headers = {f"h{i}": "x" * 10_000 for i in range(10)}  # ~100 KB, limit 16 KiB
    with pytest.raises(ProtocolError):
        decode_envelope(packed(fields(headers=headers)), LIMITS)


@pytest.mark.parametrize("topic", ["orders.*", "orders.>", "a..b", "a b"])
def test_envelope_topic_must_be_a_valid_topic(topic: str) -> None:
    with pytest.raises(ProtocolError):
        decode_envelope(packed(fields(topic=topic)), LIMITS)


def test_extension_types_are_rejected() -> None:
    with pytest.raises(ProtocolError, match="bad timestamp"):  # decoded as msgpack.Timestamp, refused as a field
        decode_envelope(packed(fields(ts=msgpack.Timestamp(1))), LIMITS)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    for decode in (decode_envelope, decode_frame):
        try:
            decode(data, LIMITS)
        except ProtocolError:
            pass


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda children: st.lists(children, max_size=13) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=30,
)


@given(st.sampled_from([HELLO, PING, BYE, DATA, 0, 9]), _msgpack_values)
def test_well_formed_msgpack_with_wrong_shape_only_raises_protocol_error(kind: int, body: Any) -> None:
    # Random bytes rarely get past msgpack; this reaches the per-kind field checks.
    try:
        decode_frame(bytes((PROTOCOL_VERSION, kind)) + packed(body), LIMITS)
    except ProtocolError:
        pass
    try:
        decode_envelope(packed(body), LIMITS)
    except ProtocolError:
        pass


_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=20) | st.lists(st.integers(0, 3), max_size=2)
    | st.dictionaries(st.text(max_size=3) | st.binary(max_size=2), st.text(max_size=3) | st.integers(-5, 5), max_size=2)
)


@given(st.tuples(*(st.just(v) | _scalars for v in fields())))
def test_valid_envelope_with_random_fields_only_raises_protocol_error(body: tuple[Any, ...]) -> None:
    # Each field is either valid or random, so single faults reach every check in turn.
    try:
        decode_envelope(packed(list(body)), LIMITS)
    except ProtocolError:
        pass


# --- frames --------------------------------------------------------------------------

RECORD = NodeRecord(
    "node-1", "orders", ("tcp://127.0.0.1:7400", "ipc:///tmp/n1"),
    (Subscription("orders.*"), Subscription("jobs.>", "workers")), 4, 1700000000.5,
    (("OrderPlaced", 2),), b"cert", taps=("payments.>",), tap_events=("acked", "retried"),
)
EP = "tcp://127.0.0.1:7401"


@pytest.mark.parametrize("want_reply", [True, False])
def test_hello_round_trips(want_reply: bool) -> None:
    frame = hello_frame("prod", claim(RECORD), want_reply)
    assert frame[:2] == bytes((PROTOCOL_VERSION, HELLO))
    assert decode_frame(frame, LIMITS) == Hello("prod", claim(RECORD), want_reply)
    assert decode_frame(memoryview(frame), LIMITS) == Hello("prod", claim(RECORD), want_reply)


def test_probe_frames_and_bye_round_trip() -> None:
    assert decode_frame(ping_frame("prod", "node-1", EP, 9, "node-2", 1.5), LIMITS) == Ping(
        "prod", "node-1", EP, 9, "node-2", 1.5)
    assert decode_frame(ack_frame("prod", "node-2", 9), LIMITS) == Ack("prod", "node-2", 9, False)
    assert decode_frame(ack_frame("prod", "node-3", 9, True), LIMITS) == Ack("prod", "node-3", 9, True)
    assert decode_frame(ping_req_frame("prod", "node-1", EP, 10, "node-2", "inproc://n2"), LIMITS) == PingReq(
        "prod", "node-1", EP, 10, "node-2", "inproc://n2")
    assert decode_frame(bye_frame("prod", "node-1", 5.0, 3), LIMITS) == Bye("prod", "node-1", 5.0, 3)


def test_sync_round_trips_digests_records_and_wants() -> None:
    suspect = Entry("node-9", 7.0, 2, SUSPECT, None, "node-3")
    full = claim(RECORD)
    frame = sync_frame("prod", "node-3", EP, SYNC_REPLY, b"\x01" * 8, 12,
                       [suspect.to_wire(True), full.to_wire(True), full.to_wire(False)], ["node-5"])
    assert decode_frame(frame, LIMITS) == Sync(
        "prod", "node-3", EP, SYNC_REPLY, b"\x01" * 8, 12,
        (suspect, full, Entry(full.node, full.started, full.incarnation, ALIVE)), ("node-5",))


def test_data_round_trips_with_and_without_groups() -> None:
    entries: list[Any] = [envelope(b"1"), [envelope(b"2"), ["workers", "audit"]]]
    frame = decode_frame(data_frame("node-1", 3, 100, entries, floor=99, resent=True, lane=0), LIMITS)
    assert frame == Data("node-1", 3, 100, 99, entries, True, 0)
    assert decode_frame(data_frame("node-1", 3, 100, entries), LIMITS).lane == 1  # type: ignore[union-attr]
    assert isinstance(frame, Data)
    assert split_entry(frame.entries[0]) == (entries[0], ())
    assert split_entry(frame.entries[1]) == (entries[1][0], ("workers", "audit"))
    assert decode_envelope(split_entry(frame.entries[1])[0], LIMITS, frame.first_seq + 1).seq == 101


def test_receipts_round_trip_and_bad_ones_are_rejected() -> None:
    assert decode_frame(receipt_frame("node-2", 4, 10, 12), LIMITS) == Receipt("node-2", 4, 10, 12, 1)
    assert decode_frame(receipt_frame("node-2", 4, 10, 12, 2), LIMITS) == Receipt("node-2", 4, 10, 12, 2)
    for body in (["node-2", 4, 12, 10, 1], ["node-2", 4, -1, 3, 1], ["", 4, 1, 1, 1], ["node-2", 4, 1, 1],
                 ["node-2", "4", 1, 1, 1], ["node-2", 4, 1, 1, 3], ["node-2", 4, 1, 1, -1], ["node-2", 4, 1, 1, "0"],
                 ["node/2", 4, 1, 1, 1]):
        with pytest.raises(ProtocolError):
            decode_frame(bytes((PROTOCOL_VERSION, RECEIPT)) + msgpack.packb(body), LIMITS)


@pytest.mark.parametrize("body", [["n", 0, 1, 0, [], False, 1], ["n", 1, 0, 0, [], False, 1],
                                  ["n", 1, 1, -1, [], False, 1], ["", 1, 1, 0, [], False, 1], ["n", 1, 1, [], False, 1],
                                  ["n", 1, 1, 0, "x", False, 1], ["n", 1, 1, 0, [], None, 1],
                                  ["n", 1, 1, 0, [], False], ["n", 1, 1, 0, [], False, 3], ["n", 1, 1, 0, [], False, -1],
                                  ["n", 1, 1, 0, [], False, None], ["n/high", 1, 1, 0, [], False, 1]])
def test_bad_data_frame_headers_are_rejected(body: list[Any]) -> None:
    with pytest.raises(ProtocolError):
        decode_frame(bytes((PROTOCOL_VERSION, DATA)) + msgpack.packb(body), LIMITS)


@pytest.mark.parametrize("entry", ["text", [b"env"], [b"env", "workers"], [b"env", [1]], ["env", []], None])
def test_bad_data_entries_are_rejected(entry: Any) -> None:
    with pytest.raises(ProtocolError):
        split_entry(entry)


_ENDPOINTS = (st.builds("tcp://{}.{}.{}.{}:{}".format, *[st.integers(0, 255)] * 4, st.integers(1, 65535))
              | st.from_regex(r"inproc://[a-z0-9._-]{1,20}", fullmatch=True))
_RECORDS = st.builds(
    NodeRecord,
    node=st.text(min_size=1, max_size=20).filter(lambda n: "/" not in n), service=st.text(min_size=1, max_size=20),
    endpoints=st.lists(_ENDPOINTS, min_size=1, max_size=16).map(tuple),
    subscriptions=st.lists(st.builds(Subscription, st.text(min_size=1, max_size=20),
                                     st.none() | st.text(min_size=1, max_size=10)), max_size=10).map(tuple),
    incarnation=st.integers(0, MAX_INCARNATION),
    started=st.floats(min_value=0, allow_infinity=False),
    schemas=st.lists(st.tuples(st.text(min_size=1, max_size=10), st.integers(0, 99)), max_size=3).map(tuple),
    cert=st.none() | st.binary(max_size=64),
    sig=st.none() | st.binary(min_size=64, max_size=64),
)


KEYED_EP = "tcp://127.0.0.1:7401#" + "k" * 43


def test_a_card_round_trips_without_the_record() -> None:
    frame = card_frame("prod", claim(RECORD), b"a certificate", KEYED_EP)
    assert frame[:2] == bytes((PROTOCOL_VERSION, HELLO))
    card = decode_frame(frame, LIMITS)
    assert card == Hello("prod", dataclasses.replace(claim(RECORD), record=None), True, b"a certificate", KEYED_EP)
    assert card.entry.record is None  # type: ignore[union-attr]


@pytest.mark.parametrize("body, problem", [
    (["m", claim(RECORD).to_wire(True), True, b"cert", KEYED_EP], "no record"),  # a card with the record
    (["m", claim(RECORD).to_wire(False), False, b"cert", KEYED_EP], "asks for an answer"),
    (["m", claim(RECORD).to_wire(False), True, b"", KEYED_EP], "certificate"),
    (["m", claim(RECORD).to_wire(False), True, "cert", KEYED_EP], "certificate"),
    (["m", claim(RECORD).to_wire(False), True, b"c" * (16 * 1024 + 1), KEYED_EP], "certificate"),
    (["m", claim(RECORD).to_wire(False), True, b"cert", EP], "name its key"),  # no key to check the cert against
    (["m", claim(RECORD).to_wire(False), True, b"cert", "udp://x:1#" + "k" * 43], "name its key"),
    (["m", claim(RECORD).to_wire(False), True, b"cert"], "bad hello"),
    (["m", claim(RECORD).to_wire(False), True], "record"),  # a full hello needs its record
])
def test_malformed_cards_are_rejected(body: list[object], problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        decode_frame(bytes((PROTOCOL_VERSION, HELLO)) + msgpack.packb(body, use_bin_type=True), LIMITS)


@given(record=_RECORDS, want_reply=st.booleans())
def test_hello_round_trip_property(record: NodeRecord, want_reply: bool) -> None:
    assert decode_frame(hello_frame("m", claim(record), want_reply), LIMITS) == Hello("m", claim(record), want_reply)


@given(record=_RECORDS, status=st.sampled_from([ALIVE, SUSPECT, DEAD, LEFT]), later=st.integers(0, 5),
       by=st.text(max_size=10), with_record=st.booleans())
def test_entry_round_trip_property(record: NodeRecord, status: int, later: int, by: str, with_record: bool) -> None:
    entry = Entry(record.node, record.started, min(record.incarnation + later, MAX_INCARNATION), status, record, by)
    sent = sync_frame("m", "n", EP, SYNC_OPEN, b"", 1, [entry.to_wire(with_record)], [])
    decoded = decode_frame(sent, LIMITS)
    assert isinstance(decoded, Sync)
    expected = entry if with_record else Entry(entry.node, entry.started, entry.incarnation, status, None, by)
    assert decoded.entries == (expected,)


def _head(kind: int) -> bytes:
    return bytes((PROTOCOL_VERSION, kind))


_ALIVE_WIRE = claim(RECORD).to_wire(True)


def test_a_frame_of_another_protocol_version_is_told_apart_from_a_malformed_one() -> None:
    older = bytes((PROTOCOL_VERSION - 1, HELLO)) + packed(["m"])
    with pytest.raises(OtherVersion) as caught:
        decode_frame(older, LIMITS)
    assert caught.value.version == PROTOCOL_VERSION - 1
    assert f"this node speaks {PROTOCOL_VERSION}" in str(caught.value)


@pytest.mark.parametrize(("announced", "answer"), [
    (None, None), ("", None), (str(PROTOCOL_VERSION), True), (f"{PROTOCOL_VERSION - 1},{PROTOCOL_VERSION}", True),
    (str(PROTOCOL_VERSION + 1), False), (f"{PROTOCOL_VERSION}0", False), ("seven", False),
])
def test_which_announced_protocol_versions_speak_ours(announced: str | None, answer: bool | None) -> None:
    assert speaks(announced) is answer


@pytest.mark.parametrize(("frame", "problem"), [
    (b"", "too short"),
    (b"\x01\x01", "too short"),
    (bytes((1, HELLO)) + packed(["m"]), "unknown protocol version 1"),
    (_head(42) + packed(["m"]), "unknown frame kind 42"),
    (_head(PING) + packed({"mesh": "m"}), "body is not an array"),
    (_head(PING) + packed(["m", "n", EP, 1, "t"]), "bad ping"),
    (_head(PING) + packed(["m", "n", "ep", 1, "t", 1.0]), "bad ping"),
    (_head(PING) + packed(["m", "n", EP, -1, "t", 1.0]), "bad sequence number"),
    (_head(PING) + packed(["m", "", EP, 1, "t", 1.0]), "bad ping"),
    (_head(ACK) + packed(["m", "n", 1, 0]), "bad ack"),
    (_head(ACK) + packed(["m", "n", "1", False]), "bad sequence number"),
    (_head(PING_REQ) + packed(["m", "n", EP, 1, "t", "tcp://[x"]), "bad ping-req"),
    (_head(BYE) + packed(["m"]), "bad bye"),
    (_head(BYE) + packed(["m", 5, 1.0, 1]), "bad bye"),
    (_head(BYE) + packed(["m", "n", 1.0, -1]), "bad incarnation"),
    (_head(BYE) + packed(["m", "n", float("nan"), 1]), "bad start time"),
    (_head(HELLO) + packed(["m", _ALIVE_WIRE]), "bad hello"),
    (_head(HELLO) + packed(["m", _ALIVE_WIRE, 1]), "bad hello"),
    (_head(HELLO) + packed(["m", [*_ALIVE_WIRE[:5], None], True]), "must carry the sender's record"),
    (_head(HELLO) + packed(["m", [*_ALIVE_WIRE[:3], SUSPECT, *_ALIVE_WIRE[4:]], True]), "alive"),
    (_head(SYNC) + packed(["m", "n", EP, 3, b"", 0, [], []]), "bad sync"),
    (_head(SYNC) + packed(["m", "n", EP, SYNC_OPEN, b"x" * 33, 0, [], []]), "bad sync"),
    (_head(SYNC) + packed(["m", "n", EP, SYNC_OPEN, b"", 0, [[]] * 257, []]), "too many"),
    (_head(SYNC) + packed(["m", "n", EP, SYNC_OPEN, b"", 0, [], ["x"] * 257]), "too many"),
    (_head(SYNC) + packed(["m", "n", EP, SYNC_LAST, b"", 0, [], [""]]), "bad wanted node id"),
    (_head(DATA) + packed(["n", 1, 1, 0, []]), "7-field array"),
    (_head(DATA) + packed(["n", 1.0, 1, 0, [], False, 1]), "bad data frame header"),
    (_head(DATA) + packed(["n", 1, 1, 0, [], 1, 1]), "bad data frame header"),
    (_head(DATA) + packed(["n", 1, 1, 0, [b""] * 257, False, 1]), "bad or oversized batch"),
    (_head(DATA) + packed(["n", 1, 1, 0, b"", False, 1]), "bad or oversized batch"),
    (_head(DATA) + packed(["n", 1, 1, 0, [], False, 7]), "bad lane in data frame"),
    (_head(PING) + b"\xc1", "undecodable msgpack"),
    (_head(PING) + packed(["m", "n", EP, 1, "t", 1.0]) + b"\x00", "undecodable msgpack"),  # trailing bytes
])
def test_malformed_frames_are_rejected(frame: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        decode_frame(frame, LIMITS)


def test_oversized_frame_is_rejected() -> None:
    frame = ping_frame("m", "n", EP, 1, "t")
    with pytest.raises(ProtocolError, match="larger than max_frame_bytes"):
        decode_frame(frame, Limits(max_frame_bytes=len(frame) - 1))


def _record_wire(**changes: Any) -> list[Any]:
    wire = RECORD.to_wire()
    names = ["node", "service", "endpoints", "subs", "incarnation", "started", "schemas", "taps", "tap_events", "cert",
             "sig"]
    for name, value in changes.items():
        wire[names.index(name)] = value
    return wire


def _entry_wire(**changes: Any) -> list[Any]:
    wire = claim(RECORD).to_wire(True)
    names = ["node", "started", "incarnation", "status", "by", "record"]
    for name, value in changes.items():
        wire[names.index(name)] = value
    return wire


@pytest.mark.parametrize(("record", "problem"), [
    ("record", "11-field array"),
    (_record_wire()[:10], "11-field array"),
    (_record_wire(tap_events="sent"), "bad tap events"),
    (_record_wire(tap_events=[""]), "bad tap events"),
    (_record_wire(taps="orders.>"), "bad or too many tap patterns"),
    (_record_wire(taps=["x"] * 65), "bad or too many tap patterns"),
    (_record_wire(taps=[""]), "bad tap pattern"),
    (_record_wire(taps=[3]), "bad tap pattern"),
    (_record_wire(node=""), "bad node id"),
    (_record_wire(node="n" * 256), "bad node id"),
    (_record_wire(service=3), "bad service"),
    (_record_wire(endpoints=[]), "bad endpoints"),
    (_record_wire(endpoints=["e"] * 17), "bad endpoints"),
    (_record_wire(endpoints=[5]), "bad endpoint in record"),
    (_record_wire(subs="orders.*"), "bad or too many subscriptions"),
    (_record_wire(subs=[["orders.*"]]), "bad subscription in record"),
    (_record_wire(subs=[["", None]]), "bad subscription pattern"),
    (_record_wire(subs=[["p" * 257, None]]), "bad subscription pattern"),
    (_record_wire(subs=[["orders.*", ""]]), "bad queue group"),
    (_record_wire(subs=[["orders.*", 1]]), "bad queue group"),
    (_record_wire(incarnation=-1), "bad incarnation"),
    (_record_wire(incarnation=True), "bad incarnation"),
    (_record_wire(incarnation=MAX_INCARNATION + 1), "bad incarnation"),
    (_record_wire(started="now"), "bad start time"),
    (_record_wire(started=float("inf")), "bad start time"),
    (_record_wire(schemas=[["OrderPlaced"]]), "bad schema"),
    (_record_wire(schemas=[["OrderPlaced", -1]]), "bad schema"),
    (_record_wire(cert="text"), "bad certificate"),
    (_record_wire(cert=b"x" * 20_000), "bad certificate"),
    (_record_wire(sig=b"x" * 63), "bad signature"),
    (_record_wire(sig="sig"), "bad signature"),
])
def test_malformed_records_are_rejected(record: Any, problem: str) -> None:
    entry = _entry_wire(record=record)
    with pytest.raises(ProtocolError, match=problem):
        decode_frame(_head(HELLO) + packed(["m", entry, True]), LIMITS)


@pytest.mark.parametrize(("entry", "problem"), [
    ("entry", "6-field array"),
    (_entry_wire()[:5], "6-field array"),
    (_entry_wire(node=""), "bad node id"),
    (_entry_wire(status=4), "bad status"),
    (_entry_wire(status=True), "bad status"),
    (_entry_wire(by=3), "bad suspecter"),
    (_entry_wire(incarnation=MAX_INCARNATION * 2), "bad incarnation"),
    (_entry_wire(started=-1.0), "bad start time"),
    (_entry_wire(incarnation=RECORD.incarnation - 1), "older than the record"),
    (_entry_wire(node="someone-else"), "about another node"),
])
def test_malformed_entries_are_rejected(entry: Any, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        decode_frame(_head(SYNC) + packed(["m", "n", EP, SYNC_OPEN, b"", 1, [entry], []]), LIMITS)


def test_too_many_subscriptions_are_rejected() -> None:
    entry = _entry_wire(record=_record_wire(subs=[["a", None]] * 11))
    with pytest.raises(ProtocolError, match="too many subscriptions"):
        decode_frame(_head(HELLO) + packed(["m", entry, True]), Limits(max_subscriptions=10))


def test_limits_from_config_copies_every_bound() -> None:
    from meshmq import Config

    cfg = Config(max_payload_bytes=1000, max_topic_length=64, max_subscriptions=5)
    assert Limits.from_config(cfg) == Limits(
        max_frame_bytes=cfg.max_frame_bytes, max_payload_bytes=1000, max_topic_length=64,
        max_header_count=cfg.max_header_count, max_header_bytes=cfg.max_header_bytes,
        max_batch_messages=cfg.max_batch_messages, max_subscriptions=5,
    )


def test_message_data_of_a_corrupt_msgpack_payload_is_a_payload_error() -> None:
    env = encode_envelope(ID, 0.0, "t", None, "s", "n", 0, None, None, FORMAT_MSGPACK, b"\xc1")
    msg = decode_envelope(env, LIMITS)
    with pytest.raises(PayloadError, match="does not decode"):
        msg.data
    assert "size=1" in repr(msg)


@pytest.mark.parametrize("endpoint", ["tcp://[not-an-endpoint", "tcp://1.2.3.4:0", "tcp://1.2.3.4:70000",
                                      "udp://1.2.3.4:5", "tcp://1.2.3.4", "tcp://a b:1", "x" * 300])
def test_records_and_probes_with_a_malformed_endpoint_are_rejected(endpoint: str) -> None:
    record = NodeRecord("n", "svc", (endpoint,), (), 1, 1.0)
    with pytest.raises(ProtocolError, match="endpoint"):
        decode_frame(hello_frame("m", claim(record), False), LIMITS)
    for frame in (ping_frame("m", "n", endpoint, 1, "t", 1.0), ping_req_frame("m", "n", EP, 1, "t", endpoint),
                  sync_frame("m", "n", endpoint, SYNC_OPEN, b"", 0, [], [])):
        with pytest.raises(ProtocolError):
            decode_frame(frame, LIMITS)


def test_revoke_frames_round_trip_and_hostile_ones_are_rejected() -> None:
    from meshmq._wire import (
        MAX_FRAME_REVOCATIONS, MAX_REVOCATION_BYTES, REVOKE, REVOKE_OPEN, REVOKE_REPLY, Revocations, revoke_frame,
    )

    digest = bytes(range(8))
    assert decode_frame(revoke_frame("m", "n", REVOKE_REPLY, digest, [b"r1", b"r2"]), LIMITS) == Revocations(
        "m", "n", REVOKE_REPLY, digest, (b"r1", b"r2"))
    assert decode_frame(revoke_frame("m", "n", REVOKE_OPEN, digest, []), LIMITS).revocations == ()  # type: ignore[union-attr]
    for body, problem in [
        (["m", "n", 3, digest, []], "bad revoke frame"),                          # unknown phase
        (["m", "n", True, digest, []], "bad revoke frame"),                       # a bool is not a phase
        (["m", "n", 0, b"short", []], "bad revoke frame"),                        # digest of another size
        (["m", "n", 0, digest, "x"], "bad revoke frame"),                         # not a list
        (["m", "n", 0, digest, [b"r"] * (MAX_FRAME_REVOCATIONS + 1)], "bad revoke frame"),  # too many
        (["m", "n", 0, digest, [b"x" * (MAX_REVOCATION_BYTES + 1)]], "bad revocation"),  # oversized
        (["m", "n", 0, digest, [b""]], "bad revocation"),                         # empty
        (["m", "n", 0, digest, ["text"]], "bad revocation"),                      # not bytes
        (["m", "", 0, digest, []], "bad revoke"),                                 # no sender
        (["m", "n", 0, digest], "bad revoke"),                                    # a field missing
    ]:
        with pytest.raises(ProtocolError, match=problem):
            decode_frame(_head(REVOKE) + packed(body), LIMITS)
