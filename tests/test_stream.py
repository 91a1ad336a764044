"""Reliable streams: numbering, acks, retransmission, ordering and dedup, under loss,
duplication, reordering and crashes (a Hypothesis state machine), plus unit cases."""

from __future__ import annotations

import copy
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from meshmq._stream import Backoff, ReceiveStream, SendStream, StreamFull

# --- unit cases --------------------------------------------------------------------------


def test_messages_are_numbered_and_released_by_cumulative_acks() -> None:
    s: SendStream[str] = SendStream(epoch=7)
    assert [s.put(x, 0.0) for x in "abc"] == [1, 2, 3]
    assert [item for _, item in s.due(0.0, 10)] == ["a", "b", "c"]
    assert s.due(0.0, 10) == []  # sent once; due again only after the backoff
    assert s.on_ack(7, 2, 0.1) == ["a", "b"]
    assert s.on_ack(7, 2, 0.1) == [] and s.counters["acks_repeated"] == 1  # idempotent
    assert s.on_ack(7, 9, 0.1) == [] and s.counters["acks_from_the_future"] == 1
    assert s.on_ack(6, 3, 0.1) == [] and s.counters["acks_other_epoch"] == 1
    s.put("d", 0.2)
    assert s.on_ack(7, 4, 0.2) == [] and s.counters["acks_from_the_future"] == 2  # 4 was never sent
    assert (s.acked, s.floor, list(s.pending)) == (2, 3, [3, 4])


def test_unacked_messages_are_sent_again_with_growing_jittered_backoff() -> None:
    s: SendStream[str] = SendStream(epoch=1, backoff=Backoff(initial=1.0, factor=2.0, maximum=5.0, jitter=0.1),
                                    rng=random.Random(3))
    s.put("a", 0.0)
    sends = []
    now = 0.0
    while len(sends) < 6:
        for entry in s.due(now, 10):
            sends.append(now)
        due = s.next_due()
        assert due is not None
        now = due
    gaps = [b - a for a, b in zip(sends, sends[1:])]
    for gap, base in zip(gaps, [1.0, 2.0, 4.0, 5.0, 5.0]):
        assert base * 0.9 <= gap <= base * 1.1
    assert s.counters["retransmitted"] == 5
    s.resend_all(now + 0.01)
    assert [item for _, item in s.due(now + 0.01, 10)] == ["a"]


def test_a_full_stream_refuses_more() -> None:
    s: SendStream[int] = SendStream(epoch=1, max_pending=2)
    s.put(1, 0.0)
    s.put(2, 0.0)
    with pytest.raises(StreamFull):
        s.put(3, 0.0)
    s.due(0.0, 10)
    s.on_ack(1, 1, 0.0)
    assert s.put(3, 0.0) == 3


def test_due_respects_its_limit_lowest_numbers_first() -> None:
    s: SendStream[int] = SendStream(epoch=1)
    for i in range(10):
        s.put(i, 0.0)
    assert [seq for seq, _ in s.due(0.0, 4)] == [1, 2, 3, 4]
    assert [seq for seq, _ in s.due(0.0, 4)] == [5, 6, 7, 8]


def test_one_timer_per_stream_resends_everything_unacked_oldest_first() -> None:
    s: SendStream[int] = SendStream(epoch=1, backoff=Backoff(initial=1.0, jitter=0.0))
    for i in range(6):
        s.put(i, 0.0)
    assert len(s.due(0.0, 100)) == 6 and s.timer == 1.0
    s.on_ack(1, 2, 0.5)  # progress resets the timer
    assert s.timer == 1.5 and s.due(1.0, 100) == []
    again = s.due(1.5, 3)  # the timer expired: resend from the oldest unacked, 3 at a time
    assert [seq for seq, _ in again] == [3, 4, 5] and s.timer == 3.5  # backed off: 2 s
    assert [seq for seq, _ in s.due(1.5, 3)] == [6]
    assert s.due(1.6, 3) == [] and s.next_due() == 3.5
    assert s.counters["retransmitted"] == 4
    s.give_up(4)
    assert [seq for seq, _ in s.due(3.5, 10)] == [3, 5, 6]  # the one given up on is not sent
    s.resend_all(4.0)  # the receiver came back: now, not after the backoff
    assert [seq for seq, _ in s.due(4.0, 10)] == [3, 5, 6]


