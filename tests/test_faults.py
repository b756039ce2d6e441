"""Fail loudly, never hang: disagreeing ranks, a suspended rank, a rank out of step."""

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from ppwrap._launch import run_local
from ppwrap._watchdog import STALL_EXIT_CODE

from families import write_model_folder
from launcher import RANKS_DIR, describe


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-models")
    return (
        write_model_folder("llama", root / "llama"),
        write_model_folder("llama", root / "llama-6", num_hidden_layers=6),
        write_model_folder("llama", root / "llama-2", num_hidden_layers=2),
    )


def run_scenario(scenario, *folders, n=2, timeout=90, on_start=None, out_dir=None, grace=0.0):
    out = out_dir or tempfile.mkdtemp(prefix="ppwrap-fault-")
    argv = [str(RANKS_DIR / "faults.py"), out, scenario, *map(str, folders)]
    return run_local(n, argv, timeout=timeout, capture=True, on_start=on_start, grace=grace)


# Where every rank must fail on its own, the first to fail does not end the
# others before they say why (a loaded machine starts ranks seconds apart).
ALL_FAIL = 30.0


def test_ranks_loading_different_checkpoints_both_raise_naming_the_fields(folders):
    run = run_scenario("mismatch", *folders, grace=ALL_FAIL)
    assert not run.timed_out and run.returncode != 0, describe(run)
    for rank in (0, 1):
        err = run.stderr[rank]
        assert "HandshakeError" in err and "disagree on" in err, describe(run)
        assert "layers" in err and "rank 0:" in err and "rank 1:" in err


def test_a_stage_dtype_mismatch_fails_on_every_rank_naming_ranks_shapes_and_dtypes(folders):
    start = time.monotonic()
    run = run_scenario("dtype", folders[0], grace=ALL_FAIL)
    assert not run.timed_out and run.returncode != 0, describe(run)
    assert time.monotonic() - start < 60  # within the handshake timeout (20 s) and start-up
    for rank in (0, 1):
        err = run.stderr[rank]
        assert "StageMismatchError" in err, describe(run)
        assert "rank 1 sends its hidden state as float32 (batch, length, 32)" in err
        assert "rank 0 takes (batch, length, 32) in float16" in err


def test_nan_logits_fail_every_rank_on_the_first_step_with_the_likely_causes(folders, tmp_path):
    import shutil

    import mlx.core as mx

    broken = tmp_path / "nan"
    shutil.copytree(folders[0], broken)
    weights = dict(mx.load(str(broken / "model.safetensors")))
    weights["model.norm.weight"] = mx.full(weights["model.norm.weight"].shape, float("nan"))
    mx.save_safetensors(str(broken / "model.safetensors"), weights, metadata={"format": "mlx"})
    run = run_scenario("nan", broken, timeout=60, grace=ALL_FAIL)
    assert not run.timed_out and run.returncode != 0, describe(run)
    for rank in (0, 1):
        err = run.stderr[rank]
        assert "NonFiniteLogitsError" in err and "logits for the first generated token" in err
        assert "float16 checkpoint whose activations overflow" in err


def test_rank_out_of_step_makes_its_peer_exit_with_the_stalled_step_within_the_timeout(folders):
    start = time.monotonic()
    run = run_scenario("skip", folders[0])
    elapsed = time.monotonic() - start
    assert not run.timed_out, describe(run)
    assert run.returncodes[0] == STALL_EXIT_CODE, describe(run)
    assert "ppwrap: rank 0 stalled: decode step 3" in run.stderr[0]
    assert elapsed < 30


def signal_rank_1_mid_decode(out, sig, stopped):
    """An on_start hook: once decoding has begun, send ``sig`` to rank 1."""

    def hook(pids):
        def wait_then_signal():
            deadline = time.monotonic() + 60
            while not (out / "started").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(pids[1], sig)
            stopped["at"] = time.monotonic()

        threading.Thread(target=wait_then_signal, daemon=True).start()

    return hook


