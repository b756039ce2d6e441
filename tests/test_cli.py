"""The command line: generate over local ranks, the demo, and the version."""

import subprocess
import sys

from families import write_model_folder


def run(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "ppwrap", *args], capture_output=True, text=True, timeout=timeout
    )


def test_version_prints_the_package_version():
    import ppwrap

    done = run("--version", timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"ppwrap {ppwrap.__version__}"


def test_generate_on_two_local_ranks_prints_text_speeds_and_every_ranks_memory(tmp_path):
    model = write_model_folder("llama", tmp_path / "llama")
    done = run(
        "generate",
        "--model",
        str(model),
        "--prompt",
        "The quick",
        "--max-tokens",
        "8",
        "--ranks",
        "2",
        "--timeout",
        "200",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "Generation: 8 tokens" in out
    assert "Rank 0 parameters:" in out and "Rank 1 parameters:" in out
    assert out.count("Prompt:") == 1  # only the final rank reports


def test_generate_with_a_missing_model_folder_fails_with_a_clear_message(tmp_path):
    done = run("generate", "--model", str(tmp_path / "nope"), "--ranks", "2", "--timeout", "120")
    assert done.returncode != 0
    assert "is not a local checkpoint folder" in done.stderr


def test_demo_answers_with_the_real_model_on_two_ranks_and_rank_1_skips_the_head():
    done = run("demo", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "Paris" in out
    assert "Rank 0 parameters:" in out
    assert "Rank 1 parameters:" in out and "skipped the output head:" in out
    # SmolLM2's head: 2 x hidden 576 x vocabulary 49152 (not the quantized
    # embedding's packed width).
    assert "and 56.6 MFLOP per token" in out


def test_demo_with_random_weights_says_its_text_is_meaningless():
    done = run("demo", "--random", "--max-tokens", "4", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(random weights: the text below is meaningless)" in done.stdout


def test_convert_gguf_of_a_non_gguf_file_fails_with_a_clear_message(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    done = run("convert-gguf", str(bad), str(tmp_path / "out"), timeout=120)
    assert done.returncode == 2
    assert "ppwrap convert-gguf:" in done.stderr and not (tmp_path / "out").exists()