def test_the_timer_expires_only_once_acks_up_to_then_were_read() -> None:
    """A sender whose loop was busy has acks waiting unread: a timer that expired after it
    last read them must not resend (that doubled a busy publisher's traffic)."""
    s: SendStream[int] = SendStream(epoch=1, backoff=Backoff(initial=1.0, jitter=0.0))
    for i in range(3):
        s.put(i, 0.0)
    assert len(s.due(0.0, 10)) == 3 and s.timer == 1.0
    assert s.due(5.0, 10, heard=0.9) == []  # late, but not heard from since before the deadline
    assert s.counters["retransmitted"] == 0
    assert s.on_ack(1, 3, 5.0) == [0, 1, 2]  # the ack was there all along
    assert s.due(5.0, 10, heard=5.0) == [] and s.counters["retransmitted"] == 0
    s.put(3, 5.0)
    assert [seq for seq, _ in s.due(5.0, 10)] == [4] and s.timer == 6.0
    assert [seq for seq, _ in s.due(7.0, 10, heard=6.0)] == [4]  # heard at the deadline: nothing came


def test_received_but_not_committed_is_kept_without_being_sent_again() -> None:
    s: SendStream[int] = SendStream(epoch=1, backoff=Backoff(initial=1.0, maximum=8.0, jitter=0.0))
    for i in range(4):
        s.put(i, 0.0)
    s.due(0.0, 10)
    assert s.on_ack(1, 1, 0.5, received=4) != [] and s.received == 4
    assert list(s.pending) == [2, 3, 4] and s.timer == 8.5  # the application works: check back slowly
    assert s.due(5.0, 10) == []
    # The receiver restarted and lost what it had not committed: its next ack says so.
    s.on_ack(1, 1, 6.0, received=1)
    assert s.counters["acks_receiver_behind"] == 1
    assert [seq for seq, _ in s.due(6.0, 10)] == [2, 3, 4]
    # Silence for a whole (slow) timeout with everything received: sent again too.
    s.on_ack(1, 1, 6.5, received=4)
    assert s.due(14.0, 10) == [] and [seq for seq, _ in s.due(14.5, 10)] == [2, 3, 4]


def test_a_durable_stream_sends_only_what_its_commit_released() -> None:
    s: SendStream[str] = SendStream(epoch=1)
    assert [s.put(x, 0.0, ready=False) for x in "abc"] == [1, 2, 3]
    assert s.due(0.0, 10) == [] and s.next_due() is None
    s.release(2)
    assert [item for _, item in s.due(0.0, 10)] == ["a", "b"]
    s.release(99)  # capped at what exists
    assert s.ready == 3 and [item for _, item in s.due(0.0, 10)] == ["c"]


def test_a_stream_with_many_waiting_messages_costs_only_its_limit() -> None:
    import collections

    class Counting(collections.OrderedDict):  # type: ignore[type-arg]
        lookups = 0

        def get(self, key: object, default: object = None) -> object:
            Counting.lookups += 1
            return super().get(key, default)

    s: SendStream[int] = SendStream(epoch=1, max_pending=100_000, backoff=Backoff(initial=1.0, jitter=0.0))
    s.pending = Counting()
    for i in range(100_000):
        s.put(i, 0.0)
    assert len(s.due(0.0, 100_000)) == 100_000
    Counting.lookups = 0
    for _ in range(1000):
        assert s.due(0.5, 64) == []  # nothing due: the 100,000 waiting are not walked
    assert Counting.lookups == 0
    assert len(s.due(1.0, 64)) == 64 and Counting.lookups == 64  # a resend: one lookup per message sent


def test_restored_stream_keeps_its_numbers() -> None:
    s: SendStream[str] = SendStream(epoch=4, next_seq=10, acked=6)
    s.restore([(9, "i"), (7, "g")], 5.0)
    assert list(s.pending) == [7, 9] and s.floor == 7
    assert s.highest_sent == 9  # any kept number may have been sent before the restart
    assert [seq for seq, _ in s.due(5.0, 10)] == [7, 9]  # sent anew after the restart
    assert s.put("j", 5.0) == 10
    with pytest.raises(ValueError):
        s.restore([(6, "f")], 5.0)
    with pytest.raises(ValueError):
        SendStream(epoch=0)


def test_receiver_delivers_in_order_holds_gaps_and_drops_duplicates() -> None:
    r: ReceiveStream[str] = ReceiveStream()
    got = r.on_data(1, 1, [(2, "b"), (3, "c")])
    assert got.deliver == [] and set(r.held) == {2, 3}
    got = r.on_data(1, 1, [(1, "a"), (2, "b")])
    assert got.deliver == [(1, "a"), (2, "b"), (3, "c")] and got.duplicates == 1 and got.ack
    r.commit(3)
    assert r.ack == (1, 3)
    again = r.on_data(1, 1, [(3, "c")])
    assert again.deliver == [] and again.duplicates == 1 and again.ack  # re-ack, so the sender stops
    with pytest.raises(ValueError):
        r.commit(4)


def test_a_message_the_sender_still_keeps_is_never_skipped() -> None:
    r: ReceiveStream[str] = ReceiveStream()
    got = r.on_data(1, 1, [(2, "b")])  # 1 is still kept (floor 1): wait for it
    assert got.deliver == [] and got.skipped == 0 and r.delivered == 0


def test_receiver_skips_what_the_sender_gave_up_on() -> None:
    r: ReceiveStream[str] = ReceiveStream()
    r.on_data(1, 1, [(3, "c")])
    got = r.on_data(1, 3, [])  # 1 and 2 expired at the sender
    assert got.deliver == [(3, "c")] and got.skipped == 2
    assert r.delivered == 3


def test_a_new_epoch_starts_over_and_an_old_one_is_stale() -> None:
    r: ReceiveStream[str] = ReceiveStream()
    r.on_data(5, 1, [(1, "a"), (2, "b"), (4, "d")])
    got = r.on_data(6, 1, [(1, "A")])  # the sender lost its state: new numbering
    assert got.deliver == [(1, "A")] and r.epoch == 6 and not r.held
    assert r.on_data(5, 1, [(3, "c")]).deliver == [] and r.counters["stale_epoch_frames"] == 1


def test_frames_far_ahead_are_dropped_not_held_without_bound() -> None:
    r: ReceiveStream[int] = ReceiveStream(max_held=4)
    r.on_data(1, 1, [(i, i) for i in range(2, 100)])
    assert sorted(r.held) == [2, 3, 4] and r.counters["dropped_beyond_window"] == 95


# --- the state machine -------------------------------------------------------------------


def test_due_fresh_answers_only_for_new_consecutive_messages() -> None:
    s: SendStream[str] = SendStream(1, rng=random.Random(0))
    for item in "abcde":
        s.put(item, 0.0)
    assert s.due_fresh(0.0, 2) == (1, ["a", "b"])
    s.give_up(4)
    assert s.due_fresh(0.0, 10) is None  # a gap: due skips it
    assert [seq for seq, _ in s.due(0.0, 10)] == [3, 5]
    assert s.due_fresh(0.0, 10) is None  # nothing new
    assert s.due_fresh(5.0, 10) is None and s.resend_from is None  # the timer expired: due resends
    assert [seq for seq, _ in s.due(5.0, 10)] == [1, 2, 3, 5]
    s.put("f", 5.0)
    assert s.due_fresh(5.0, 10, fresh=0) is None  # the window is full
    assert s.due_fresh(5.0, 10, fresh=1) == (6, ["f"])


def _position(s: SendStream[str]) -> tuple[object, ...]:
    return (s.sent_upto, s.highest_sent, s.timer, s.resend_from, s.timeouts, s.received, dict(s.counters))


