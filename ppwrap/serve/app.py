"""``ppwrap serve``: an OpenAI-compatible HTTP server over a pipeline of ranks.

The final rank (rank 0) answers HTTP with FastAPI on uvicorn, in a thread; its
main thread, like every other rank's, runs the serving loop of
:mod:`ppwrap.serve.engine`, which takes the requests in order, those waiting together
as one batch.

Endpoints: ``/v1/chat/completions`` and ``/v1/completions`` (with and without
``stream``), ``/v1/models``, and ``/health``, which answers 503 once a step
has waited on the ranks for half the watchdog's timeout.
"""

from __future__ import annotations

import hmac
import json
import logging
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs

try:
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException
except ImportError as e:  # the serve extra is not installed
    raise ImportError(
        "ppwrap serve needs FastAPI and uvicorn: pip install 'ppwrap[serve]' "
        "(or pip install fastapi uvicorn)"
    ) from e

from .engine import Engine, Job, QueueFull, _held_back

log = logging.getLogger("ppwrap.serve")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class Common(BaseModel):
    """What both endpoints take; unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(Common):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


_CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
    "max_seq_len",
)


def context_length(config: dict[str, Any]) -> int | None:
    """The model's context length from its config, if it states one."""
    for scope in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            if isinstance(scope.get(key), int) and scope[key] > 0:
                return int(scope[key])
    return None


@attrs.frozen
class Limits:
    """What bounds a client's work and who may ask.

    Attributes:
        max_body_bytes: Larger request bodies get a 413 before they are read.
        max_tokens_cap: Requests asking for more tokens get a 400; ``None``: the context.
        request_timeout: Seconds a request may take, queue included, before it
            ends with a 504 (an error event on a stream); ``None``: no limit.
        api_key: When set, ``/v1`` requests need ``Authorization: Bearer <key>``.
        allowed_hosts: Host header names answered (any port); others get a 400,
            which keeps web pages from reaching a local server through DNS
            rebinding. ``None``: any.
        cors_origins: Origins browsers may call from (``*`` for any); none by default.
        docs: Serve ``/docs`` and ``/openapi.json``.
    """

    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens_cap: int | None = None
    request_timeout: float | None = None
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = None
    cors_origins: tuple[str, ...] = ()
    docs: bool = False


def make_app(
    engine: Engine,
    tokenizer: Any,
    *,
    model_id: str,
    aliases: tuple[str, ...] = (),
    context: int | None = None,
    default_max_tokens: int = 512,
    default_temperature: float = 0.0,
    default_top_p: float = 1.0,
    stall_after: float = 10.0,
    limits: Limits | None = None,
) -> Any:
    """The FastAPI application of the final rank."""
    limits = limits or Limits()
    app = FastAPI(
        title="ppwrap",
        description="OpenAI-compatible API over a pipeline of ranks",
        docs_url="/docs" if limits.docs else None,
        redoc_url="/redoc" if limits.docs else None,
        openapi_url="/openapi.json" if limits.docs else None,
    )
    app.add_middleware(_JSONByDefault)
    app.add_middleware(
        _Guard,
        max_body_bytes=limits.max_body_bytes,
        api_key=limits.api_key,
        allowed_hosts=limits.allowed_hosts,
    )
    if limits.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(limits.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )
    names = {model_id, *aliases}
    created = int(time.time())

    def error(
        status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ) -> JSONResponse:
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error(
                400,
                "We could not parse the JSON body of your request: "
                f"{first.get('msg', 'invalid JSON')}. Send valid JSON.",
                "invalid_request_error",
            )
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        got = first.get("input")
        where = f"'{param}'" if param else "request body"
        message = f"Invalid {where}: {first.get('msg')}"
        if param and not isinstance(got, dict):
            shown = json.dumps(got)
            message += f" (got {shown if len(shown) < 80 else shown[:80] + '...'})"
        return error(400, message + ".", "invalid_request_error", param, first.get("type"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error(exc.status_code, str(exc.detail), kind)

    @app.get("/health", response_model=None)
    async def health() -> JSONResponse:
        ok, info = engine.health(stall_after)
        return JSONResponse(info, status_code=200 if ok else 503)

    @app.get("/v1/models", response_model=None)
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "ppwrap"}],
        }

    def check(body: Common, prompt: list[int], asked: int | None) -> JSONResponse | Job:
        if body.model not in names:
            return error(
                404,
                f"The model '{body.model}' does not exist; this server serves '{model_id}' "
                "(see /v1/models).",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        if not prompt:
            return error(400, "The prompt is empty.", "invalid_request_error", "prompt")
        vocab = engine.head.vocab_size
        if vocab is not None and not all(0 <= t < vocab for t in prompt):
            return error(
                400,
                f"The prompt holds token ids outside the vocabulary 0..{vocab - 1}.",
                "invalid_request_error",
                "prompt",
            )
        cap = limits.max_tokens_cap
        if cap is not None and asked is not None and asked > cap:
            return error(
                400,
                f"This server generates at most {cap} tokens per request; you asked for {asked}.",
                "invalid_request_error",
                "max_tokens",
            )
        max_tokens = asked or (default_max_tokens if cap is None else min(default_max_tokens, cap))
        if context is not None:
            if len(prompt) + (asked or 1) > context:
                return error(
                    400,
                    f"This model's maximum context length is {context} tokens. However, you "
                    f"requested {len(prompt) + (asked or 1)} tokens ({len(prompt)} in the "
                    f"prompt, {asked or 1} for the completion). Please reduce the prompt "
                    "or the completion length.",
                    "invalid_request_error",
                    "messages" if isinstance(body, ChatRequest) else "prompt",
                    "context_length_exceeded",
                )
            max_tokens = min(max_tokens, context - len(prompt))
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            return error(
                400, "'stop' takes up to 4 non-empty strings.", "invalid_request_error", "stop"
            )
        return Job(
            id=f"{'chatcmpl' if isinstance(body, ChatRequest) else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=default_temperature if body.temperature is None else body.temperature,
            top_p=default_top_p if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=stops,
        )

    async def respond(
        request: Request, body: Common, job: Job, chat: bool, calls: _ToolCalls | None = None
    ) -> Any:
        import asyncio

        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        if limits.request_timeout is not None:
            job.deadline = time.monotonic() + limits.request_timeout
        try:
            engine.submit(job)
        except QueueFull as e:
            # 429, which OpenAI clients retry after a pause (503 they give up on).
            response = error(
                429, f"The server is overloaded: {e}.", "rate_limit_error", None, "overloaded"
            )
            response.headers["retry-after"] = "1"
            return response
        base = {
            "id": job.id,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.model,
        }

        def choice(
            text: str | None,
            finish: str | None,
            scored: list[dict[str, Any]] | None = None,
            tool_calls: list[dict[str, Any]] | None = None,
        ) -> dict[str, Any]:
            lp = _logprobs(scored, chat) if job.logprobs is not None else None
            if tool_calls and finish == "stop":
                finish = "tool_calls"
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}
            if body.stream:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if tool_calls:
                    delta["tool_calls"] = tool_calls
                return {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_calls:
                message["tool_calls"] = tool_calls
            return {"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}

        if body.stream:
            chunk = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}
            with_usage = body.stream_options is not None and body.stream_options.include_usage

            def sse(data: dict[str, Any]) -> str:
                return f"data: {json.dumps(data)}\n\n"

            async def events() -> AsyncIterator[str]:
                try:
                    if chat:
                        first = choice(None, None)
                        first["delta"] = {"role": "assistant", "content": ""}
                        yield sse({**chunk, "choices": [first]})
                    async for event in job.stream(request.is_disconnected):
                        if event[0] == "text":
                            piece = calls.feed(event[1]) if calls is not None else event[1]
                            if piece or event[2]:
                                yield sse({**chunk, "choices": [choice(piece, None, event[2])]})
                        elif event[0] == "done":
                            found: list[dict[str, Any]] = []
                            if calls is not None:
                                rest, found = calls.finish(streaming=True)
                                if rest or found:
                                    yield sse({**chunk, "choices": [choice(rest, None, [], found)]})
                            last = choice(None if chat else "", event[1], [], found)
                            last.get("delta", {}).pop("tool_calls", None)
                            yield sse({**chunk, "choices": [last]})
                            if with_usage:
                                yield sse({**chunk, "choices": [], "usage": event[2]})
                        else:
                            yield sse({"error": {"message": event[1], "type": "server_error"}})
                            return
                    yield "data: [DONE]\n\n"
                finally:
                    if not job.finished:
                        job.cancelled.set()  # the client left: free the pipeline

            return StreamingResponse(events(), media_type="text/event-stream")

        text, finish, usage = [], None, None
        scored: list[dict[str, Any]] = []
        async for event in job.stream(request.is_disconnected):
            if event[0] == "text":
                text.append(event[1])
                scored.extend(event[2])
            elif event[0] == "done":
                finish, usage = event[1], event[2]
            else:
                return error(event[2], f"Generation failed: {event[1]}", "server_error")
        if not job.finished:
            return error(499, "The client closed the request.", "invalid_request_error")
        content, tool_calls = "".join(text), None
        if calls is not None:
            calls.feed(content)
            content, tool_calls = calls.finish(streaming=False)
        return {**base, "choices": [choice(content, finish, scored, tool_calls)], "usage": usage}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request, body: ChatRequest) -> Any:
        refused = _unsupported_chat(body, tokenizer)
        if refused is not None:
            return error(400, refused[1], "invalid_request_error", refused[0])
        tools = body.tools if body.tools and body.tool_choice != "none" else None
        messages = [_template_message(m) for m in body.messages]
        try:
            # In a worker thread: a long prompt must not stop /health answering.
            prompt = list(
                await run_in_threadpool(
                    tokenizer.apply_chat_template,
                    messages,
                    add_generation_prompt=True,
                    tokenize=True,
                    **({"tools": tools} if tools else {}),
                )
            )
        except Exception as e:
            return error(
                400,
                f"The chat template could not render these messages: {e}",
                "invalid_request_error",
                "messages",
            )
        job = check(body, prompt, body.max_completion_tokens or body.max_tokens)
        if not isinstance(job, Job):
            return job
        if body.logprobs:
            job.logprobs = body.top_logprobs or 0
        calls = _ToolCalls(tokenizer, tools) if tools else None
        return await respond(request, body, job, True, calls)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request, body: CompletionRequest) -> Any:
        if body.echo:
            return error(
                400, "'echo' is not supported by this server.", "invalid_request_error", "echo"
            )
        raw = body.prompt
        if isinstance(raw, list) and raw and isinstance(raw[0], str):
            if len(raw) != 1:
                return error(
                    400,
                    "This server takes one prompt per request.",
                    "invalid_request_error",
                    "prompt",
                )
            raw = raw[0]
        if isinstance(raw, str):
            bos = getattr(tokenizer, "bos_token", None)
            try:
                prompt = await run_in_threadpool(
                    tokenizer.encode, raw, add_special_tokens=bos is None or not raw.startswith(bos)
                )
            except Exception as e:  # a lone surrogate, say: the client's text, not a fault
                return error(
                    400,
                    f"The prompt could not be tokenized: {e}",
                    "invalid_request_error",
                    "prompt",
                )
        else:
            prompt = [int(t) for t in raw]
        job = check(body, list(prompt), body.max_tokens)
        if not isinstance(job, Job):
            return job
        job.logprobs = body.logprobs
        return await respond(request, body, job, False)

    return app


class _Guard:
    """Refuse what a request may not do before its body is read: a body over
    the size limit (413), a ``/v1`` request without the API key (401)."""

    def __init__(
        self,
        app: Any,
        *,
        max_body_bytes: int,
        api_key: str | None,
        allowed_hosts: tuple[str, ...] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.allowed_hosts is not None:
            host = _host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed_hosts:
                await _refuse(
                    send,
                    400,
                    f"This server does not answer for host '{host}' (see --allowed-hosts).",
                    "invalid_request_error",
                    "invalid_host",
                )
                return
        if self.api_key is not None and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}"):
                await _refuse(
                    send,
                    401,
                    "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                    "invalid_request_error",
                    "invalid_api_key",
                )
                return
        limit = self.max_body_bytes
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > limit:
            await _refuse(send, 413, _too_large(limit), "invalid_request_error", "body_too_large")
            return
        seen = 0
        refused = False

        async def counted() -> Any:
            # A body without a length (chunked) is counted as it comes.
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    raise _BodyTooLarge
            return message

        started = False

        async def sending(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _BodyTooLarge:
            if not started:
                await _refuse(
                    send, 413, _too_large(limit), "invalid_request_error", "body_too_large"
                )
        except Exception:
            if not refused:
                raise
            if not started:
                await _refuse(
                    send, 413, _too_large(limit), "invalid_request_error", "body_too_large"
                )


def _host_name(host: str) -> str:
    """The name in a Host header, without the port (``[::1]:80`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def default_hosts(listen: str) -> tuple[str, ...] | None:
    """The Host names a server listening on ``listen`` answers by default: a
    loopback listener only its own names, any other listener any name."""
    loopback = ("127.0.0.1", "localhost", "::1")
    return loopback if listen in loopback else None


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> str:
    return (
        f"The request body is larger than this server takes ({limit} bytes; see --max-body-bytes)."
    )


async def _refuse(send: Any, status: int, message: str, kind: str, code: str) -> None:
    body = json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _JSONByDefault:
    """Read a POST body without a content type as JSON, as OpenAI's API does."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = list(scope["headers"])
            if not any(name == b"content-type" for name, _ in headers):
                headers.append((b"content-type", b"application/json"))
                scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


def _unsupported_chat(body: ChatRequest, tokenizer: Any) -> tuple[str, str] | None:
    """The field and message of the first thing this request asks that the server
    cannot do (answered with a 400, rather than silently ignored)."""
    for i, m in enumerate(body.messages):
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                kind = part.get("type")
                if kind != "text":
                    return (
                        f"messages.{i}.content.{j}.type",
                        f"This server takes text only; got a '{kind}' content part.",
                    )
    kind = (body.response_format or {}).get("type", "text")
    if kind != "text":
        return (
            "response_format",
            f"Structured output ('{kind}') is not supported by this server; ask for text.",
        )
    if body.tools:
        if not getattr(tokenizer, "has_tool_calling", False):
            return (
                "tools",
                "This model's chat template has no tool calling; send the request without 'tools'.",
            )
        if body.tool_choice not in (None, "auto", "none"):
            return (
                "tool_choice",
                "This server lets the model choose its tools: 'tool_choice' takes 'auto' or 'none'.",
            )
    return None


def _template_message(m: Message) -> dict[str, Any]:
    """A message as chat templates take it: text content, and tool-call
    arguments as objects (clients send them as JSON strings)."""
    out = {**m.model_dump(exclude_none=True), "content": _text_of(m.content)}
    for call in out.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except ValueError:
                pass  # the template gets the string as it came
    return out


def _logprobs(scored: list[dict[str, Any]] | None, chat: bool) -> dict[str, Any]:
    """Log probabilities in the OpenAI shape of each endpoint."""
    scored = scored or []
    if chat:

        def item(e: dict[str, Any]) -> dict[str, Any]:
            t = e["token"]
            return {"token": t, "logprob": e["logprob"], "bytes": list(t.encode())}

        return {
            "content": [{**item(e), "top_logprobs": [item(t) for t in e["top"]]} for e in scored]
        }
    return {
        "tokens": [e["token"] for e in scored],
        "token_logprobs": [e["logprob"] for e in scored],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top"]} for e in scored],
    }


class _ToolCalls:
    """Tool calls in the generated text, found with mlx-lm's parser for the model.

    The text between the template's start and end markers is parsed into
    OpenAI tool calls; what streams out is only the text before a marker.
    """

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]]) -> None:
        self.start: str = tokenizer.tool_call_start
        self.end: str = tokenizer.tool_call_end
        self.parse = tokenizer.tool_parser
        self.tools = tools
        self.text = ""
        self.sent = 0

    def feed(self, piece: str) -> str:
        """Take generated text; return what may go out now."""
        self.text += piece
        at = self.text.find(self.start)
        upto = at if at >= 0 else len(self.text) - _held_back(self.text, [self.start])
        out = self.text[self.sent : max(upto, self.sent)]
        self.sent = max(upto, self.sent)
        return out

    def finish(self, *, streaming: bool) -> tuple[str, list[dict[str, Any]]]:
        """The text (streaming: not yet sent) with the calls taken out, and the calls."""
        rest, at = "", self.sent if streaming else 0
        calls: list[dict[str, Any]] = []
        text = self.text
        while (i := text.find(self.start, at)) >= 0:
            rest += text[at:i]
            j = text.find(self.end, i + len(self.start))
            body = text[i + len(self.start) : j if j >= 0 else len(text)]
            at = j + len(self.end) if j >= 0 else len(text)
            try:
                parsed = self.parse(body, self.tools)
            except ValueError:  # a call cut off by the token limit: keep it as text
                rest += text[i:at]
                continue
            for call in parsed if isinstance(parsed, list) else [parsed]:
                out: dict[str, Any] = {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {
                        "name": call["name"],
                        "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False),
                    },
                }
                if streaming:
                    out["index"] = len(calls)
                calls.append(out)
        rest += text[at:]
        return rest, calls


