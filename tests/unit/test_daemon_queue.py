"""The daemon's work queue with the fake clock: merge, backoff, cap, resync."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.daemon import Backoff, FakeClock, WorkQueue


def make(resync_s: float = 600.0, base: float = 1.0, cap: float = 60.0) -> tuple[WorkQueue[str], FakeClock]:
    clock = FakeClock()
    return WorkQueue(clock, backoff=Backoff(base, cap), resync_s=resync_s), clock


def test_duplicates_merge_into_one_entry():
    q, _ = make()
    for _ in range(5):
        q.add("a")
    q.add("b")
    assert len(q) == 2
    assert sorted(q.pop_due()) == ["a", "b"]
    assert len(q) == 0 and q.pop_due() == []


def test_a_delayed_mark_is_due_only_after_its_delay_and_the_earlier_time_wins():
    q, clock = make()
    q.add("a", after=5)
    assert q.pop_due() == []
    assert q.due_in() == 5
    q.add("a", after=2)  # merged: the earlier time wins
    clock.advance(2)
    assert q.pop_due() == ["a"]


def test_backoff_doubles_up_to_the_cap():
    q, clock = make(base=1.0, cap=10.0)
    delays = []
    for _ in range(7):
        delays.append(q.failed("a"))
        assert q.pop_due() == []  # not due before its delay
        assert q.retry_at("a") == clock.now() + delays[-1]
        clock.advance(delays[-1])
        assert q.pop_due() == ["a"]
    assert delays == [1, 2, 4, 8, 10, 10, 10]
    assert q.failures("a") == 7


def test_events_do_not_shorten_a_backoff_but_an_edit_does():
    q, clock = make(base=8.0, cap=100.0)
    q.failed("a")
    q.add("a")  # a host event about the broken resource: no hot loop
    assert q.pop_due() == []
    assert q.retry_at("a") == clock.now() + 8
    q.reset("a")  # its manifest changed: retried now, failures forgotten
    assert q.failures("a") == 0
    assert q.pop_due() == ["a"]
    assert q.failed("a") == 8.0  # counting starts again


def test_success_forgets_failures_and_one_failing_key_does_not_hold_others():
    q, clock = make(base=1.0, cap=60.0)
    for _ in range(3):
        q.failed("broken")
        clock.advance(q.backoff.delay(q.failures("broken")))
        q.pop_due()
    q.failed("broken")
    q.add("fine")
    assert q.pop_due() == ["fine"]  # due now, while "broken" waits 8 s
    q.succeeded("broken")
    assert q.failures("broken") == 0 and q.retry_at("broken") is None


def test_pop_due_returns_in_due_order():
    q, clock = make()
    q.add("late", after=3)
    q.add("early", after=1)
    q.add("now")
    clock.advance(5)
    assert q.pop_due() == ["now", "early", "late"]


def test_resync_is_due_on_its_interval_and_rescheduled():
    q, clock = make(resync_s=600)
    assert not q.resync_due()
    assert q.due_in() == 600  # nothing queued: the next thing is the resync
    clock.advance(599.5)
    assert not q.resync_due()
    clock.advance(0.5)
    assert q.resync_due()
    q.resynced()
    assert not q.resync_due() and q.due_in() == 600


def test_forget_drops_the_entry_and_its_failures():
    q, _ = make()
    q.failed("gone")
    q.forget("gone")
    assert "gone" not in q and q.failures("gone") == 0


def test_bad_resync_interval_is_refused():
    with pytest.raises(ValueError):
        WorkQueue(FakeClock(), resync_s=0)


@given(st.integers(min_value=0, max_value=10_000), st.floats(min_value=0.01, max_value=100),
       st.floats(min_value=0.01, max_value=10_000))
def test_backoff_is_monotonic_and_capped(n, base, cap):
    b = Backoff(base, cap)
    assert 0 <= b.delay(n) <= cap
    assert b.delay(n) <= b.delay(n + 1)


def test_fake_clock_wait_advances_unless_woken():
    clock = FakeClock(0)
    wake = threading.Event()
    assert clock.wait(wake, 5) is False and clock.now() == 5
    wake.set()
    assert clock.wait(wake, 5) is True and clock.now() == 5
