"""benchmarks/chat.py's own workload: its 6-turn conversation with tools renders through the chat core, and its
scripted reply parses into thinking and two tool calls (the end-to-end comparison runs as the benchmark)."""

from __future__ import annotations

from benchmarks.chat import CONVERSATION, TOOLS, chat_core_times


def test_the_benchmark_conversation_renders_and_its_reply_parses(tiny_dir):
    r = chat_core_times(tiny_dir, 2)
    assert r["turns"] == len(CONVERSATION) == 6 and r["tools"] == len(TOOLS) == 3
    assert r["tool_calls_parsed"] == 2 and r["prompt_tokens"] > 100
    assert r["render_ms_p50"] > 0 and r["parse_ms_p50"] > 0
