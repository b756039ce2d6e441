"""Pacing: a waiting rank sleeps through most of the wait the last steps showed."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from ppwrap import _pace
from ppwrap._pace import Pace, ranks_on_this_host, should_pace


class Clock:
    """A fake perf_counter that sleeping moves on."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(_pace.time, "perf_counter", c.perf_counter)
    monkeypatch.setattr(_pace.time, "sleep", c.sleep)
    return c


def wait(pace: Pace, clock: Clock, seconds: float) -> None:
    """One step whose token arrives ``seconds`` after the stage work went out."""
    pace.issued()
    start = clock.now
    pace.sleep()
    clock.now = max(clock.now, start + seconds)  # the token is there, or was already
    pace.arrived()


def test_pace_spins_until_two_waits_were_seen_then_sleeps_half_the_shortest(clock):
    pace = Pace()
    wait(pace, clock, 0.040)
    wait(pace, clock, 0.030)
    assert clock.sleeps == []
    wait(pace, clock, 0.050)
    assert clock.sleeps == [0.015]  # half of the shortest wait, 30 ms
    assert pace.slept == pytest.approx(0.015)


def test_pace_sleeps_less_once_the_final_rank_gets_faster(clock):
    pace = Pace()
    for _ in range(4):
        wait(pace, clock, 0.040)
    clock.sleeps.clear()
    for _ in range(6):
        wait(pace, clock, 0.004)  # now 4 ms: every sleep is an oversleep until it shrinks
    assert clock.sleeps == sorted(clock.sleeps, reverse=True)
    assert clock.sleeps[0] == 0.02 and clock.sleeps[-1] < 0.004


def test_pace_never_sleeps_below_a_millisecond(clock):
    pace = Pace()
    for _ in range(5):
        wait(pace, clock, 0.0015)
    assert clock.sleeps == []


def hostfile(tmp_path: Path, hosts: list[str]) -> dict[str, str]:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([[h] for h in hosts]))
    return {"MLX_HOSTFILE": str(path), "MLX_RANK": "1"}


def test_ranks_on_this_host_counts_the_ranks_that_share_its_address(tmp_path):
    local = hostfile(tmp_path, ["127.0.0.1:5000", "127.0.0.1:5001", "127.0.0.1:5002"])
    assert ranks_on_this_host(local) == 3
    spread = hostfile(tmp_path, ["10.0.0.1:5000", "10.0.0.2:5000", "10.0.0.1:5001"])
    assert ranks_on_this_host(spread) == 1


def test_ranks_on_this_host_is_unknown_without_a_readable_ring_host_file(tmp_path):
    assert ranks_on_this_host({}) is None
    assert ranks_on_this_host({"MLX_HOSTFILE": str(tmp_path / "none"), "MLX_RANK": "0"}) is None
    (tmp_path / "bad.json").write_text("{not json")
    assert ranks_on_this_host({"MLX_HOSTFILE": str(tmp_path / "bad.json"), "MLX_RANK": "0"}) is None


@pytest.mark.parametrize(
    "ranks_here,cores,expected", [(3, 2, True), (2, 2, False), (None, 1, False)]
)
def test_auto_paces_only_when_this_host_runs_more_ranks_than_it_has_cores(
    monkeypatch, ranks_here, cores, expected
):
    monkeypatch.setattr(_pace, "ranks_on_this_host", lambda: ranks_here)
    monkeypatch.setattr(_pace.os, "cpu_count", lambda: cores)
    assert should_pace("auto", size=3) is expected


def test_spin_and_sleep_force_pacing_off_and_on_and_one_rank_never_paces():
    assert should_pace("sleep", size=2) is True
    assert should_pace("spin", size=3) is False
    assert should_pace("sleep", size=1) is False
    with pytest.raises(ValueError, match="wait must be one of"):
        should_pace("nap", size=2)


def test_pace_predicts_a_chunk_wait_from_the_wait_per_token(clock):
    pace = Pace()
    for tokens in (10, 20):
        pace.issued()
        clock.now += 0.002 * tokens  # the previous stage takes 2 ms per prompt token
        pace.arrived(tokens)
    pace.issued()
    pace.sleep(50)
    assert clock.sleeps == [0.05]  # half of 50 tokens at 2 ms


def arrive(arrivals: _pace.Arrivals, clock: Clock, due: float) -> float:
    """One step whose message comes at ``due``; returns when the loop woke."""
    arrivals.sleep()
    woke = clock.now
    clock.now = max(clock.now, due)  # the message is there, or was already
    arrivals.arrived()
    return woke


def test_arrivals_wake_a_margin_before_the_next_message_after_two_periods(clock):
    arrivals = _pace.Arrivals()
    start = clock.now
    # Messages every 4 ms: no sleep until two periods were seen.
    for k in range(3):
        arrive(arrivals, clock, start + 0.004 * k)
    assert clock.sleeps == []
    woke = arrive(arrivals, clock, start + 0.012)
    # Due at +12 ms; awake 15% of the period (0.6 ms) before it.
    assert woke == pytest.approx(start + 0.012 - 0.0006)
    assert clock.now == pytest.approx(start + 0.012)


def test_arrivals_keep_a_floor_margin_and_never_sleep_a_short_wait(clock):
    arrivals = _pace.Arrivals()
    start = clock.now
    for k in range(3):
        arrive(arrivals, clock, start + 0.0015 * k)
    # A 1.5 ms period: the margin is its floor, 0.3 ms, so the loop sleeps 1.2 ms.
    assert arrive(arrivals, clock, start + 0.0045) == pytest.approx(start + 0.0042)
    fast = _pace.Arrivals()
    t = clock.now
    for k in range(4):
        arrive(fast, clock, t + 0.0006 * k)
    assert clock.sleeps == [pytest.approx(0.0012)]  # 0.6 ms periods: no sleep


def test_arrivals_follow_a_faster_pipeline_at_once_and_ignore_one_slow_step(clock):
    arrivals = _pace.Arrivals()
    t = clock.now
    for due in (0.004, 0.008, 0.020, 0.024):  # one 12 ms step (a slow reader)
        arrive(arrivals, clock, t + due)
    # The shortest recent period, 4 ms, still predicts the next message.
    assert arrive(arrivals, clock, t + 0.028) == pytest.approx(t + 0.028 - 0.0006)


class FakeInbox:
    """An inbox whose message comes at ``due`` (``None``: never on its sockets)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.due: float | None = None
        self.timeouts: list[float] = []
        self.found = 0  # waits that ended with the message

    def wait(self, timeout: float) -> bool:
        self.timeouts.append(round(timeout, 6))
        if self.due is not None and self.due <= self.clock.now + timeout:
            self.clock.now = max(self.clock.now, self.due)
            self.found += 1
            return True
        self.clock.now += timeout
        return False


def test_arrivals_with_an_inbox_sleep_until_nearly_due_then_wake_as_each_message_comes(clock):
    inbox = FakeInbox(clock)
    arrivals = _pace.Arrivals(inbox=inbox)  # type: ignore[arg-type]
    start = clock.now
    woke = []
    for k in range(1, 6):
        inbox.due = start + 0.004 * k
        woke.append(arrive(arrivals, clock, inbox.due) - start)
    assert woke == pytest.approx([0.004, 0.008, 0.012, 0.016, 0.020])  # as each message comes
    # Once two periods are known, a sleep to 15% of the period before the next.
    assert clock.sleeps == [pytest.approx(0.0034)] * 2 and inbox.found == 5
    # Each poll gives up after a second (then MLX waits, and the watchdog judges).
    assert inbox.timeouts == [1.0] * 5


def test_arrivals_stop_polling_sockets_that_never_see_the_message(clock):
    inbox = FakeInbox(clock)
    arrivals = _pace.Arrivals(inbox=inbox)  # type: ignore[arg-type]
    for _ in range(3):
        inbox.due = clock.now + 0.004
        arrive(arrivals, clock, inbox.due)
    # A message late past the poll's limit (a slow peer) keeps the inbox.
    inbox.due = None
    arrive(arrivals, clock, clock.now + 1.5)
    assert arrivals.inbox is inbox
    # Messages that MLX has at once after every poll came up empty: twice, and
    # the loop goes back to sleeping until they are due.
    for _ in range(2):
        arrive(arrivals, clock, clock.now)
    assert arrivals.inbox is None
    polls = len(inbox.timeouts)
    arrive(arrivals, clock, clock.now + 0.004)
    assert len(inbox.timeouts) == polls


def test_poll_waits_for_each_message_and_gives_up_sockets_that_never_see_one(clock):
    # What a paced prefill does before each chunk's receive (and Arrivals per token).
    inbox = FakeInbox(clock)
    poll = _pace.Poll(inbox)  # type: ignore[arg-type]
    inbox.due = clock.now + 0.25  # a chunk the previous stage sends in 250 ms
    start = clock.now
    poll.wait()
    assert clock.now == pytest.approx(start + 0.25) and inbox.found == 1
    poll.done()
    # Blind sockets: each poll gives up after a second and MLX has the message
    # at once; the second time, the polls stop (no more seconds lost).
    inbox.due = None
    for _ in range(2):
        poll.wait()
        poll.done()
    assert poll.inbox is None and inbox.timeouts == [1.0, 1.0, 1.0]
    poll.wait()
    assert len(inbox.timeouts) == 3
    # Without an inbox (another backend) it never waits.
    idle = _pace.Poll(None)
    before = clock.now
    idle.wait()
    idle.done()
    assert clock.now == before


def ring_address(server: socket.socket) -> str:
    host, port = server.getsockname()[:2]
    return f"{host}:{port}"


@pytest.mark.parametrize("connections", [1, 2])
def test_inbox_finds_the_ring_connections_of_the_host_file_and_wakes_on_a_message(
    tmp_path, connections
):
    # Rank 0 of 2: the ring backend accepts the previous rank on this rank's
    # addresses and connects to the next rank's, one connection per address
    # (a host file may list several); other sockets are not the ring's.
    here = [socket.create_server(("127.0.0.1", 0)) for _ in range(connections)]
    there = [socket.create_server(("127.0.0.1", 0)) for _ in range(connections)]
    elsewhere = socket.create_server(("127.0.0.1", 0))
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([[ring_address(s) for s in here], [ring_address(s) for s in there]]))
    env = {"MLX_HOSTFILE": str(path), "MLX_RANK": "0"}
    from_prev = [socket.create_connection(s.getsockname()[:2]) for s in here]
    accepted = [s.accept()[0] for s in here]
    to_next = [socket.create_connection(s.getsockname()[:2]) for s in there]
    unrelated = socket.create_connection(elsewhere.getsockname()[:2])
    others = [s.accept()[0] for s in [*there, elsewhere]]
    try:
        inbox = _pace.Inbox.find(env)
        assert inbox is not None
        assert set(inbox.fds) == {s.fileno() for s in [*accepted, *to_next]}
        assert inbox.wait(0.01) is False
        from_prev[-1].sendall(b"hidden state")
        assert inbox.wait(5.0) is True
        accepted[-1].recv(64)  # what MLX's receive does
        assert inbox.wait(0.01) is False
    finally:
        for s in [*here, *there, elsewhere, *from_prev, *accepted, *to_next, unrelated, *others]:
            s.close()


def test_inbox_is_none_without_a_host_file_or_a_match(tmp_path):
    assert _pace.Inbox.find({}) is None
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([["127.0.0.1:9"], ["127.0.0.1:11"]]))
    assert _pace.Inbox.find({"MLX_HOSTFILE": str(path), "MLX_RANK": "1"}) is None
    path.write_text("not json")
    assert _pace.Inbox.find({"MLX_HOSTFILE": str(path), "MLX_RANK": "1"}) is None
    with pytest.raises(ValueError, match="at least one socket"):
        _pace.Inbox([])


def test_host_file_addresses_are_resolved_once_and_failed_lookups_again(monkeypatch):
    calls: list[str] = []
    real = socket.getaddrinfo

    def counting(host, *args, **kwargs):
        calls.append(host)
        if host == "nowhere.invalid":
            raise socket.gaierror("no such host")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(_pace, "_resolved", {})
    monkeypatch.setattr(socket, "getaddrinfo", counting)
    good = ("127.0.0.1:5001", "localhost:5002")
    assert ("127.0.0.1", 5001) in _pace._endpoints(good)
    assert _pace._endpoints(good) == _pace._endpoints(good)
    assert calls == ["127.0.0.1", "localhost"]  # looked up once, then kept
    calls.clear()
    bad = ("nowhere.invalid:5003", "127.0.0.1:5004")
    assert _pace._endpoints(bad) == {("127.0.0.1", 5004)}
    assert _pace._endpoints(bad) == {("127.0.0.1", 5004)}
    assert calls.count("nowhere.invalid") == 2  # not kept: tried again


def test_wake_is_chosen_by_wake_and_by_auto_on_mlx_cuda_only():
    assert _pace.should_wake("wake", size=2)
    assert not _pace.should_wake("wake", size=1)
    assert not _pace.should_wake("spin", size=2)
    assert not _pace.should_wake("sleep", size=2)
    assert not _pace.should_pace("wake", size=2)
    import mlx.core as mx

    cuda = mx.default_device() == mx.gpu and mx.cuda.is_available()
    assert _pace.should_wake("auto", size=2) == cuda