def signal_rank_1_during_a_long_decode(folders, sig, scenario="stall"):
    """Run a stall scenario, send ``sig`` to rank 1 mid-decode; return the run and
    the seconds from the signal to the end of the run."""
    out = Path(tempfile.mkdtemp(prefix="ppwrap-signal-"))
    stopped = {}
    hook = signal_rank_1_mid_decode(out, sig, stopped)
    run = run_scenario(scenario, folders[0], on_start=hook, out_dir=str(out), timeout=120)
    ended = time.monotonic()
    assert "at" in stopped, describe(run)
    return run, ended - stopped["at"]


@pytest.mark.parametrize("scenario", ["stall", "stall-wake"])
def test_suspended_rank_mid_decode_ends_the_run_non_zero_within_30_seconds(folders, scenario):
    # "stall-wake": the ranks sleep until just before each message is due
    # (wait="wake", what "auto" does on MLX CUDA) when rank 1 is suspended.
    run, after_signal = signal_rank_1_during_a_long_decode(folders, signal.SIGSTOP, scenario)
    assert after_signal < 30
    assert not run.timed_out and run.returncode != 0, describe(run)
    assert run.returncodes[0] == STALL_EXIT_CODE, describe(run)
    assert "ppwrap: rank 0 stalled: decode step" in run.stderr[0]


@pytest.mark.parametrize(
    "scenario,message",
    [
        ("empty", "prompt must be a non-empty 1-D array of token ids"),
        ("vocab", "outside the model's vocabulary"),
        ("split", "every rank needs a whole, positive number of layers"),
        ("floats", "inputs must hold integer token ids"),
    ],
)
def test_bad_prompt_fails_on_every_rank_with_the_reason_and_nothing_hangs(
    folders, scenario, message
):
    run = run_scenario(scenario, folders[0], timeout=60, grace=ALL_FAIL)
    assert not run.timed_out and run.returncode != 0, describe(run)
    for rank in (0, 1):
        assert message in run.stderr[rank], describe(run)


def test_truncated_checkpoint_fails_on_every_rank_naming_the_file(folders, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folders[0], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    run = run_scenario("load", broken, timeout=60)
    assert not run.timed_out and run.returncode != 0, describe(run)
    assert any("incomplete download or corrupt file" in err for err in run.stderr), describe(run)


def test_killed_rank_mid_decode_ends_the_run_non_zero_within_30_seconds_naming_it(folders):
    run, after_signal = signal_rank_1_during_a_long_decode(folders, signal.SIGKILL)
    assert not run.timed_out and after_signal < 30, describe(run)
    assert run.returncodes[1] == -signal.SIGKILL
    # Rank 0 either notices the closed socket or stalls; it never hangs.
    assert run.returncodes[0] != 0


def test_more_ranks_than_layers_fails_on_every_rank_naming_both(folders):
    run = run_scenario("load", folders[2], n=3, timeout=60, grace=ALL_FAIL)
    assert not run.timed_out and run.returncode != 0, describe(run)
    for rank in range(3):
        assert "cannot split 2 layers over 3 ranks" in run.stderr[rank], describe(run)


def test_checkpoint_missing_a_local_layer_fails_on_every_rank_naming_it(folders, tmp_path):
    import json
    import shutil

    import mlx.core as mx

    broken = tmp_path / "missing"
    shutil.copytree(folders[0], broken)
    weights = mx.load(str(broken / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if not k.startswith("model.layers.0.")}
    mx.save_safetensors(str(broken / "model.safetensors"), kept)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in kept}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    run = run_scenario("load", broken, timeout=60)
    assert not run.timed_out and run.returncode != 0, describe(run)
    assert any("layers.0" in err for err in run.stderr), describe(run)


def test_rank_that_never_arrives_is_named_by_the_handshake_within_its_timeout(folders):
    start = time.monotonic()
    run = run_scenario("absent", folders[0], timeout=90)
    assert not run.timed_out and time.monotonic() - start < 30, describe(run)
    assert run.returncodes[0] == STALL_EXIT_CODE, describe(run)
    assert "the handshake (waiting for rank 1 to arrive)" in run.stderr[0]
