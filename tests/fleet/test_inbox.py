"""The bridge's hand-off from paho's thread to the database thread (fleet.bridge.inbox)."""

import threading
import time

import pytest

from fleet.bridge.inbox import Inbox


def test_take_returns_everything_queued_in_order():
    inbox: Inbox[int] = Inbox(10)
    stopping = threading.Event()
    for n in range(5):
        inbox.put(n, stopping)
    assert inbox.qsize() == 5
    assert inbox.take(timeout=1) == [0, 1, 2, 3, 4]
    assert inbox.empty()


def test_an_empty_take_waits_its_timeout_and_wakes_at_once_for_a_put():
    inbox: Inbox[str] = Inbox(10)
    started = time.monotonic()
    assert inbox.take(timeout=0.2) == []
    assert time.monotonic() - started >= 0.19

    threading.Timer(0.1, inbox.put, args=("late", threading.Event())).start()
    started = time.monotonic()
    assert inbox.take(timeout=5) == ["late"]
    assert time.monotonic() - started < 2


def test_a_full_inbox_holds_the_putter_until_a_take_makes_room():
    inbox: Inbox[int] = Inbox(2)
    stopping = threading.Event()
    inbox.put(1, stopping)
    inbox.put(2, stopping)
    done = threading.Event()
    waits: list[int] = []
    putter = threading.Thread(target=lambda: (waits.append(inbox.put(3, stopping, poll=0.05)), done.set()))
    putter.start()
    assert not done.wait(0.3), "put returned although the inbox was full"
    assert inbox.take(timeout=1) == [1, 2]
    assert done.wait(5)
    putter.join()
    assert waits[0] >= 1
    assert inbox.take(timeout=1) == [3]


def test_stopping_lets_a_blocked_putter_through_without_losing_its_item():
    inbox: Inbox[int] = Inbox(1)
    stopping = threading.Event()
    inbox.put(1, stopping)
    putter = threading.Thread(target=inbox.put, args=(2, stopping), kwargs={"poll": 0.05})
    putter.start()
    stopping.set()
    putter.join(timeout=5)
    assert not putter.is_alive()
    assert inbox.take(timeout=1) == [1, 2]


def test_one_putter_and_one_taker_at_full_speed_lose_and_repeat_nothing():
    inbox: Inbox[int] = Inbox(1000)
    stopping = threading.Event()
    total = 200_000
    taken: list[int] = []

    def take() -> None:
        while len(taken) < total:
            taken.extend(inbox.take(timeout=0.5))

    taker = threading.Thread(target=take)
    taker.start()
    for n in range(total):
        inbox.put(n, stopping)
    taker.join(timeout=60)
    assert taken == list(range(total))


def test_an_inbox_holds_at_least_one_message():
    with pytest.raises(ValueError):
        Inbox(0)
