"""``ppwrap serve`` on 2 local ranks, driven by the official ``openai`` client.

The main server runs the real SmolLM2-135M-Instruct; every answer at
temperature 0 must be single-process mlx-lm's, to the character.
"""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from mlx_lm import generate as mlx_generate
from mlx_lm import load as mlx_load

from families import write_model_folder
from launcher import serving

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Name three primary colors.",
    "What is 2 + 2?",
    "Write one word that rhymes with cat.",
]
COMPLETION = "The quick brown"
TOKENS = 20
SHORT = 8  # per client, when 8 clients share the pipeline


@pytest.fixture(scope="module")
def reference(smollm2):
    """Single-process mlx-lm's greedy answers: chat per question, and the completion."""
    model, tok = mlx_load(str(smollm2))

    def chat(question, max_tokens=TOKENS):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True
        )
        return mlx_generate(model, tok, prompt, max_tokens=max_tokens)

    answers = {q: chat(q) for q in QUESTIONS}
    answers.update({(q, SHORT): chat(q, SHORT) for q in QUESTIONS})
    answers[COMPLETION] = mlx_generate(model, tok, COMPLETION, max_tokens=TOKENS)
    return answers


@pytest.fixture(scope="module")
def server(smollm2):
    # A generous watchdog: a loaded CI machine can take seconds per prefill here.
    with serving(smollm2, 2, "--watchdog-timeout", "120") as server:
        yield server


@pytest.fixture(autouse=True)
def server_still_up(request):
    yield
    if "server" in request.fixturenames:
        server = request.getfixturevalue("server")
        assert server.proc.poll() is None, f"the server exited\n{server.output()}"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300)


def chat(client, question, max_tokens=TOKENS, **kwargs):
    return client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=max_tokens,
        **kwargs,
    )


def test_chat_completion_equals_single_process_mlx_lm(client, reference):
    question = QUESTIONS[0]
    r = chat(client, question)
    assert r.choices[0].message.content == reference[question]
    assert r.choices[0].message.content.startswith("The capital of France is Paris")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10


def test_streamed_chat_completion_equals_single_process_mlx_lm(client, reference):
    question = QUESTIONS[1]
    chunks = list(chat(client, question, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference[question]
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == len(finishes) - 2  # less role and finish chunks


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_equals_single_process_mlx_lm(client, reference, stream):
    r = client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt=COMPLETION,
        temperature=0,
        max_tokens=TOKENS,
        stream=stream,
    )
    chunks = list(r) if stream else [r]
    assert "".join(c.choices[0].text for c in chunks) == reference[COMPLETION]
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_string_ends_the_text_just_before_it(client, reference, stream):
    whole = reference[COMPLETION]
    stop = whole.split()[2]  # a word from the middle of the answer
    r = client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt=COMPLETION,
        temperature=0,
        max_tokens=TOKENS,
        stop=[stop],
        stream=stream,
    )
    chunks = list(r) if stream else [r]
    assert "".join(c.choices[0].text for c in chunks) == whole[: whole.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]


def test_health_is_ok_and_names_every_rank_process(server):
    code, body = server.health()
    assert code == 200 and body["status"] == "ok"
    assert body["ranks"] == 2 and len(body["pids"]) == 2 and all(body["pids"])


def test_eight_concurrent_clients_each_get_the_single_process_answer(client, reference, server):
    served = server.health()[1]["served"]
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda q: chat(client, q, SHORT), questions))
    assert [r.choices[0].message.content for r in replies] == [
        reference[q, SHORT] for q in questions
    ]
    assert len({r.id for r in replies}) == 8
    code, body = server.health()
    assert code == 200 and body["served"] == served + 8 and body["queued"] == 0
    assert chat(client, QUESTIONS[0]).choices[0].message.content == reference[QUESTIONS[0]]


