"""Parts of ppwrap serve on their own: tool calls found with mlx-lm's parser, as OpenAI
returns them; Host header names."""

import json

import pytest
from mlx_lm.tool_parsers import json_tools

pytest.importorskip("fastapi")

from ppwrap.serve.app import _ToolCalls  # noqa: E402


class Tokenizer:
    tool_call_start = json_tools.tool_call_start
    tool_call_end = json_tools.tool_call_end
    tool_parser = staticmethod(json_tools.parse_tool_call)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
TEXT = (
    'Let me look.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
)


def test_a_whole_answer_splits_into_text_and_openai_tool_calls():
    calls = _ToolCalls(Tokenizer(), TOOLS)
    calls.feed(TEXT)
    text, found = calls.finish(streaming=False)
    assert text == "Let me look."
    assert [c["function"]["name"] for c in found] == ["get_weather", "get_weather"]
    assert [json.loads(c["function"]["arguments"]) for c in found] == [
        {"city": "Paris"},
        {"city": "Oslo"},
    ]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in found)
    assert "index" not in found[0]


def test_a_stream_never_sends_a_marker_and_indexes_the_calls():
    calls = _ToolCalls(Tokenizer(), TOOLS)
    sent = "".join(calls.feed(TEXT[i : i + 3]) for i in range(0, len(TEXT), 3))
    assert sent == "Let me look."
    rest, found = calls.finish(streaming=True)
    assert rest == "" and [c["index"] for c in found] == [0, 1]


def test_a_call_cut_off_by_the_token_limit_stays_text():
    calls = _ToolCalls(Tokenizer(), TOOLS)
    calls.feed('ok <tool_call>{"name": "get_wea')
    text, found = calls.finish(streaming=False)
    assert found == [] and text == 'ok <tool_call>{"name": "get_wea'


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("LocalHost", "localhost"),
        ("::1", "::1"),
    ],
)
def test_the_host_name_is_read_without_its_port(header, name):
    from ppwrap.serve.app import _host_name

    assert _host_name(header) == name
