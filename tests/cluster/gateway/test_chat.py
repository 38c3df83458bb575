"""The chat core: requests rendered in MODEL_SPEC section 6's format by the checkpoint's chat template (its
written examples), replies split into thinking, answer and tool calls as blocks stream, and bad requests refused
naming the field."""

from __future__ import annotations

import pytest

from dgserve.cluster.gateway.chat import ReplyParser, parse_conversation, render_ids
from dgserve.cluster.gateway.chat.values import parse_call, parse_object
from dgserve.model.errors import InputError
from dgserve.model.tokenizer import chat_prompt_ids, load_tokenizer

LIST_DIR = {"type": "function", "function": {
    "name": "list_dir", "description": "List a folder",
    "parameters": {"type": "object", "properties": {"path": {"type": "string", "description": "Folder"}},
                   "required": ["path"]}}}


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


def rendered(tok, messages, tools=None, thinking=False) -> str:
    return tok.decode(render_ids(tok, parse_conversation(messages, tools, thinking)), skip_special_tokens=False)


def test_one_user_turn_renders_as_the_plain_prompt_does(tok):
    msgs = [{"role": "user", "content": "Hello there"}]
    assert render_ids(tok, parse_conversation(msgs)) == chat_prompt_ids(tok, "Hello there")
    assert rendered(tok, msgs).endswith("<|turn>user\nHello there<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")


def test_system_and_thinking_follow_the_format(tok):
    text = rendered(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], thinking=True)
    assert text.endswith("<|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")


def test_tools_calls_and_results_render_as_model_spec_writes_them(tok):
    msgs = [{"role": "user", "content": "What is in /tmp?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "list_dir", "arguments": '{"path": "/tmp"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "a.txt\nb.txt"}]
    text = rendered(tok, msgs, [LIST_DIR])
    assert ('<|tool>declaration:list_dir{description:<|"|>List a folder<|"|>,parameters:{properties:{path:{'
            'description:<|"|>Folder<|"|>,type:<|"|>STRING<|"|>}},required:[<|"|>path<|"|>],type:<|"|>OBJECT<|"|>}}'
            '<tool|>') in text
    assert text.endswith('<|turn>model\n<|tool_call>call:list_dir{path:<|"|>/tmp<|"|>}<tool_call|>'
                         '<|tool_response>response:list_dir{value:<|"|>a.txt\nb.txt<|"|>}<tool_response|>')


def test_earlier_thoughts_are_not_sent_back(tok):
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<|channel>thought\nfour, surely<channel|>4"},
            {"role": "user", "content": "and 3+3?"}]
    text = rendered(tok, msgs, thinking=True)
    assert "four, surely" not in text and "<|turn>model\n4<turn|>" in text


def feed_all(parts: list[str]) -> tuple[ReplyParser, list[list]]:
    p = ReplyParser("r")
    steps = [p.feed(x) for x in parts]
    steps.append(p.finish())
    return p, steps


def test_a_reply_splits_into_thinking_answer_and_a_call_across_blocks():
    p, steps = feed_all(["<|channel>tho", "ught\nLet me look.<channel|>Sure. <|tool_",
                         'call>call:list_dir{path:<|"|>/t', 'mp<|"|>,depth:2,all:true}<tool_call|><turn|>ignored'])
    r = p.reply
    assert r.thinking == "Let me look." and r.content == "Sure. " and r.malformed_calls == 0
    assert [(c.id, c.name, c.arguments) for c in r.tool_calls] == [("r-1", "list_dir", {"path": "/tmp", "depth": 2,
                                                                                        "all": True})]
    calls_per_step = [sum(x.kind == "tool_call" for x in s) for s in steps]
    assert calls_per_step == [0, 0, 0, 1, 0]  # emitted once, when its closing marker arrived
    assert steps[1][0].kind == "thinking" and p.ended


def test_plain_answers_stream_per_block_and_a_held_back_marker_prefix_is_not_lost():
    p, steps = feed_all(["Paris is", " the capital.<tu", "rn|>"])
    assert p.reply.content == "Paris is the capital." and [x.text for s in steps for x in s] == [
        "Paris is", " the capital."]


@pytest.mark.parametrize("body", ["call:bad name{x:1}", "call:f{x:}", "call:f{x:<|\"|>open}", "nocall"])
def test_a_malformed_call_comes_back_as_flagged_text(body):
    p, _ = feed_all([f"Trying <|tool_call>{body}<tool_call|> then"])
    assert p.reply.tool_calls == [] and p.reply.malformed_calls == 1
    assert f"<|tool_call>{body}<tool_call|>" in p.reply.content and p.reply.content.endswith(" then")


def test_an_unclosed_call_at_the_end_is_flagged_text():
    p, _ = feed_all(['<|tool_call>call:f{a:<|"|>x'])
    assert p.reply.tool_calls == [] and p.reply.malformed_calls == 1 and p.reply.content.startswith("<|tool_call>")


def test_gemma_values_parse_to_json():
    assert parse_object('{a:<|"|>x, y<|"|>,b:-1.5e2,c:[1,<|"|>z<|"|>,{d:null}],e:false}') == {
        "a": "x, y", "b": -150.0, "c": [1, "z", {"d": None}], "e": False}
    assert parse_call("call:get_weather{city:<|\"|>Paris<|\"|>}") == ("get_weather", {"city": "Paris"})
    for bad in ("{a:1,}", "{a 1}", "{a:1}x", '{a:<|"|>x}'):
        with pytest.raises(ValueError):
            parse_object(bad)


@pytest.mark.parametrize(("messages", "tools", "field"), [
    ([{"role": "robot", "content": "x"}], None, "messages[0].role"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c9", "content": "r"}], None, "messages[1]"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "c2", "content": "r"}], None, "messages[2].tool_call_id"),
    ([{"role": "user", "content": "x"}], [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strng"}}}}}],
     "tools[0].function.parameters"),
    ([{"role": "user", "content": "bad \ud800 text"}], None, "messages[0].content"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}], None,
     "messages[1].tool_calls[0].function.arguments"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "late"}], None, "messages[1].role"),
    ([], None, "messages"),
])
def test_bad_requests_are_refused_naming_the_field(messages, tools, field):
    with pytest.raises(InputError) as e:
        parse_conversation(messages, tools)
    assert e.value.field == field


def test_an_over_long_history_is_refused(tok):
    conv = parse_conversation([{"role": "user", "content": "word " * 400}])
    with pytest.raises(InputError, match=r"messages: the conversation is \d+ tokens with its template; the limit"):
        render_ids(tok, conv, max_tokens=64)
