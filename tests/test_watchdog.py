"""The watchdog names what stalled, lets its owner answer clients first, and
tells a slow rank from a dead, suspended or out-of-step one by its peers' heartbeats."""

import json
import socket
import time

from ppwrap import Watchdog
from ppwrap._liveness import Activity, Liveness, PeerState, addresses
from ppwrap._watchdog import judge


def test_a_stall_calls_on_stall_with_the_message_naming_the_operation():
    said = []
    dog = Watchdog(0.2, rank=3, exit=False, on_stall=said.append)
    with dog.watch("decode step 7"):
        time.sleep(0.8)
    assert dog.stalled == "decode step 7"
    assert len(said) == 1 and "rank 3 stalled: decode step 7" in said[0]


def test_a_failing_stall_handler_still_reports_the_stall(capsys):
    def broken(message):
        raise RuntimeError("no clients to answer")

    dog = Watchdog(0.2, exit=False, on_stall=broken)
    with dog.watch("prefill"):
        time.sleep(0.8)
    assert dog.stalled == "prefill"
    err = capsys.readouterr().err
    assert "stalled: prefill" in err and "the stall handler failed" in err


# --- telling slow from stuck: the heartbeats' verdicts ------------------------

NOW = 1000.0


def peer(rank, *, heard_ago=0.2, what="decode step 3", busy=False, generation=2):
    return PeerState(rank, 4242, what, 1.0, busy, generation, NOW - heard_ago)


def test_an_operation_within_its_timeout_is_fine_when_every_peer_is_heard():
    assert (
        judge("decode step 3", 1.0, timeout=5, generation=2, peers={1: peer(1)}, size=2, now=NOW)
        is None
    )


def test_a_silent_peer_is_dead_or_suspended_before_the_timeout():
    v = judge(
        "decode step 3",
        1.0,
        timeout=20,
        generation=2,
        peers={1: peer(1, heard_ago=11)},
        size=2,
        now=NOW,
    )
    assert v is not None and v.stalled and not v.slow
    assert "rank 1 has sent no heartbeat for 11 s: it is dead or suspended" in v.message


def test_a_silent_peer_counts_as_dead_after_the_timeout_when_it_is_short():
    v = judge("x", 0.1, timeout=3, generation=2, peers={1: peer(1, heard_ago=3.5)}, size=2, now=NOW)
    assert v is not None and v.stalled


def test_a_peer_computing_a_long_prefill_is_slow_not_stuck():
    busy = peer(1, what="prefill of prompt tokens 0-2048", busy=True)
    v = judge(
        "waiting for the previous stage",
        60,
        timeout=5,
        generation=2,
        peers={1: busy},
        size=2,
        now=NOW,
    )
    assert v is not None and not v.stalled and v.slow
    assert v.message == "busy: rank 1 is computing prefill of prompt tokens 0-2048 (60 s so far)"


def test_this_rank_computing_is_slow_not_stuck():
    v = judge(
        "prefill of prompt tokens 0-2048",
        60,
        timeout=5,
        busy=True,
        generation=2,
        peers={1: peer(1)},
        size=2,
        now=NOW,
    )
    assert v is not None and v.slow and not v.stalled


def test_every_rank_waiting_past_the_timeout_is_out_of_step():
    v = judge(
        "decode step 3", 6, timeout=5, generation=2, peers={1: peer(1), 2: peer(2)}, size=3, now=NOW
    )
    assert v is not None and v.stalled
    assert "none computes" in v.message and "rank 2 (pid 4242) was in 'decode step 3'" in v.message


def test_a_peer_in_another_generation_is_out_of_step_even_while_computing():
    other = peer(1, busy=True, generation=3)
    v = judge(
        "waiting for the previous stage",
        6,
        timeout=5,
        generation=2,
        peers={1: other},
        size=2,
        now=NOW,
    )
    assert v is not None and v.stalled
    assert "rank 1 is out of step: it is at generation 3, this rank at 2" in v.message


def test_without_every_peer_heard_the_timeout_alone_decides():
    v = judge(
        "decode step 3", 6, timeout=5, generation=2, peers={1: peer(1, busy=True)}, size=3, now=NOW
    )
    assert v is not None and v.stalled and "made no progress for 5 s" in v.message
    v = judge("decode step 3", 6, timeout=5, size=2, now=NOW)
    assert v is not None and v.stalled


def _free_udp_ports(n):
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_ranks_hear_what_the_other_is_doing():
    ports = _free_udp_ports(2)
    addrs = [("127.0.0.1", p) for p in ports]
    acts = [Activity(), Activity()]
    lives = [Liveness(r, addrs, activity=acts[r], interval=0.05) for r in range(2)]
    try:
        acts[1].begin_generation()
        with acts[1].doing("prefill of prompt tokens 0-64", busy=True):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                heard = lives[0].peers().get(1)
                if heard is not None and heard.busy:
                    break
                time.sleep(0.02)
        assert heard is not None and heard.rank == 1
        assert (heard.what, heard.busy, heard.generation) == (
            "prefill of prompt tokens 0-64",
            True,
            1,
        )
        assert lives[1].peers()[0].what is None  # rank 0 is between operations
    finally:
        for live in lives:
            live.close()


def test_heartbeat_addresses_come_from_the_override_or_mlx_ring_hostfile(tmp_path):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["10.0.0.1:5000"], ["10.0.0.2:5001"]]))
    assert addresses({"MLX_HOSTFILE": str(hosts)}) == [("10.0.0.1", 5000), ("10.0.0.2", 5001)]
    both = {"MLX_HOSTFILE": str(hosts), "PPWRAP_LIVENESS": "127.0.0.1:7000,127.0.0.1:7001"}
    assert addresses(both) == [("127.0.0.1", 7000), ("127.0.0.1", 7001)]
    assert addresses({}) is None
    hosts.write_text(json.dumps({"not": "a ring host file"}))
    assert addresses({"MLX_HOSTFILE": str(hosts)}) is None


def test_a_watchdog_without_peers_still_ends_a_stalled_operation():
    dog = Watchdog(0.3, exit=False)
    with dog.watch("decode step 1"):
        time.sleep(1.0)
    assert dog.stalled == "decode step 1"