def test_a_client_leaving_mid_stream_frees_the_pipeline(server, client, reference):
    cancelled = server.health()[1]["cancelled"]
    body = {
        "model": "SmolLM2-135M-Instruct",
        "prompt": COMPLETION,
        "max_tokens": 2000,
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    # 2000 tokens take minutes here; the pipeline must give up within seconds.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = server.health()[1]
        if health["cancelled"] == cancelled + 1 and not health["busy"]:
            break
        time.sleep(0.25)
    assert health["cancelled"] == cancelled + 1 and not health["busy"], health
    assert chat(client, QUESTIONS[2]).choices[0].message.content == reference[QUESTIONS[2]]


BAD = {
    "malformed JSON": ("/v1/chat/completions", b'{"model": "x", "messages": [', 400, None),
    "unknown model": (
        "/v1/chat/completions",
        {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
        404,
        "model_not_found",
    ),
    "negative max_tokens": (
        "/v1/completions",
        {"model": "SmolLM2-135M-Instruct", "prompt": "hi", "max_tokens": -1},
        400,
        None,
    ),
    "prompt longer than the context": (
        "/v1/completions",
        {"model": "SmolLM2-135M-Instruct", "prompt": list(range(5, 8300)), "max_tokens": 4},
        400,
        "context_length_exceeded",
    ),
    "no messages": ("/v1/chat/completions", {"model": "SmolLM2-135M-Instruct"}, 400, None),
    "two choices": (
        "/v1/completions",
        {"model": "SmolLM2-135M-Instruct", "prompt": "hi", "n": 2},
        400,
        None,
    ),
    "token outside the vocabulary": (
        "/v1/completions",
        {"model": "SmolLM2-135M-Instruct", "prompt": [1, 10**6]},
        400,
        None,
    ),
    "unknown endpoint": ("/v1/embeddings", {"model": "SmolLM2-135M-Instruct"}, 404, None),
    # A lone surrogate: valid JSON, but no text the tokenizer can encode.
    "untokenizable prompt": (
        "/v1/completions",
        b'{"model": "SmolLM2-135M-Instruct", "prompt": "hi \\ud800", "max_tokens": 2}',
        400,
        None,
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_request_gets_its_openai_error_and_the_server_keeps_serving(server, case):
    path, body, status, code = BAD[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        server.url + path,
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code
    ok = httpx.post(
        server.url + "/v1/completions",
        json={"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_request_without_a_content_type_is_read_as_json(server):
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 2}
    r = httpx.post(server.url + "/v1/completions", content=json.dumps(body).encode(), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_the_openai_client_raises_its_own_error_types(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-9", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(
            model="SmolLM2-135M-Instruct", prompt=list(range(5, 8300)), max_tokens=1
        )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_model_folder("llama", tmp_path_factory.mktemp("tiny") / "llama")


def test_a_full_queue_answers_429_with_retry_after_and_the_queued_request_is_served(tiny):
    import threading

    url = None
    answers = []
    short = {"model": tiny.name, "prompt": [1, 2, 3], "max_tokens": 2}
    with serving(tiny, 2, "--max-queue", "1") as server:
        url = server.url + "/v1/completions"
        busy = {**short, "max_tokens": 100000, "stream": True}
        with httpx.stream("POST", url, json=busy, timeout=60) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the stream
            next(line for line in lines if line.startswith("data: "))
            waiting = threading.Thread(
                target=lambda: answers.append(httpx.post(url, json=short, timeout=120)),
                daemon=True,
            )
            waiting.start()
            deadline = time.monotonic() + 30
            while server.health()[1].get("queued", 0) < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            refused = httpx.post(url, json=short, timeout=60)
        # The streaming client has left: its request ends, the queued one runs.
        waiting.join(timeout=120)
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    assert [a.status_code for a in answers] == [200]
    assert answers[0].json()["usage"]["completion_tokens"] == 2


def test_sigterm_stops_every_rank_with_exit_code_zero(tiny):
    with serving(tiny, 2) as server:
        assert server.stop() == 0
        assert server.output().count("stopped") == 2, server.output()


def test_a_suspended_rank_turns_health_unhealthy_and_the_run_exits_nonzero(tiny):
    with serving(tiny, 2, "--watchdog-timeout", "6") as server:
        follower = server.health()[1]["pids"][1]
        body = {"model": tiny.name, "prompt": [1, 2, 3], "max_tokens": 100000, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the stream
            next(line for line in lines if line.startswith("data: "))
            os.kill(follower, signal.SIGSTOP)
            start = time.monotonic()
            # Short requests, so that one slow answer cannot hide the window
            # between unhealthy (3 s) and the rank's exit (6 s).
            code, health = server.health(timeout=1)
            while code in (0, 200) and time.monotonic() - start < 30:
                time.sleep(0.25)
                code, health = server.health(timeout=1)
            exit_code = server.proc.wait(timeout=30)
            said = []
            try:
                said.extend(lines)
            except httpx.HTTPError:
                pass  # the server went down mid-stream, as it should, after the error
        assert code == 503 and "no progress" in health["reason"], (health, server.output())
        assert exit_code != 0
        # The client in flight got an error event, not a dropped connection.
        errors = [line for line in said if '"error"' in line]
        assert errors and "the pipeline stopped" in errors[0], said[-3:]
        assert time.monotonic() - start < 30
        assert "stalled" in server.output()


def test_a_port_in_use_is_refused_before_loading(tiny):
    with serving(tiny, 1) as server:
        port = server.url.rsplit(":", 1)[1]
        run = subprocess.run(
            [sys.executable, "-m", "ppwrap", "serve", "--model", str(tiny), "--port", port],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr
