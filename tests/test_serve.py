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
from pathlib import Path

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


def test_completion_logprobs_equal_single_process_mlx_lm(client, smollm2):
    from mlx_lm import stream_generate as mlx_stream_generate

    model, tok = mlx_load(str(smollm2))
    ref = list(mlx_stream_generate(model, tok, COMPLETION, max_tokens=6))
    r = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=COMPLETION, max_tokens=6, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert lp.tokens == [tok.decode([g.token]) for g in ref]
    for got, g, top in zip(lp.token_logprobs, ref, lp.top_logprobs, strict=True):
        assert abs(got - g.logprobs[g.token].item()) < 1e-2
        best = sorted(range(g.logprobs.size), key=lambda i: -g.logprobs[i].item())[:3]
        assert list(top) == [tok.decode([i]) for i in best]
        assert max(top.values()) == pytest.approx(got, abs=1e-6)  # greedy: the top one


def test_streamed_chat_logprobs_cover_the_text_token_by_token(client):
    chunks = list(
        chat(client, QUESTIONS[2], max_tokens=8, stream=True, logprobs=True, top_logprobs=2)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    entries = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert len(entries) == 8
    assert "".join(e.token for e in entries) == text
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-6)
        assert bytes(e.bytes) == e.token.encode()


CHAT_HI = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}]}

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
    # Asked for what the server cannot do: said, not ignored.
    "an image part": (
        "/v1/chat/completions",
        {
            "model": "SmolLM2-135M-Instruct",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                    ],
                }
            ],
        },
        400,
        None,
    ),
    "structured output": (
        "/v1/chat/completions",
        {**CHAT_HI, "response_format": {"type": "json_object"}},
        400,
        None,
    ),
    "tools on a template without tool calling": (
        "/v1/chat/completions",
        {**CHAT_HI, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        400,
        None,
    ),
    "echo": (
        "/v1/completions",
        {"model": "SmolLM2-135M-Instruct", "prompt": "hi", "echo": True},
        400,
        None,
    ),
    "too many top_logprobs": (
        "/v1/chat/completions",
        {**CHAT_HI, "logprobs": True, "top_logprobs": 21},
        400,
        None,
    ),
}
# The field each refusal names.
BAD_PARAM = {
    "an image part": "messages.0.content.1.type",
    "structured output": "response_format",
    "tools on a template without tool calling": "tools",
    "echo": "echo",
    "too many top_logprobs": "top_logprobs",
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
    if case in BAD_PARAM:
        assert error["param"] == BAD_PARAM[case], error
    ok = httpx.post(
        server.url + "/v1/chat/completions",
        json={
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12,
            "temperature": 0,
        },
        timeout=60,
    )
    assert ok.status_code == 200 and "Paris" in ok.json()["choices"][0]["message"]["content"]


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


def _queue_behind(server, url, body, answers):
    """Post ``body`` from a thread (its response into ``answers``) and return once
    the server holds it in its queue."""
    import threading

    waiting = threading.Thread(
        target=lambda: answers.append(httpx.post(url, json=body, timeout=120)), daemon=True
    )
    waiting.start()
    deadline = time.monotonic() + 30
    while server.health()[1].get("queued", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    return waiting


def _hold_the_pipeline(url, model):
    """Start a long request (2000 tokens) and give it a moment: requests sent next
    queue behind it and go out together. Returns its thread."""
    import threading

    holder = threading.Thread(
        target=lambda: httpx.post(
            url, json={"model": model, "prompt": [5], "max_tokens": 2000}, timeout=120
        ),
        daemon=True,
    )
    holder.start()
    time.sleep(0.3)
    return holder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_model_folder("llama", tmp_path_factory.mktemp("tiny") / "llama")


def test_a_full_queue_answers_429_with_retry_after_and_the_queued_request_is_served(tiny):

    url = None
    answers = []
    short = {"model": tiny.name, "prompt": [1, 2, 3], "max_tokens": 2}
    # One at a time: with batching the queued request would join at once.
    with serving(tiny, 2, "--max-queue", "1", "--max-batch", "1") as server:
        url = server.url + "/v1/completions"
        busy = {**short, "max_tokens": 100000, "stream": True}
        with httpx.stream("POST", url, json=busy, timeout=60) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the stream
            next(line for line in lines if line.startswith("data: "))
            waiting = _queue_behind(server, url, short, answers)
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


def test_a_suspended_rank_turns_health_unhealthy_naming_it_and_the_run_exits_nonzero(tiny):
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
        # Its heartbeats stopped with it: named as suspended, not as slow.
        assert code == 503 and "dead or suspended" in health["reason"], (health, server.output())
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


SLOW_PREFILL_HOOK = Path(__file__).parent / "hooks" / "slow_prefill"


def test_a_prefill_longer_than_the_watchdog_bound_completes_with_health_ok_and_a_suspended_rank_is_still_caught(
    tiny, monkeypatch
):
    import threading

    # Rank 1 (the first stage) computes every prefill chunk ~6 s longer;
    # the watchdog's bound is 3 s.
    path = os.pathsep.join(p for p in [str(SLOW_PREFILL_HOOK), os.environ.get("PYTHONPATH")] if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("PPWRAP_TEST_SLOW_PREFILL", "1:6")
    prompt = list(range(5, 45))
    model, tok = mlx_load(str(tiny))
    expected = mlx_generate(model, tok, prompt, max_tokens=4)
    body = {"model": tiny.name, "prompt": prompt, "max_tokens": 4, "temperature": 0}
    with serving(tiny, 2, "--watchdog-timeout", "3") as server:
        url = server.url + "/v1/completions"
        healths: list[tuple[int, dict]] = []
        done = threading.Event()

        def watch_health():
            while not done.is_set():
                healths.append(server.health(timeout=2))
                time.sleep(0.25)

        watcher = threading.Thread(target=watch_health, daemon=True)
        watcher.start()
        tic = time.monotonic()
        r = httpx.post(url, json=body, timeout=120)
        took = time.monotonic() - tic
        done.set()
        watcher.join(timeout=10)
        assert r.status_code == 200, (r.text, server.output())
        assert r.json()["choices"][0]["text"] == expected
        assert took > 3, "the prefill was not longer than the watchdog's bound"
        assert healths and all(code == 200 for code, _ in healths), healths
        busy = [h.get("activity", "") for _, h in healths]
        assert any("rank 1 is computing prefill" in b for b in busy), busy
        assert server.proc.poll() is None

        # A long prefill again (another prompt: this one is cached now) with
        # rank 1 suspended: caught within the bound.
        follower = server.health()[1]["pids"][1]
        other = {**body, "prompt": list(range(50, 90)), "stream": True}
        with httpx.stream("POST", url, json=other, timeout=60) as s:
            lines = s.iter_lines()  # kept: a dropped iterator closes the stream
            time.sleep(1)
            os.kill(follower, signal.SIGSTOP)
            stopped = time.monotonic()
            exit_code = server.proc.wait(timeout=30)
            caught = time.monotonic() - stopped
            said = []
            try:
                said.extend(lines)
            except httpx.HTTPError:
                pass
        output = server.output()
    assert exit_code != 0
    assert caught < 15, caught
    assert "rank 1 has sent no heartbeat" in output and "dead or suspended" in output, output
    errors = [line for line in said if '"error"' in line]
    assert errors and "the pipeline stopped" in errors[0], said[-3:]


# --- bounds: what a client may send and ask for ----------------------------------

KEY = "sk-test-ppwrap"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    # A context of 8192 tokens, so that a huge prompt is refused once tokenized.
    tiny = write_model_folder(
        "llama", tmp_path_factory.mktemp("ctx") / "llama", max_position_embeddings=8192
    )
    args = ["--api-key", KEY, "--max-body-bytes", "8000000", "--max-tokens-cap", "100000"]
    args += ["--request-timeout", "3", "--cors-origins", "http://app.example"]
    with serving(tiny, 2, *args) as server:
        server.model = tiny
        yield server


def _post(server, path, body, key=KEY, headers=None, **kwargs):
    headers = {**({"authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kwargs)


def _control_answers(server, tiny):
    r = _post(server, "/v1/completions", {"model": tiny.name, "prompt": [1, 2, 3], "max_tokens": 2})
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_a_50_mb_body_gets_413_fast_before_it_is_read(guarded, tiny):
    body = b'{"model": "x", "prompt": "' + b"a" * 50_000_000 + b'"}'
    tic = time.monotonic()
    r = httpx.post(
        guarded.url + "/v1/completions",
        content=body,
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413, r.text
    assert (
        r.json()["error"]["code"] == "body_too_large"
        and "8000000 bytes" in r.json()["error"]["message"]
    )
    assert time.monotonic() - tic < 10
    assert _control_answers(guarded, tiny)


def test_a_missing_or_wrong_api_key_gets_401_and_health_stays_open(guarded, tiny):
    body = {"model": tiny.name, "prompt": [1, 2, 3], "max_tokens": 2}
    for key in (None, "sk-wrong"):
        r = _post(guarded, "/v1/completions", body, key=key)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, timeout=60)
    r = client.completions.create(model=tiny.name, prompt=[1, 2, 3], max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_max_tokens_over_the_cap_gets_400_naming_it(guarded, tiny):
    r = _post(guarded, "/v1/completions", {"model": tiny.name, "prompt": [1], "max_tokens": 100001})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_tokens"
    assert "at most 100000 tokens" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_request_over_the_time_limit_ends_with_504_and_the_server_keeps_serving(
    guarded, tiny, stream
):
    # 8000 tokens take well over 3 s on 2 ranks (a token costs ~1 ms or more).
    body = {"model": tiny.name, "prompt": [1, 2, 3], "max_tokens": 8000, "stream": stream}
    tic = time.monotonic()
    r = _post(guarded, "/v1/completions", body)
    took = time.monotonic() - tic
    assert 3 <= took < 20, took
    if stream:
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert "time limit" in json.loads(events[-1][6:])["error"]["message"], events[-2:]
    else:
        assert r.status_code == 504, r.text
        assert "time limit" in r.json()["error"]["message"]
    assert _control_answers(guarded, tiny)


def test_docs_are_off_and_cors_answers_only_the_allowed_origin(guarded):
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(guarded.url + path, timeout=10).status_code == 404
    preflight = {"access-control-request-method": "POST"}
    ok = httpx.options(
        guarded.url + "/v1/completions",
        headers={**preflight, "origin": "http://app.example"},
        timeout=10,
    )
    assert ok.headers.get("access-control-allow-origin") == "http://app.example"
    other = httpx.options(
        guarded.url + "/v1/completions",
        headers={**preflight, "origin": "http://evil.example"},
        timeout=10,
    )
    assert "access-control-allow-origin" not in other.headers


def test_health_answers_within_a_second_while_a_5_mb_prompt_is_tokenized(guarded, tiny):
    import threading

    words = " ".join(["pipeline stages pass hidden states"] * 150_000)[:5_000_000]
    answers = []
    poster = threading.Thread(
        target=lambda: answers.append(
            _post(
                guarded, "/v1/completions", {"model": tiny.name, "prompt": words, "max_tokens": 1}
            )
        ),
        daemon=True,
    )
    poster.start()
    times = []
    while poster.is_alive():
        tic = time.monotonic()
        code, _ = guarded.health(timeout=5)
        times.append(time.monotonic() - tic)
        assert code == 200
        time.sleep(0.1)
    poster.join()
    assert answers[0].status_code == 400  # longer than the context, found once tokenized
    assert "maximum context length" in answers[0].json()["error"]["message"]
    assert len(times) >= 3, "the prompt was tokenized too fast to test anything"
    assert max(times) < 1.0, times


def _cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_idle_non_final_rank_sleeps_instead_of_spinning_in_the_collective(tiny):
    with serving(tiny, 2) as server:
        pids = server.health()[1]["pids"]
        time.sleep(1)
        before = [_cpu_seconds(p) for p in pids]
        time.sleep(5)
        used = [_cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]
        # Waiting inside MLX's ring collective polls: ~5 s of CPU in 5 s.
        assert used[1] < 1.0, used
        assert _control_answers(server, tiny)


@pytest.mark.parametrize("how", ["SIGSTOP rank 1", "SIGKILL rank 1", "SIGTERM"])
def test_whatever_ends_the_pipeline_answers_the_stream_with_an_error_event_and_the_queued_with_503(
    tiny, how
):

    queued = []
    # One at a time, so that the short request queues (batching would take it in).
    with serving(tiny, 2, "--watchdog-timeout", "6", "--max-batch", "1") as server:
        url = server.url + "/v1/completions"
        long = {"model": tiny.name, "prompt": [1, 2, 3], "max_tokens": 100000, "stream": True}
        with httpx.stream("POST", url, json=long, timeout=60) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the stream
            next(line for line in lines if line.startswith("data: "))
            short = {"model": tiny.name, "prompt": [1, 2, 3], "max_tokens": 2}
            waiting = _queue_behind(server, url, short, queued)
            if how == "SIGTERM":
                server.proc.send_signal(signal.SIGTERM)
            else:
                sig = signal.SIGSTOP if how.startswith("SIGSTOP") else signal.SIGKILL
                os.kill(server.health()[1]["pids"][1], sig)
            said = []
            try:
                said.extend(lines)
            except httpx.HTTPError:
                pass
        waiting.join(timeout=60)
        exit_code = server.proc.wait(timeout=60)
        output = server.output()
    errors = [json.loads(line[6:]) for line in said if line.startswith('data: {"error"')]
    assert errors, said[-3:]
    assert [q.status_code for q in queued] == [503], [q.text for q in queued]
    assert queued[0].json()["error"]["type"] == "server_error"
    if how == "SIGTERM":
        assert exit_code == 0, output
        assert "shutting down" in errors[0]["error"]["message"]
    elif how.startswith("SIGSTOP"):
        assert exit_code != 0, output
        assert "the pipeline stopped" in errors[0]["error"]["message"], errors
        assert "dead or suspended" in errors[0]["error"]["message"], errors
    else:
        assert exit_code != 0, output
        assert "a rank of the pipeline went away" in errors[0]["error"]["message"], errors


def test_a_soak_of_200_mixed_requests_from_16_clients_answers_every_good_one_correctly(tiny):
    import random

    model, tok = mlx_load(str(tiny))
    prompts = [[1 + i, 7 + 3 * i, 20 + i] for i in range(8)]
    expected = {
        (i, n): mlx_generate(model, tok, p, max_tokens=n)
        for i, p in enumerate(prompts)
        for n in (3, 6)
    }
    bad = [
        b'{"model": "x", "prompt": [',
        json.dumps({"model": "gpt-9", "prompt": "hi"}).encode(),
        json.dumps({"model": tiny.name, "prompt": "hi", "max_tokens": -1}).encode(),
        json.dumps({"model": tiny.name, "prompt": [1, 10**6]}).encode(),
    ]
    rng = random.Random(0)
    plan = [rng.choice(["good", "good", "good", "bad", "leaves"]) for _ in range(200)]

    def one(k):
        kind = plan[k]
        url = server.url + "/v1/completions"
        if kind == "bad":
            r = httpx.post(
                url,
                content=bad[k % len(bad)],
                headers={"content-type": "application/json"},
                timeout=120,
            )
            return kind, r.status_code in (400, 404) and "error" in r.json(), r.text
        i, n = k % len(prompts), (3, 6)[k % 2]
        body = {"model": tiny.name, "prompt": prompts[i], "max_tokens": n, "temperature": 0}
        if kind == "leaves":
            with httpx.stream(
                "POST", url, json={**body, "max_tokens": 200, "stream": True}, timeout=120
            ) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
            return kind, first.startswith("data: {"), first
        r = httpx.post(url, json=body, timeout=120)
        ok = r.status_code == 200 and r.json()["choices"][0]["text"] == expected[i, n]
        return kind, ok, r.text

    with serving(tiny, 2, "--max-queue", "64") as server:
        pids = server.health()[1]["pids"]
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(200)))
        code, health = server.health()
    failed = [(k, r) for k, r in enumerate(results) if not r[1]]
    assert not failed, failed[:5]
    assert code == 200 and health["pids"] == pids  # no rank restarted
    good = sum(kind == "good" for kind in plan)
    assert health["served"] >= good


def test_a_foreign_host_header_gets_400_on_a_loopback_server(guarded, tiny):
    # A web page that rebinds its own name to 127.0.0.1 sends its name as Host.
    body = {"model": tiny.name, "prompt": [1, 2, 3], "max_tokens": 2}
    r = _post(guarded, "/v1/completions", body, headers={"host": "rebind.example"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", r.text
    port = guarded.url.rsplit(":", 1)[1]
    r = _post(guarded, "/v1/completions", body, headers={"host": f"localhost:{port}"})
    assert r.status_code == 200, r.text


COUNT_HOOK = Path(__file__).parent / "hooks" / "count_positions"


def _positions(folder, ranks):
    """Positions each rank's first layer has computed so far, one list per rank."""
    out = []
    for r in range(ranks):
        path = folder / f"rank{r}"
        out.append([int(x) for x in path.read_text().split()] if path.exists() else [])
    return out


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_prompt_sharing_a_64_token_prefix_computes_only_its_suffix_and_the_cache_stays_bounded(
    tmp_path, monkeypatch, ranks
):
    tiny = write_model_folder("llama", tmp_path / "llama", max_position_embeddings=4096)
    counts = tmp_path / "counts"
    counts.mkdir()
    path = os.pathsep.join(p for p in [str(COUNT_HOOK), os.environ.get("PYTHONPATH")] if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("PPWRAP_TEST_COUNT_DIR", str(counts))
    model, tok = mlx_load(str(tiny))
    prefix = [3 + (7 * i) % 100 for i in range(64)]
    a, b = prefix + [5, 6, 7, 8, 9, 10], prefix + [11, 12, 13, 14, 15]
    other = [4 + (11 * i) % 90 for i in range(90)]
    # Bytes per token on the rank with the most layers (2 of the 4): keys and values,
    # 2 heads of 8, float32.
    per_token = 2 * 2 * 2 * 8 * 4
    bound = 100 * per_token  # room for one of these sequences at a time
    # An even split: the most layers on a rank is 2 (what per_token counts).
    with serving(tiny, ranks, "--prompt-cache-bytes", str(bound), "--split", "even") as server:

        def ask(prompt):
            before = _positions(counts, ranks)
            r = httpx.post(
                server.url + "/v1/completions",
                json={"model": tiny.name, "prompt": prompt, "max_tokens": 4, "temperature": 0},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == mlx_generate(model, tok, prompt, max_tokens=4)
            after = _positions(counts, ranks)
            # Prefill chunks: every computed input longer than one position.
            prefilled = [
                sum(n for n in new[len(old) :] if n > 1)
                for old, new in zip(before, after, strict=True)
            ]
            cache = server.health()[1]["prompt_cache"]
            assert cache["bytes"] <= cache["max_bytes"] == bound, cache
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"], prefilled

        assert ask(a) == (0, [len(a) - 1] * ranks)
        assert ask(b) == (64, [len(b) - 64 - 1] * ranks)  # only its own suffix, on every rank
        assert ask(other) == (0, [len(other) - 1] * ranks)  # evicts b's sequence
        assert ask(b) == (0, [len(b) - 1] * ranks)


def _joins(output):
    """(joined, rows after the join) for each ``N joined; micro-batches of [...]`` line."""
    import re

    found = re.findall(r"(\d+) joined; micro-batches of \[([\d, ]+)\] sequences", output)
    return [(int(n), sum(int(x) for x in rows.split(","))) for n, rows in found]


# qwen2's head is tied; hunyuan's boundaries carry keys and values; nanbeige's
# layers run twice per token (one micro-batch in flight).
JOINING = [(f, n) for f in ("llama", "qwen2", "qwen3_moe") for n in (2, 3)]
JOINING += [("hunyuan", 3), ("nanbeige", 2)]


@pytest.mark.parametrize(("family", "ranks"), JOINING)
def test_requests_joining_and_leaving_a_running_batch_each_get_mlx_lm_s_tokens_for_them_alone(
    tmp_path, family, ranks
):
    import threading

    folder = write_model_folder(family, tmp_path / family, max_position_embeddings=4096)
    model, tok = mlx_load(str(folder))
    prompts = [[1 + i, 7 + 3 * i, 20 + i, 9, 4 + i, 11][: 2 + i % 5] for i in range(7)]
    limits = [30 + 25 * (i % 4) for i in range(7)]
    expected = [
        mlx_generate(model, tok, p, max_tokens=n) for p, n in zip(prompts, limits, strict=True)
    ]
    # Stop strings end two requests early, from the middle of their text.
    stops = {}
    for i in sorted(range(len(prompts)), key=lambda i: -len(expected[i])):
        middle = len(expected[i]) // 2
        pieces = [expected[i][k : k + 2] for k in range(middle, len(expected[i]) - 1)]
        printable = [p for p in pieces if p.isprintable() and "\ufffd" not in p]
        if printable and len(stops) < 2:
            stops[i] = printable[0]
    assert len(stops) == 2, expected
    answers = [None] * len(prompts)
    with serving(folder, ranks, "--max-batch", "4") as server:
        url = server.url + "/v1/completions"

        def ask(i):
            time.sleep(0.05 * i)  # each joins a batch that is already running
            body = {"model": folder.name, "prompt": prompts[i], "max_tokens": limits[i]}
            if i in stops:
                body["stop"] = [stops[i]]
            answers[i] = httpx.post(url, json={**body, "temperature": 0}, timeout=120)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        output = server.output()
    for i, r in enumerate(answers):
        assert r is not None and r.status_code == 200, (i, r and r.text)
        choice = r.json()["choices"][0]
        if i in stops:
            assert choice["text"] == expected[i][: expected[i].index(stops[i])], i
            assert choice["finish_reason"] == "stop"
        else:
            assert choice["text"] == expected[i], i
    joins = _joins(output)
    assert sum(n for n, _ in joins) == len(prompts), output[-3000:]
    # The split's balance, each stage timed alone at startup.
    in_flight = 1 if family == "nanbeige" else ranks  # micro-batches
    timed = output.split(f"stage compute per decode step of {4 // in_flight} sequence(s)")[1]
    assert f"rank {ranks - 1} " in timed.splitlines()[0], output[-3000:]
    assert any(rows > n for n, rows in joins), joins  # some joined sequences already running
    assert max(rows for _, rows in joins) <= 4, joins  # --max-batch


def test_a_client_that_leaves_mid_stream_frees_its_slot_for_a_waiting_request_at_once(tiny):
    long = {"model": tiny.name, "prompt": [1, 2, 3], "max_tokens": 100000, "stream": True}
    short = {"model": tiny.name, "prompt": [4, 5], "max_tokens": 3}
    answers = []
    with serving(tiny, 2, "--max-batch", "2") as server:
        url = server.url + "/v1/completions"
        with httpx.stream("POST", url, json=long, timeout=60) as staying:
            kept = staying.iter_lines()  # kept: a dropped iterator closes the stream
            next(line for line in kept if line.startswith("data: "))
            with httpx.stream("POST", url, json=long, timeout=60) as leaving:
                lines = leaving.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                waiting = _queue_behind(server, url, short, answers)  # both slots taken
                left = time.monotonic()
            waiting.join(timeout=60)
            took = time.monotonic() - left
            # The other stream goes on: the short request took the freed slot.
            assert next(line for line in kept if line.startswith("data: "))
    assert answers and answers[0].status_code == 200, answers
    assert answers[0].json()["usage"]["completion_tokens"] == 3
    assert took < 5, took  # the server notices a gone client within 0.5 s


def test_a_seeded_request_samples_the_same_text_alone_and_inside_a_batch(tiny):

    seeded = {"model": tiny.name, "prompt": [4, 8, 15], "max_tokens": 12, "temperature": 1.0}
    seeded["seed"] = 7
    with serving(tiny, 2, "--max-batch", "4") as server:
        url = server.url + "/v1/completions"
        alone = httpx.post(url, json=seeded, timeout=120).json()["choices"][0]["text"]
        holder = _hold_the_pipeline(url, tiny.name)
        others = [{**seeded, "seed": 8 + i, "prompt": [9, i + 1]} for i in range(3)]
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(lambda b: httpx.post(url, json=b, timeout=120), [seeded, *others])
            )
        holder.join(timeout=120)
        output = server.output()
    assert any(rows > n for n, rows in _joins(output)), output[-2000:]  # inside a batch
    assert answers[0].json()["choices"][0]["text"] == alone
    assert len({a.json()["choices"][0]["text"] for a in answers}) > 1  # other seeds, other text
