"""The chat core (no torch): requests checked and rendered with the checkpoint's chat template (messages.py), and
replies split into thinking, answer and tool calls as blocks stream (reply.py), shared by gRPC and HTTP."""

from .messages import Conversation, Message, Tool, parse_conversation, render_ids, strip_thoughts
from .reply import Piece, Reply, ReplyParser, ToolCall

__all__ = ["Conversation", "Message", "Piece", "Reply", "ReplyParser", "Tool", "ToolCall", "parse_conversation",
           "render_ids", "strip_thoughts"]
