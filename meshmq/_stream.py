"""Reliable streams between two nodes: the sending and the receiving half. Pure, no I/O.

Every (sender, receiver) pair has one stream. The sender numbers what it puts on
the stream with its ``epoch`` and a sequence number (1, 2, 3, ...), keeps each
message until the receiver acknowledges it, and sends it again with exponential
backoff and jitter until then. The receiver hands messages to the application in
sequence order, holds those that arrive early until the gap before them fills,
drops duplicates, and acknowledges cumulatively — ``(epoch, seq)``: everything up
to ``seq`` of that epoch is committed here — once the shell tells it the hand-off
is committed.

- A sender that kept its state across a restart (the durable outbox) resumes its
  stream with the same epoch and numbers; one that lost it starts a new, higher
  epoch, so a number is never reused for another message. A receiver seeing a
  higher epoch starts over at its first number; frames of a lower epoch are stale.
- A message the sender gives up on (expired, dead-lettered) leaves a gap the
  receiver would otherwise wait on forever: every data frame carries the
  sender's ``floor``, the lowest number it still keeps, and the receiver moves
  past anything below it (counting the skip).
- Acks are idempotent: an ack for an unknown epoch or for a number not yet sent
  is ignored and counted; an older ack changes nothing.
- An ack names two numbers: ``received`` (everything up to it arrived: no need to
  send it again) and ``committed`` (everything up to it is handled and its dedup
  record durable: the sender may forget it). Between the two the receiver's
  application is at work; the sender keeps those messages (a receiver that
  restarts gets them again) without sending them again meanwhile.
- A durable sender numbers a message when it is published but sends it only once
  the outbox commit holding it is done (:meth:`SendStream.release`), so no number
  ever leaves that a restart could hand to another message.

Invariants (checked by the tests' state machine):
- send side: ``acked < seq < next_seq`` for every kept message, ``acked <= sent_upto
  < next_seq``, and ``floor`` is the smallest kept number (``next_seq`` when none is);
- receive side: ``delivered`` only grows within an epoch; every held number is
  above ``delivered + 1`` and at most ``delivered + max_held``.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class StreamFull(Exception):
    """The send side keeps ``max_pending`` messages already (the shell applies back-pressure)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """When to send an unacknowledged message again: ``initial * factor**(attempts - 1)``,
    at most ``maximum``, each spread by ``jitter`` (a share, up or down) so that many
    senders retrying together do not stay in step."""

    initial: float = 0.2
    factor: float = 2.0
    maximum: float = 10.0
    jitter: float = 0.2

    def delay(self, attempts: int, rng: random.Random) -> float:
        base = min(self.maximum, self.initial * self.factor ** max(0, attempts - 1))
        return base * (1.0 + self.jitter * (2.0 * rng.random() - 1.0))


class SendStream(Generic[T]):
    """The sender's half of one stream. ``T`` is whatever the shell keeps per message.

    Retransmission works like TCP's: one timer per stream, not one per message. When
    it expires with messages unacknowledged, everything unacknowledged is sent again,
    oldest first (``limit`` at a time), and the timer backs off; any ack that moves
    the stream forward resets it. So the cost of a call is bounded by ``limit``, not
    by how many messages wait (the outbox may hold tens of thousands).

    Kept messages are stored as they are (no object per message: at hundreds of
    thousands waiting, the garbage collector's walks would cost more than the rest).
    ``due`` returns ``(seq, item)`` pairs; a pair with ``seq <= highest_sent`` as it was
    before the call is a message sent again.
    """

    def __init__(self, epoch: int, *, next_seq: int = 1, acked: int = 0, max_pending: int = 10_000,
                 backoff: Backoff | None = None, rng: random.Random | None = None) -> None:
        if epoch < 1 or next_seq < 1 or not 0 <= acked < next_seq:
            raise ValueError(f"bad stream position: epoch {epoch}, next_seq {next_seq}, acked {acked}")
        self.epoch = epoch
        self.next_seq = next_seq
        self.acked = acked
        self.max_pending = max_pending
        self.backoff = backoff or Backoff()
        self.rng = rng or random.Random()
        self.pending: collections.OrderedDict[int, T] = collections.OrderedDict()
        self.counters: collections.Counter[str] = collections.Counter()
        self.sent_upto = acked
        """Every kept message up to this number was sent at least once."""
        self.received = acked
        """The receiver reported everything up to this number arrived (``acked <= received``)."""
        self.ready = next_seq - 1
        """Messages up to this number may be sent (their outbox commit is done)."""
        self.highest_sent = acked
        """The highest number ever sent (after a restart: every number kept may have been)."""
        self.timer: float | None = None
        """When to send the unacknowledged messages again (None: nothing in flight)."""
        self.timeouts = 0
        """Timer expiries in a row without progress (the backoff's exponent)."""
        self.resend_from: int | None = None
        """During a resend: the next number to send again."""

    @property
    def floor(self) -> int:
        """The lowest number still kept (``next_seq`` when nothing is): the receiver may skip below it."""
        return next(iter(self.pending)) if self.pending else self.next_seq

    def put(self, item: T, now: float, *, ready: bool = True) -> int:
        """Number ``item`` and keep it; return its sequence number. It is sent at once, or
        with ``ready=False`` once :meth:`release` says its commit is done."""
        if len(self.pending) >= self.max_pending:
            raise StreamFull(f"{len(self.pending)} messages wait for acknowledgment")
        seq = self.next_seq
        self.next_seq += 1
        self.pending[seq] = item
        if ready and self.ready == seq - 1:
            self.ready = seq
        return seq

    def release(self, upto: int) -> None:
        """Messages up to ``upto`` are committed to the outbox: they may be sent."""
        self.ready = max(self.ready, min(upto, self.next_seq - 1))

    def restore(self, kept: Iterable[tuple[int, T]], now: float) -> None:
        """After a restart: take back the messages the store kept (in any order), to send anew."""
        for seq, item in sorted(kept, key=lambda pair: pair[0]):
            if not self.acked < seq < self.next_seq:
                raise ValueError(f"kept message {seq} is outside ({self.acked}, {self.next_seq})")
            self.pending[seq] = item
        self.sent_upto, self.received, self.ready = self.acked, self.acked, self.next_seq - 1
        self.highest_sent = self.next_seq - 1  # any of them may have been sent before the restart
        self.timer, self.timeouts, self.resend_from = None, 0, None

    def due(self, now: float, limit: int, fresh: int | None = None, *,
            heard: float | None = None) -> list[tuple[int, T]]:
        """Up to ``limit`` messages ``(seq, item)`` to send now, lowest numbers first: a resend in
        progress (after the timer expired), then messages never sent, at most ``fresh`` of
        those (the sender's window: how many more may be on the way unreported).

        ``heard``: the time until which every ack that arrived has been read (default ``now``).
        The timer expires only by then: an ack may be waiting unread for anything later."""
        if self._expiring(now, heard):
            self.timeouts += 1
            if self.received >= self.sent_upto:
                # Everything arrived, yet nothing was committed for a whole timeout: the
                # receiver may have restarted and lost what it had not committed.
                self.received = self.acked
            self.resend_from = next(iter(self.pending))
            self.timer = now + self.backoff.delay(self.timeouts + 1, self.rng)
        out: list[tuple[int, T]] = []
        pending = self.pending
        if self.resend_from is not None:
            seq = max(self.resend_from, self.received + 1)
            while seq <= self.sent_upto and len(out) < limit:
                item = pending.get(seq, _MISSING)
                if item is not _MISSING:  # not given up on meanwhile
                    out.append((seq, item))  # type: ignore[arg-type]
                seq += 1
            self.counters["retransmitted"] += len(out)
            self.resend_from = seq if seq <= self.sent_upto else None
        sent_upto, ready = self.sent_upto, self.ready
        if fresh is not None:
            limit = min(limit, len(out) + max(fresh, 0))
        while len(out) < limit and sent_upto < ready:
            sent_upto += 1
            item = pending.get(sent_upto, _MISSING)
            if item is not _MISSING:
                out.append((sent_upto, item))  # type: ignore[arg-type]
        self.sent_upto = sent_upto
        if sent_upto > self.highest_sent:
            self.highest_sent = sent_upto
        if out and self.timer is None:
            self.timer = now + self.backoff.delay(1, self.rng)
        return out

    def due_fresh(self, now: float, limit: int, fresh: int | None = None, *,
                  heard: float | None = None) -> tuple[int, list[T]] | None:
        """The common case of :meth:`due`, without a pair per message: ``(first seq, items)``
        of up to ``limit`` consecutive messages never sent, when nothing is to be sent again
        and none of them was given up on. None otherwise, and then nothing changed: ask
        :meth:`due`. When it answers, the stream is left as :meth:`due` would leave it."""
        if self.resend_from is not None or self._expiring(now, heard):
            return None
        sent_upto = self.sent_upto
        count = min(limit, self.ready - sent_upto)
        if fresh is not None and fresh < count:
            count = fresh
        if count <= 0:
            return None
        first = sent_upto + 1
        items: list[Any] = list(map(self.pending.get, range(first, first + count), itertools.repeat(_MISSING, count)))
        if _MISSING in items:
            return None
        last = sent_upto + count
        self.sent_upto = last
        if last > self.highest_sent:
            self.highest_sent = last
        if self.timer is None:
            self.timer = now + self.backoff.delay(1, self.rng)
        return first, items

    def _expiring(self, now: float, heard: float | None) -> bool:
        """Whether the retransmission timer expires now: by ``heard`` (see :meth:`due`)."""
        if self.timer is None or not self.pending or self.resend_from is not None:
            return False
        return (now if heard is None or heard > now else heard) >= self.timer

    @property
    def in_flight(self) -> int:
        """Messages sent that the receiver has not reported arriving."""
        return self.sent_upto - self.received

    @property
    def waiting(self) -> bool:
        """Messages are ready that were never sent."""
        return self.sent_upto < self.ready

    def next_due(self) -> float | None:
        """When ``due`` next has something (None if nothing is kept)."""
        if not self.pending:
            return None
        if self.resend_from is not None or self.sent_upto < self.ready:
            return float("-inf")  # now
        return self.timer

    def resend_all(self, now: float) -> None:
        """The receiver is back (it rejoined or restarted): send everything kept again, now."""
        self.received = self.acked
        if self.pending:
            self.timeouts = 0
            self.resend_from = next(iter(self.pending))
            self.timer = now + self.backoff.delay(1, self.rng)

    def on_ack(self, epoch: int, seq: int, now: float, received: int | None = None) -> list[T]:
        """A cumulative ack: everything up to ``seq`` is committed at the receiver, and up to
        ``received`` (default ``seq``) arrived there. Returns the messages it releases (the
        shell deletes them from the outbox)."""
        if epoch != self.epoch:
            self.counters["acks_other_epoch"] += 1
            return []
        got = seq if received is None or received < seq else received
        if got > self.sent_upto:
            self.counters["acks_from_the_future"] += 1  # acks what was never sent
            return []
        progress = False
        if got < self.received and seq <= self.acked:
            # The receiver has less than it had: it restarted and lost what it had not
            # committed (or this ack is older than one already seen). Send from there again.
            self.counters["acks_receiver_behind"] += 1
            self.received = max(got, self.acked)
            if self.pending and self.resend_from is None:
                self.resend_from = next(iter(self.pending))
            progress = True
        elif got > self.received:
            self.received = got
            progress = True
        released: list[T] = []
        if seq > self.acked:
            released = self._release(seq)
            self.acked = seq
            self.received = max(self.received, seq)
            progress = True
        if not progress:
            self.counters["acks_repeated"] += 1
            return released
        self.timeouts = 0  # progress: the receiver is there
        if not self.pending:
            self.timer = None
        elif self.received < self.sent_upto:
            self.timer = now + self.backoff.delay(1, self.rng)
        else:  # all arrived, not all committed: check back slowly (the receiver may restart)
            self.timer = now + self.backoff.maximum
        return released

    def _release(self, seq: int) -> list[T]:
        """Forget the kept messages numbered up to ``seq`` (all above ``acked``); return them."""
        pending = self.pending
        count = seq - self.acked
        if count <= 2 * len(pending):  # by number, in C: this runs once per message acked
            kept = len(pending)
            released: list[Any] = list(map(pending.pop, range(self.acked + 1, seq + 1),
                                            itertools.repeat(_MISSING, count)))
            if kept - len(pending) < count:  # some were given up on: they left gaps
                released = [item for item in released if item is not _MISSING]
            return released
        released = []  # far more numbers than messages (most were given up on): by message
        while pending:
            first, item = pending.popitem(last=False)
            if first > seq:
                pending[first] = item
                pending.move_to_end(first, last=False)
                break
            released.append(item)
        return released

    def give_up(self, seq: int) -> T | None:
        """Stop sending message ``seq`` (it expired or was dead-lettered); the receiver skips it.
        Returns it, or None if it is not kept."""
        return self.pending.pop(seq, None)


@dataclasses.dataclass(frozen=True, slots=True)
class Received(Generic[T]):
    """What one data frame changed on a receive stream."""

    deliver: list[tuple[int, T]]
    """Messages to hand to the application now, in order."""
    duplicates: int = 0
    skipped: int = 0
    """Numbers the sender gave up on, passed over."""
    ack: bool = False
    """Whether an ack should go back (new deliveries once committed, or a duplicate's re-ack)."""


class ReceiveStream(Generic[T]):
    """The receiver's half of one stream."""

    def __init__(self, *, epoch: int = 0, delivered: int = 0, max_held: int = 1024) -> None:
        self.epoch = epoch
        self.delivered = delivered
        """The last number handed to the application (in ``epoch``)."""
        self.committed = delivered
        """The last number the shell reported committed: what acks name."""
        self.max_held = max_held
        self.held: dict[int, T] = {}
        self.counters: collections.Counter[str] = collections.Counter()

    def on_batch(self, epoch: int, floor: int, first: int, items: list[T]) -> Received[T]:
        """:meth:`on_data` for a frame's consecutive messages ``first, first + 1, ...``: the
        common case (the next numbers, in this epoch, nothing held) without a dict per message."""
        if epoch == self.epoch and first == self.delivered + 1 and not self.held and items:
            self.delivered = first + len(items) - 1
            return Received(list(enumerate(items, first)), 0, 0, True)
        return self.on_data(epoch, floor, enumerate(items, first))

    def on_data(self, epoch: int, floor: int, messages: Iterable[tuple[int, T]]) -> Received[T]:
        """Messages ``(seq, item)`` of one data frame from the sender, whose ``floor`` is the
        lowest number it still keeps."""
        if epoch < self.epoch:
            self.counters["stale_epoch_frames"] += 1
            return Received([])
        if epoch > self.epoch:
            if self.epoch:
                self.counters["new_epochs"] += 1
            self.epoch, self.delivered, self.committed = epoch, 0, 0
            self.held.clear()
        duplicates = 0
        for seq, item in messages:
            if seq <= self.delivered or seq in self.held:
                duplicates += 1
            elif seq > self.delivered + self.max_held:
                self.counters["dropped_beyond_window"] += 1  # sent again later, when there is room
            else:
                self.held[seq] = item
        self.counters["duplicates"] += duplicates
        deliver: list[tuple[int, T]] = []
        skipped = 0
        while True:
            nxt = self.delivered + 1
            item_ = self.held.pop(nxt, _MISSING)
            if item_ is not _MISSING:
                deliver.append((nxt, item_))  # type: ignore[arg-type]
                self.delivered = nxt
            elif nxt < floor:
                skipped += 1  # the sender gave up on it: do not wait
                self.delivered = nxt
            else:
                break
        self.counters["skipped"] += skipped
        return Received(deliver, duplicates, skipped, bool(deliver or skipped or duplicates))

    def commit(self, upto: int) -> None:
        """The shell committed the hand-off of everything up to ``upto``: acks may name it."""
        if upto > self.delivered:
            raise ValueError(f"cannot commit {upto}: only {self.delivered} were delivered")
        self.committed = max(self.committed, upto)

    @property
    def ack(self) -> tuple[int, int]:
        """The ack to send: ``(epoch, last committed number)``."""
        return self.epoch, self.committed


_MISSING = object()