class StreamScenario(RuleBasedStateMachine):
    """A sender and a receiver over a network that loses, duplicates and reorders frames;
    either side may crash. The sender's outbox is durable unless a crash says otherwise.
    The receiver hands messages to its application at once and, later, commits what the
    application finished with its position (the dedup record); acks name both.

    Invariants: no message is finished twice, and none is handed over again once its
    finish is committed; per epoch, in order; nothing acknowledged is lost; and once the
    network behaves, everything not given up arrives.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.rng = random.Random(0)
        self.epoch = 1
        self.sender: SendStream[str] = SendStream(self.epoch, rng=self.rng, max_pending=64)
        self.store: dict[int, str] = {}  # the durable outbox: seq -> message id
        self.receiver: ReceiveStream[str] = ReceiveStream(max_held=16)
        self.committed = (0, 0)  # the receiver's durable (epoch, position)
        self.network: list[tuple] = []
        self.app: list[str] = []  # what the application finished (committed), in order
        self.handed: list[str] = []  # handed to the application, not yet committed
        self.positions: dict[str, tuple[int, int]] = {}  # message id -> (epoch, seq)
        self.acked: set[str] = set()
        self.excused: set[str] = set()  # given up on, or lost with the sender's state
        self.count = 0

    # --- the sender ---

    @rule()
    def publish(self) -> None:
        if len(self.sender.pending) >= self.sender.max_pending:
            return
        self.count += 1
        mid = f"m{self.count}"
        seq = self.sender.put(mid, self.now)
        self.store[seq] = mid  # committed to the outbox before publish returns
        self.positions[mid] = (self.epoch, seq)

    @rule(limit=st.integers(1, 8), fast=st.booleans())
    def send(self, limit: int, fast: bool) -> None:
        batch = None
        if fast:  # as the outbox sends: the cheap form first, due when it has no answer
            twin = copy.deepcopy(self.sender)
            before = _position(self.sender)
            new = self.sender.due_fresh(self.now, limit)
            if new is None:
                assert _position(self.sender) == before
            else:
                first, items = new
                batch = list(zip(range(first, first + len(items)), items))
                assert batch == twin.due(self.now, limit)
                assert _position(self.sender) == _position(twin)
        if batch is None:
            batch = self.sender.due(self.now, limit)
        if batch:
            self.network.append(("data", self.sender.epoch, self.sender.floor, batch))

    @rule(dt=st.sampled_from([0.05, 0.3, 1.0, 5.0]))
    def wait(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: bool(self.sender.pending))
    @rule(data=st.data())
    def give_up(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.sender.pending)))
        entry = self.sender.give_up(seq)
        assert entry is not None
        del self.store[seq]
        self.excused.add(entry)

    @rule()
    def crash_sender_keeping_the_outbox(self) -> None:
        acked = self.sender.acked
        next_seq = self.sender.next_seq
        self.sender = SendStream(self.epoch, next_seq=next_seq, acked=acked, rng=self.rng, max_pending=64)
        self.sender.restore(self.store.items(), self.now)

    @rule()
    def crash_sender_losing_the_outbox(self) -> None:
        self.excused |= set(self.store.values())
        self.store.clear()
        self.epoch += 1  # a sender without its state starts a new epoch
        self.sender = SendStream(self.epoch, rng=self.rng, max_pending=64)

    # --- the receiver ---

    @rule()
    def commit_receiver(self) -> None:
        self.receiver.commit(self.receiver.delivered)
        self.committed = (self.receiver.epoch, self.receiver.committed)
        self.app += self.handed
        self.handed = []
        self.network.append(("ack", self.receiver.epoch, self.receiver.committed, self.receiver.delivered))

    @rule()
    def crash_receiver(self) -> None:
        self.handed = []  # not committed: handed over again after the restart
        epoch, position = self.committed
        self.receiver = ReceiveStream(epoch=epoch, delivered=position, max_held=16)

    # --- the network ---

    @precondition(lambda self: bool(self.network))
    @rule(data=st.data(), duplicate=st.booleans())
    def deliver(self, data: st.DataObject, duplicate: bool) -> None:
        i = data.draw(st.integers(0, len(self.network) - 1))  # any frame: reordering
        frame = self.network[i] if duplicate else self.network.pop(i)
        self._handle(frame)

    @precondition(lambda self: bool(self.network))
    @rule(data=st.data())
    def lose(self, data: st.DataObject) -> None:
        self.network.pop(data.draw(st.integers(0, len(self.network) - 1)))

    def _handle(self, frame: tuple) -> None:
        if frame[0] == "data":
            _, epoch, floor, messages = frame
            before = self.receiver.epoch
            got = self.receiver.on_data(epoch, floor, messages)
            if self.receiver.epoch != before:
                # A new epoch: the shell commits it at once (position 0), so the old epoch's
                # frames stay stale after a crash; what the old one handed over is done with.
                self.app += self.handed
                self.handed = []
                self.committed = (self.receiver.epoch, 0)
            for _, mid in got.deliver:
                assert mid not in self.app, f"{mid} handed over again after its finish was committed"
                self.handed.append(mid)
            if got.ack:
                self.network.append(("ack", self.receiver.epoch, self.receiver.committed, self.receiver.delivered))
        else:
            _, epoch, seq, received = frame
            released = self.sender.on_ack(epoch, seq, self.now, received)
            self.acked.update(released)
            if released:
                for q in [q for q in self.store if q <= self.sender.acked]:
                    assert self.store.pop(q) in released
            assert not released or all(q > self.sender.acked for q in self.store)

    # --- what must hold ---

    @invariant()
    def no_duplicates_in_order_nothing_acked_lost(self) -> None:
        assert len(self.app) == len(set(self.app))
        positions = [self.positions[mid] for mid in self.app]
        for epoch in {e for e, _ in positions}:
            seqs = [s for e, s in positions if e == epoch]
            assert seqs == sorted(seqs)
        assert self.acked <= set(self.app)
        assert all(self.sender.acked < seq < self.sender.next_seq for seq in self.sender.pending)
        assert set(self.sender.pending) == set(self.store)
        r = self.receiver
        assert all(r.delivered + 1 < seq <= r.delivered + r.max_held for seq in r.held)

    def teardown(self) -> None:
        # The network behaves from now on: retransmission must deliver everything not excused.
        for _ in range(200):
            self.now += 20.0
            self.send(64, fast=True)
            while self.network:
                self._handle(self.network.pop(0))
            self.commit_receiver()
            while self.network:
                self._handle(self.network.pop(0))
            if not self.sender.pending:
                break
        assert not self.sender.pending
        missing = set(self.positions) - set(self.app) - self.excused
        assert not missing, sorted(missing)


TestStreamScenario = StreamScenario.TestCase
TestStreamScenario.settings = settings(max_examples=400, stateful_step_count=60)