def _text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
            "or stop what is using it"
        ) from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    model_id: str | None = None,
    max_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    watchdog_timeout: float = 20.0,
    max_queue: int = 64,
    log_level: str = "info",
    limits: Limits | None = None,
    prompt_cache_bytes: int = 1 << 30,
    max_batch: int = 8,
    split: str | list[int] = "auto",
) -> int:
    """Serve ``model`` on this rank; the final rank answers HTTP on ``host:port``.

    Run it on every rank (under ``mlx.launch``, or through ``ppwrap serve
    --ranks N``). Returns when a signal (SIGINT, SIGTERM) stops the final rank,
    after every rank has left the serving loop.
    """
    import mlx.core as mx
    import uvicorn

    from .._load import load
    from .._watchdog import Watchdog

    logging.basicConfig(level=logging.INFO, format="ppwrap serve: %(message)s")
    group = mx.distributed.init()
    # Bind before loading: a port in use fails in a second, not after the load.
    sock = _listen(host, port) if group.rank() == 0 else None
    head, tokenizer = load(model, group=group, split=split)
    if head.stage is not None and head.size > 1:
        log.info(
            "layers per rank %s (rank 0 runs the last ones and the head; split %s)",
            list(head.stage.split),
            split,
        )
    dog = Watchdog(watchdog_timeout, rank=head.rank)
    engine = Engine(
        head,
        tokenizer,
        watchdog=dog,
        heartbeat=min(1.0, watchdog_timeout / 4),
        max_queue=max_queue,
        prompt_cache_bytes=prompt_cache_bytes,
        max_batch=max_batch,
    )
    dog.on_stall = engine.abandon  # answer the clients before the stalled rank exits
    server = None
    if head.is_final:
        name = model_id or Path(model).name
        app = make_app(
            engine,
            tokenizer,
            model_id=name,
            aliases=(model, str(Path(model).resolve())),
            context=context_length(head.config or {}),
            default_max_tokens=max_tokens,
            default_temperature=temperature,
            default_top_p=top_p,
            stall_after=watchdog_timeout / 2,
            limits=limits,
        )
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_keep_alive=30))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: engine.stop())
        log.info("serving %s on http://%s:%d/v1 over %d rank(s)", name, host, port, head.size)
    try:
        engine.run()
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(timeout=10)
    print(f"ppwrap serve: rank {head.rank} stopped", file=sys.stderr, flush=True)
    return 0
