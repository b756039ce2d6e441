"""The watchdog names what stalled and lets its owner answer clients first."""

import time

from ppwrap import Watchdog


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
