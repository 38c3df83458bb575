"""Fuzzing the real server (gateway + one engine unit on the local Ray cluster) with hypothesis-generated requests.

Every RPC (DGServe's four, health Check and Watch, reflection, unknown methods) gets well-formed messages with
extreme field values, huge and empty text, raw bytes that are not protobuf, invalid UTF-8 in string fields,
random request-id metadata (also over raw HTTP/2, for the values gRPC's own client refuses to send), short
deadlines and cancelled streams, CONCURRENCY calls in flight at once. No call may end in UNKNOWN, INTERNAL or
UNAVAILABLE; where the outcome is known in advance (bytes that do not decode, a request the gateway's validation
refuses, health, model info, tokenization) it must be exactly that. Afterwards the server is serving, the unit
is idle and the same process, and fixed requests give the same tokens as before the fuzz.

Quick by default (CI, a few hundred calls); `DGSERVE_FUZZ_REQUESTS=10000` runs the full count (and explores new
inputs each run unless `DGSERVE_FUZZ_SEED` fixes them). The test prints `fuzz: N requests in T s, codes {...}`,
the codes per method, and every problem found (grouped, with the calls that showed it).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import socket
import struct
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from dgserve.cluster.gateway.convert import request_bytes_for
from dgserve_client.v1 import dgserve_pb2 as pb
from dgserve_client.v1 import dgserve_pb2_grpc as pb_grpc

from .conftest import MEDIA

REQUESTS = int(os.environ.get("DGSERVE_FUZZ_REQUESTS", "320"))
BATCH = 8  # calls per generated example
CONCURRENCY = 8  # calls in flight at once, each from its own thread
DEADLINE_S = 3.0  # a long valid generation ends in DEADLINE_EXCEEDED instead of stalling the fuzz
# the fixture's max_prompt_tokens 512 and room for images: gRPC's receive limit
MAX_MESSAGE = request_bytes_for(512, 8 * 512, MEDIA)
MAX_TEXT = 10 * 1024 * 1024

SERVICE = "/dgserve.v1.DGServe/"
GENERATE, STREAM, TOKENIZE, INFO = (SERVICE + m for m in ("Generate", "GenerateStream", "Tokenize", "GetModelInfo"))
CHAT, CHAT_STREAM = SERVICE + "Chat", SERVICE + "ChatStream"
CHECK, WATCH = "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"
REFLECT = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
UNKNOWN_METHODS = (SERVICE + "Nope", SERVICE + "generate", "/dgserve.v1.Other/Generate", "/grpc.health.v1.Health/")
REQUEST_TYPES = {GENERATE: pb.GenerateRequest, STREAM: pb.GenerateRequest, TOKENIZE: pb.TokenizeRequest,
                 CHAT: pb.ChatRequest, CHAT_STREAM: pb.ChatRequest,
                 INFO: pb.GetModelInfoRequest, CHECK: health_pb2.HealthCheckRequest,
                 WATCH: health_pb2.HealthCheckRequest, REFLECT: reflection_pb2.ServerReflectionRequest}
STREAMING = (STREAM, WATCH, CHAT_STREAM)

ALLOWED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED", "OUT_OF_RANGE"}
BUSY = {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}  # load-dependent outcomes a known answer may turn into


# -- protobuf wire format by hand (for what the generated classes refuse to write) ------------------------------
def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, data: bytes) -> bytes:
    return tag(number, 2) + varint(len(data)) + data


def decodes(method: str, raw: bytes) -> bool:
    try:
        REQUEST_TYPES[method].FromString(raw)
    except DecodeError:
        return False
    return True


# -- strategies ---------------------------------------------------------------------------------------------------
def rarely(common, rare, one_in: int):
    """`rare` about once in `one_in` draws (for the few huge values), else `common`."""
    return st.integers(0, one_in - 1).flatmap(lambda r: rare if r == 0 else common)


U32 = [0, 1, 2, 6, 31, 32, 33, 48, 255, 256, 511, 512, 513, 1023, 1024, 1025, 32735, 32736, 32767, 32768,
       2**31 - 1, 2**31, 2**32 - 1]
U64 = [0, 1, 12, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]
F64 = [0.0, -0.0, 1.0, -1.0, math.nan, -math.nan, math.inf, -math.inf, 5e-324, -5e-324, 2.2250738585072014e-308,
       1e-300, 1.4e-45, 1e-7, 0.005, 0.1, 0.4, 0.8, 3.4028234663852886e38, 3.5e38, 1e300, 1.7976931348623157e308,
       -1.7976931348623157e308]
u32 = st.one_of(st.sampled_from(U32), st.integers(0, 2**32 - 1))
u64 = st.one_of(st.sampled_from(U64), st.integers(0, 2**64 - 1))
f64 = st.one_of(st.sampled_from(F64), st.floats(), st.floats(0, 2))

SPECIAL = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<mask>", "{{", "{%", "\x00", "\ufeff",
           "\u202e", "\r\n", "\t", "\U0010ffff", "\ufffd"]
texts = st.one_of(
    st.just(""),
    st.text(max_size=40),  # any code point but lone surrogates (those cannot be UTF-8: see bad_utf8)
    st.text(st.characters(max_codepoint=0x9F), max_size=40),  # control characters
    st.lists(st.sampled_from(SPECIAL), max_size=12).map("".join),
    st.text(st.characters(min_codepoint=0x10000), max_size=20),  # 4-byte UTF-8
)


@st.composite
def huge_texts(draw) -> str:
    """Around the byte limit (4096 here) up to 10 MB, in 1- to 4-byte characters."""
    unit = draw(st.sampled_from(["a", "é", "中", "😀", "\x00", " ", "<start_of_turn>"]))
    size = draw(st.sampled_from([4095, 4096, 4097, 1 << 14, 1 << 20, MAX_TEXT]))
    return unit * max(1, size // len(unit.encode()))


any_text = rarely(texts, huge_texts(), 60)
token_lists = st.one_of(
    st.lists(st.integers(0, 1023), min_size=1, max_size=24),  # in the vocabulary (1024 on the tiny model)
    st.lists(u32, max_size=24),
    st.builds(lambda pattern, n: (pattern * n)[:n], st.lists(u32, min_size=1, max_size=3),
              st.sampled_from([512, 513, 10_000, 1_000_000, 2_000_000])),
)
any_tokens = rarely(st.lists(st.integers(0, 1023), min_size=1, max_size=24) | st.lists(u32, max_size=24),
                    token_lists, 20)


POSITIVE = [5e-324, 1e-300, 1e-45, 1e-7, 1e300, 3.5e38, 1.7976931348623157e308, math.inf]  # valid, but extreme
KNOBS = ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
         "confidence_threshold")
PLAUSIBLE = {  # values the gateway accepts (mostly): these requests reach the engine
    "max_new_tokens": st.integers(1, 96) | st.sampled_from([1, 31, 32, 33, 32736, 2**32 - 1]),
    "max_denoising_steps": st.integers(1, 8) | st.sampled_from([1, 1024]),
    "entropy_bound": st.floats(1e-3, 10) | st.sampled_from(POSITIVE),
    "t_min": st.floats(0, 1) | st.sampled_from([0.0, -0.0, 5e-324, 1e-300]),
    "t_max": st.floats(0.5, 2) | st.sampled_from(POSITIVE),
    "stability_threshold": st.integers(0, 4) | st.sampled_from([2**32 - 1]),
    "confidence_threshold": st.floats(1e-4, 10) | st.sampled_from(POSITIVE),
}
EXTREME = {k: f64 if k in ("entropy_bound", "t_min", "t_max", "confidence_threshold") else u32 for k in KNOBS}


@st.composite
def sampler_params(draw, plausible: bool) -> pb.SamplerParams | None:
    if draw(st.integers(0, 3)) == 0:
        return None
    values = PLAUSIBLE if plausible else EXTREME
    fields = {k: draw(st.none() | values[k]) for k in KNOBS}
    return pb.SamplerParams(**{k: v for k, v in fields.items() if v is not None})


def seed_and_sampler(draw, msg, plausible: bool) -> None:
    """A seed and sampler knobs, maybe, on a Generate or Chat request."""
    s = draw(st.none() | (st.integers(0, 2**63 - 1) if plausible else u64))
    if s is not None:
        msg.seed = s
    sampler = draw(sampler_params(plausible))
    if sampler is not None:
        msg.sampler.CopyFrom(sampler)


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    """Half plausible (a short prompt, values the gateway accepts), half anything."""
    msg, plausible = pb.GenerateRequest(), draw(st.booleans())
    prompt = draw(st.sampled_from(["text", "token_ids", "token_ids"] + ([] if plausible else ["none"])))
    if prompt == "text":
        msg.text = draw(st.text(min_size=1, max_size=40) if plausible else any_text)
    elif prompt == "token_ids":
        msg.token_ids.ids.extend(draw(st.lists(st.integers(0, 1023), min_size=1, max_size=24) if plausible
                                      else any_tokens))
    seed_and_sampler(draw, msg, plausible)
    msg.stream_drafts, msg.thinking = draw(st.booleans()), draw(st.booleans())
    return msg


ROLE_NAMES = ["system", "user", "assistant", "tool", "model", "", "User", "developer"]
SCHEMAS = ['{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}', "", "{}",
           '{"type": "string"}', '{"type": 5}', "{oops", "[]", '{"properties": {"a": {"type": "strng"}}}']


@st.composite
def chat_requests(draw) -> pb.ChatRequest:
    """Half plausible (a short conversation the chat core accepts, maybe with a tool round), half anything."""
    msg, plausible = pb.ChatRequest(), draw(st.booleans())
    if plausible:
        msg.messages.add(role="user", content=draw(st.text(min_size=1, max_size=40)))
        if draw(st.booleans()):
            m = msg.messages.add(role="assistant")
            m.tool_calls.add(id="c1", name="get_weather", arguments_json='{"city": "Paris"}')
            msg.messages.add(role="tool", tool_call_id="c1", content=draw(st.text(max_size=20)))
            msg.tools.add(name="get_weather", description="weather", parameters_json=SCHEMAS[0])
    else:
        for _ in range(draw(st.integers(0, 4))):
            m = msg.messages.add(role=draw(st.sampled_from(ROLE_NAMES) | texts), content=draw(any_text),
                                 tool_call_id=draw(st.sampled_from(["", "c1", "c2"]) | texts))
            for _ in range(draw(st.integers(0, 2))):
                m.tool_calls.add(id=draw(st.sampled_from(["c1", "c2", ""]) | texts),
                                 name=draw(st.sampled_from(["get_weather", "f", "bad name"]) | texts),
                                 arguments_json=draw(st.sampled_from(["{}", '{"a": 1}', "[1]", "{x"]) | texts))
        for _ in range(draw(st.integers(0, 2))):
            msg.tools.add(name=draw(st.sampled_from(["get_weather", "f", ""]) | texts), description=draw(texts),
                          parameters_json=draw(st.sampled_from(SCHEMAS) | texts))
    seed_and_sampler(draw, msg, plausible)
    msg.thinking = draw(st.booleans())
    return msg


tokenize_requests = st.builds(lambda text, chat, thinking: pb.TokenizeRequest(text=text, chat=chat, thinking=thinking),
                              any_text, st.booleans(), st.booleans())
health_requests = st.builds(lambda s: health_pb2.HealthCheckRequest(service=s),
                            st.sampled_from(["", "dgserve.v1.DGServe", "grpc.health.v1.Health"]) | texts)
reflection_requests = st.one_of(
    st.builds(lambda s: reflection_pb2.ServerReflectionRequest(list_services=s), texts),
    st.builds(lambda s: reflection_pb2.ServerReflectionRequest(file_by_filename=s),
              st.sampled_from(["dgserve/v1/dgserve.proto", "grpc/health/v1/health.proto"]) | texts),
    st.builds(lambda s: reflection_pb2.ServerReflectionRequest(file_containing_symbol=s),
              st.sampled_from(["dgserve.v1.DGServe", "dgserve.v1.GenerateRequest"]) | texts),
    st.builds(lambda s, n: reflection_pb2.ServerReflectionRequest(file_containing_extension=
                                                                  reflection_pb2.ExtensionRequest(
                                                                      containing_type=s, extension_number=n)),
              texts, st.integers(-2**31, 2**31 - 1)),
    st.builds(lambda s: reflection_pb2.ServerReflectionRequest(all_extension_numbers_of_type=s), texts),
    st.just(reflection_pb2.ServerReflectionRequest()),
)
MESSAGES = {GENERATE: generate_requests(), STREAM: generate_requests(), TOKENIZE: tokenize_requests,
            CHAT: chat_requests(), CHAT_STREAM: chat_requests(),
            INFO: st.just(pb.GetModelInfoRequest()), CHECK: health_requests, WATCH: health_requests,
            REFLECT: reflection_requests}

# Not UTF-8: lone and paired surrogates (CESU-8), overlong forms, code points past U+10FFFF, cut sequences, and
# bytes that never appear in UTF-8.
bad_utf8 = st.one_of(
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=4).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xf0\x80\x80\x80", b"\xf4\x90\x80\x80",
                     b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\xff", b"\xfe\xff", b"\x80", b"a\xc3(", b"\xed\xa0\x80"]),
    st.binary(min_size=1, max_size=40).filter(lambda b: not _utf8(b)),
)


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _mutate(raw: bytes, op: str, where: float, junk: bytes) -> bytes:
    i = min(int(where * len(raw)), max(len(raw) - 1, 0))
    if op == "truncate":
        return raw[:i]
    if op == "flip" and raw:
        return raw[:i] + bytes([raw[i] ^ (junk[0] if junk else 0xFF)]) + raw[i + 1:]
    if op == "insert":
        return raw[:i] + junk + raw[i:]
    if op == "overwrite":
        return raw[:i] + junk + raw[i + len(junk):]
    return raw + junk


# Wire-level oddities: nested groups (past the decoder's depth limit), overlong varints, lengths past the end,
# field number 0, the reserved wire types 6 and 7, a packed list cut mid-varint, wrong wire types for known
# fields, unknown and reserved fields (these decode: unknown fields are kept, not refused).
WIRE = [
    tag(20, 3) * 99 + tag(20, 4) * 99, tag(20, 3) * 101 + tag(20, 4) * 101, tag(20, 3) * 100_000,
    tag(3, 0) + b"\xff" * 10 + b"\x01", tag(3, 0) + b"\xff" * 9 + b"\x01", tag(1, 2) + b"\xff\xff\xff\xff\x0f",
    tag(1, 2) + b"\x05ab", b"\x00\x00", b"\x07", b"\x0e\x01", tag(2, 2) + b"\x03\x0a\x01\xff",
    tag(2, 2) + b"\x02\x0a\x05", tag(4, 0) + b"\x05", tag(3, 2) + b"\x01a", tag(5, 2) + b"\x00",
    tag(7, 2) + b"\x02hi", tag(2**29 - 1, 0) + b"\x01", tag(4, 2) + b"\x06" + tag(3, 1) + b"\xff" * 5,
    tag(4, 2) + varint(9) + tag(3, 1) + struct.pack("<d", math.nan), tag(4, 3) + tag(4, 4), b"\x0b\x0c", b"\x0c",
]


@st.composite
def payloads(draw, method: str) -> bytes:
    """A request's bytes: mostly a well-formed message, else broken in one of several ways."""
    kind = draw(st.sampled_from(["message"] * 9 + ["bad_utf8", "mutated", "random", "wire", "concat", "empty",
                                                   "oversize"]))
    if kind == "oversize":  # past the server's receive limit (rare)
        if draw(st.integers(0, 39)):
            kind = "message"
        else:
            return b"\x0a" + varint(MAX_MESSAGE + 1024) + b"a" * (MAX_MESSAGE + 1024)
    base = draw(MESSAGES[method]).SerializeToString()
    if kind == "message":
        return base
    if kind == "bad_utf8":  # field 1 is a string in every request type with a string field
        return base + length_delimited(1, draw(st.binary(max_size=8)) + draw(bad_utf8) + draw(st.binary(max_size=8)))
    if kind == "mutated":
        return _mutate(base, draw(st.sampled_from(["truncate", "flip", "insert", "overwrite", "append"])),
                       draw(st.floats(0, 1)), draw(st.binary(min_size=1, max_size=12)))
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "wire":
        return (base if draw(st.booleans()) else b"") + draw(st.sampled_from(WIRE))
    if kind == "concat":  # two messages back to back merge into one (later scalars win)
        return base + draw(MESSAGES[method]).SerializeToString()
    return b""


request_ids = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=140),
    st.sampled_from(["", " ", "a" * 128, "a" * 129, "x" * 7000]),
)


@st.composite
def grpc_metadata(draw) -> tuple:
    """What gRPC's client lets through: printable ASCII values, duplicated keys, binary keys."""
    md = [("x-request-id", rid) for rid in draw(st.lists(request_ids, max_size=3))]
    if draw(st.booleans()):
        md.append(("x-request-id-bin", draw(st.binary(max_size=64))))
    if draw(st.booleans()):
        md.append((draw(st.sampled_from(["authorization", "user-agent-x", "grpc-previous-rpc-attempts"])),
                   draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40))))
    return tuple(md)


raw_request_ids = st.one_of(st.binary(max_size=160), st.text(max_size=40).map(lambda s: s.encode("utf-8")),
                            st.sampled_from([b"h\xc3\xa9llo", b"\xff\xfe", b"a\x00b", b"a\r\nb", b"\x7f", b"", b" ",
                                             b"\xe2\x80\xae" * 3, "中文".encode()]))


@dataclass
class Call:
    method: str
    payloads: tuple[bytes, ...]  # one request (several for the bidirectional reflection stream)
    metadata: tuple = ()
    raw_headers: tuple | None = None  # sent over raw HTTP/2 with these x-request-id values instead
    timeout: float = DEADLINE_S
    cancel_after: int | None = None  # streams: the client cancels after this many responses

    def __repr__(self) -> str:
        shown = [p[:60] + (b"...(%d bytes)" % len(p) if len(p) > 60 else b"") for p in self.payloads]
        md = [(k, v[:40] if isinstance(v, str | bytes) else v) for k, v in (self.metadata or ())]
        raw = None if self.raw_headers is None else [h[:40] for h in self.raw_headers]
        return (f"Call({self.method}, {shown}, metadata={md}, raw_headers={raw}, timeout={self.timeout}, "
                f"cancel_after={self.cancel_after})")

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis prints this, not the whole (maybe 10 MB) payload
        p.text(repr(self))


@st.composite
def calls(draw) -> Call:
    method = draw(st.sampled_from([GENERATE, GENERATE, STREAM, STREAM, TOKENIZE, TOKENIZE, INFO, CHECK, REFLECT,
                                   WATCH, CHAT, CHAT_STREAM, "unknown"]))
    if method == "unknown":
        return Call(draw(st.sampled_from(UNKNOWN_METHODS)), (draw(st.binary(max_size=16)),), timeout=DEADLINE_S)
    if method == REFLECT:
        body = tuple(draw(st.lists(payloads(REFLECT), min_size=1, max_size=3)))
    else:
        body = (draw(payloads(method)),)
    timeout = draw(st.sampled_from([DEADLINE_S] * 8 + [0.001, 0.05, 0.3]))
    call = Call(method, body, timeout=min(timeout, 0.5) if method == WATCH else timeout)
    if method in STREAMING:
        call.cancel_after = draw(st.none() | st.integers(0, 3))
    if method != REFLECT and len(body[0]) < 32_000 and draw(st.integers(0, 3)) == 0:
        call.raw_headers = tuple(draw(st.lists(raw_request_ids, max_size=3)))
    else:
        call.metadata = draw(grpc_metadata())
    return call


# -- sending --------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    code: str
    responses: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    details: str = ""


def send(channel: grpc.Channel, address: str, call: Call) -> Outcome:
    if call.raw_headers is not None:
        return send_raw(address, call)
    got = []
    try:
        if call.method == REFLECT:
            it = channel.stream_stream(call.method)(iter(call.payloads), timeout=call.timeout, metadata=call.metadata)
            got = list(it)
            return Outcome("OK", got, dict(it.initial_metadata() or ()))
        if call.method in STREAMING:
            it = channel.unary_stream(call.method)(call.payloads[0], timeout=call.timeout, metadata=call.metadata)
            for msg in it if call.cancel_after != 0 else ():
                got.append(msg)
                if call.cancel_after is not None and len(got) >= call.cancel_after:
                    break
            if call.cancel_after is not None:
                it.cancel()  # too late when the call had ended: then it keeps its own status
            return Outcome(it.code().name, got, dict(it.initial_metadata() or ()), it.details() or "")
        response, c = channel.unary_unary(call.method).with_call(call.payloads[0], timeout=call.timeout,
                                                                 metadata=call.metadata)
        return Outcome("OK", [response], dict(c.initial_metadata() or ()))
    except grpc.RpcError as e:
        md = e.initial_metadata() if hasattr(e, "initial_metadata") else None
        return Outcome(e.code().name, got, dict(md or ()), e.details() or "")


CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


def send_raw(address: str, call: Call) -> Outcome:
    """One call over a raw HTTP/2 connection, with x-request-id header values that gRPC's client would refuse
    (non-ASCII, control characters)."""
    import h2.config
    import h2.connection
    import h2.events

    host, port = address.rsplit(":", 1)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False,
        validate_inbound_headers=False))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", call.method.encode()),
               (b":authority", address.encode()), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
               (b"grpc-timeout", b"%dm" % max(1, int(call.timeout * 1000)))]
    conn.send_headers(sid, headers + [(b"x-request-id", v) for v in call.raw_headers])
    body = b"\x00" + struct.pack(">I", len(call.payloads[0])) + call.payloads[0]  # < the first flow window
    step = conn.max_outbound_frame_size
    for i in range(0, len(body), step):
        conn.send_data(sid, body[i:i + step], end_stream=i + step >= len(body))
    got, data = {}, b""
    with socket.create_connection((host, int(port)), timeout=call.timeout + 10) as s:
        s.sendall(conn.data_to_send())
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                return Outcome("CONNECTION_CLOSED", [], got)
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    got.update({k.decode("latin-1"): v.decode("latin-1") for k, v in ev.headers})
                elif isinstance(ev, h2.events.DataReceived):
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    return Outcome(f"HTTP2_{type(ev).__name__}_{ev.error_code}", [], got)
                elif isinstance(ev, h2.events.StreamEnded):
                    status = int(got.get("grpc-status", -1))
                    return Outcome(CODE_NAMES.get(status, f"STATUS_{status}"), _frames(data), got,
                                   got.get("grpc-message", ""))
            s.sendall(conn.data_to_send())


def _frames(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i + 5 <= len(data):
        n = struct.unpack(">I", data[i + 1:i + 5])[0]
        out.append(data[i + 5:i + 5 + n])
        i += 5 + n
    return out


# -- what each call must get ----------------------------------------------------------------------------------
class Oracle:
    """The answers known in advance, from the gateway's own validation and tokenizer run here."""

    def __init__(self, tiny_dir, topo, info: pb.ModelInfo):
        from dgserve.cluster.gateway.convert import limits_for
        from dgserve.model.config import load_generation_defaults, load_model_config
        from dgserve.model.tokenizer import load_tokenizer

        self.limits = limits_for(load_model_config(tiny_dir), topo.gateway.max_prompt_tokens,
                                 topo.gateway.max_text_bytes)
        assert self.limits.max_text_bytes == info.limits.max_text_bytes == 4096
        self.defaults, self.overrides = load_generation_defaults(tiny_dir), topo.sampler
        self.tokenizer, self.info = load_tokenizer(tiny_dir), info
        from dgserve.model.media import MediaProcessor

        self.media = MediaProcessor.from_checkpoint(tiny_dir)

    def refused(self, msg: pb.GenerateRequest) -> bool:
        """True when the gateway must answer INVALID_ARGUMENT before the request reaches a unit."""
        from dgserve.cluster.gateway.convert import prompt_text, text_prompt_ids, to_request
        from dgserve.model.errors import DGServeError

        try:
            text = prompt_text(msg, self.limits)
            ids = None if text is None else text_prompt_ids(self.tokenizer, msg)
            to_request(msg, "r", ids, self.limits, self.defaults, self.overrides, None)
        except DGServeError:
            return True
        return False

    def chat_refused(self, msg: pb.ChatRequest) -> bool:
        """True when the gateway must answer INVALID_ARGUMENT to a chat before it reaches a unit."""
        from dgserve.cluster.gateway.chat.grpc import chat_prompt
        from dgserve.cluster.gateway.convert import to_request
        from dgserve.model.errors import DGServeError

        try:
            ids, media = chat_prompt(self.tokenizer, self.media, msg, self.limits.max_text_bytes,
                                     self.limits.max_prompt_tokens)
            gen = pb.GenerateRequest(sampler=msg.sampler)
            if msg.HasField("seed"):
                gen.seed = msg.seed
            to_request(gen, "r", ids, self.limits, self.defaults, self.overrides, None, media=media)
        except DGServeError:
            return True
        return False

    def tokenized(self, msg: pb.TokenizeRequest) -> list[int] | None:
        """The ids Tokenize must answer, or None when it must refuse the text."""
        from dgserve.cluster.gateway.convert import check_text
        from dgserve.cluster.gateway.service import _tokenize
        from dgserve.model.errors import DGServeError

        if not msg.text and not msg.chat:
            return []
        try:
            check_text(msg.text, self.limits, "text")
            return _tokenize(self.tokenizer, msg)
        except DGServeError:
            return None


def sent_request_id(call: Call) -> str | None:
    """The x-request-id the server must echo (the last one sent, when usable), or None (it makes one)."""
    if call.raw_headers is not None:
        values = [v.decode("latin-1") for v in call.raw_headers]
    else:
        values = [v for k, v in call.metadata if k == "x-request-id"]
    rid = values[-1] if values else ""
    return rid if 0 < len(rid) <= 128 and rid.isascii() and rid.isprintable() else None


def check(call: Call, out: Outcome, oracle: Oracle) -> list[str]:
    """What is wrong with this outcome (nothing: an empty list)."""
    method, code = call.method, out.code
    problems = []
    allowed = set(ALLOWED)
    if method in (CHECK, WATCH):
        allowed.add("NOT_FOUND")  # the health protocol's answer for an unknown service name
    if method in UNKNOWN_METHODS:
        allowed = {"UNIMPLEMENTED"}
    if code not in allowed:
        return [f"{code} is not an allowed outcome: {out.details[:300]!r}"]
    known = call.timeout >= 1 and not (call.metadata and sum(len(str(v)) for _, v in call.metadata) > 6000)
    if method in UNKNOWN_METHODS or not known:
        return problems
    if code == "CANCELLED" and call.cancel_after is not None:
        return problems
    raw = call.payloads
    if any(len(p) > MAX_MESSAGE for p in raw):
        return [] if code == "RESOURCE_EXHAUSTED" else [f"{code} for a message over the size limit"]
    if not all(decodes(method, p) for p in raw):
        if code != "INVALID_ARGUMENT" or "not a valid protobuf message" not in out.details:
            problems.append(f"{code} for bytes that do not decode (want INVALID_ARGUMENT): {out.details[:200]!r}")
        return problems
    msg = REQUEST_TYPES[method].FromString(raw[0])
    if method in (GENERATE, STREAM):
        problems += check_generate(call, msg, out, oracle)
    elif method in (CHAT, CHAT_STREAM):
        refused = oracle.chat_refused(msg)
        if refused and code not in {"INVALID_ARGUMENT"} | BUSY:
            problems.append(f"{code} for a chat the chat core refuses (want INVALID_ARGUMENT)")
        # (the engine may still refuse what no gateway check sees, e.g. prompt + max_new_tokens past the context,
        # as for Generate; a refusal naming messages or tools is the chat core's own)
        if not refused and code == "INVALID_ARGUMENT" and re.search(r": (messages|tools)\b", out.details):
            problems.append(f"INVALID_ARGUMENT for a chat the chat core accepts: {out.details[:200]!r}")
    elif method == TOKENIZE:
        want = oracle.tokenized(msg)
        if want is None and code not in {"INVALID_ARGUMENT"} | BUSY:
            problems.append(f"{code} for a text the gateway refuses (want INVALID_ARGUMENT)")
        if want is not None and code == "INVALID_ARGUMENT":
            problems.append(f"INVALID_ARGUMENT for a text the gateway accepts: {out.details[:200]!r}")
        if code == "OK" and list(pb.TokenizeResponse.FromString(out.responses[0]).token_ids) != want:
            problems.append("Tokenize answered other ids than the checkpoint's tokenizer")
    elif method == INFO:
        if code != "OK" or pb.ModelInfo.FromString(out.responses[0]) != oracle.info:
            problems.append(f"GetModelInfo: {code}, or another answer than before the fuzz")
    elif method == CHECK:
        serving = msg.service in ("", "dgserve.v1.DGServe")
        if code != ("OK" if serving else "NOT_FOUND"):
            problems.append(f"health Check({msg.service[:40]!r}): {code}")
        elif serving and health_pb2.HealthCheckResponse.FromString(out.responses[0]).status != 1:
            problems.append("health is not SERVING")
    elif method == REFLECT and code != "OK":
        problems.append(f"reflection: {code} for requests that decode")
    return problems


def check_generate(call: Call, msg: pb.GenerateRequest, out: Outcome, oracle: Oracle) -> list[str]:
    code, problems = out.code, []
    if oracle.refused(msg):
        busy = BUSY if msg.WhichOneof("prompt") == "text" else set()  # tokenizing may wait, or be refused
        if code not in {"INVALID_ARGUMENT"} | busy:
            problems.append(f"{code} for a request the gateway's validation refuses (want INVALID_ARGUMENT)")
        return problems
    rid = out.metadata.get("x-request-id")
    want_rid = sent_request_id(call)
    if rid is not None and rid != want_rid and not (want_rid is None and re.fullmatch("[0-9a-f]{32}", rid)):
        problems.append(f"x-request-id {rid!r} came back for {want_rid!r}")
    if code != "OK" or call.cancel_after is not None:
        return problems
    if call.method == GENERATE:
        final = pb.GenerateResponse.FromString(out.responses[0])
        blocks = None
    else:
        events = [pb.GenerateStreamResponse.FromString(r) for r in out.responses]
        if not events or events[-1].WhichOneof("event") != "final":
            return problems + ["a stream that ended OK without a final message"]
        final = events[-1].final
        blocks = [t for e in events if e.HasField("block") for t in e.block.token_ids]
        if any(e.request_id != final.request_id for e in events):
            problems.append("stream messages with different request ids")
    ids = list(final.token_ids)
    canvas, vocab = oracle.info.limits.canvas_length, oracle.info.vocab_size
    if not ids or len(ids) % canvas or max(ids) >= vocab or final.finish_reason not in ("eos", "length"):
        problems.append(f"a result that is not whole blocks of vocabulary ids: {len(ids)} ids, "
                        f"{final.finish_reason!r}")
    if blocks is not None and blocks != ids:
        problems.append("the stream's blocks differ from its final token ids")
    if rid is not None and final.request_id != rid:
        problems.append(f"response request_id {final.request_id!r} != metadata {rid!r}")
    return problems


# -- the fuzz ---------------------------------------------------------------------------------------------------
def unit_status(topo) -> dict:
    from ray import serve

    return serve.get_deployment_handle("EngineUnit", topo.name).status.remote().result()["ranks"][0]


def gateway_status(topo) -> dict:
    from ray import serve

    return serve.get_deployment_handle("Gateway", topo.name).status.remote().result()


FIXED = pb.SamplerParams(max_new_tokens=64, max_denoising_steps=6)


def fixed_results(address: str) -> dict:
    """Fixed valid requests (token ids and a text prompt; unary and streamed): their tokens must not change."""
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.DGServeStub(ch)
        ids = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), seed=1234, sampler=FIXED)
        text = pb.GenerateRequest(text="Hello there", seed=12, sampler=FIXED)
        return {"ids": list(stub.Generate(ids, timeout=60).token_ids),
                "text": list(stub.Generate(text, timeout=60).token_ids),
                "stream": list(list(stub.GenerateStream(ids, timeout=60))[-1].final.token_ids),
                "tokenize": list(stub.Tokenize(pb.TokenizeRequest(text="Hello there", chat=True), timeout=60)
                                 .token_ids)}


def method_name(method: str) -> str:
    return method.removeprefix(SERVICE) if method.count("/") == 2 and method.startswith(SERVICE) else method


def test_fuzz_every_rpc(endpoint, tiny_dir, capsys):
    """Every problem is collected (grouped by method and kind, three examples each) and the run goes on, so one
    run reports all that is wrong; nothing is shrunk (each resend of a batch costs seconds on the real server)."""
    address, _, topo = endpoint
    before = fixed_results(address)
    assert before["ids"] == before["stream"] and len(before["ids"]) == 64
    unit_before = unit_status(topo)
    with grpc.insecure_channel(address) as ch:
        info = pb_grpc.DGServeStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    oracle = Oracle(tiny_dir, topo, info)
    codes: Counter[str] = Counter()
    per_method: Counter[str] = Counter()
    problems: dict[tuple[str, str], list[str]] = {}
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    fixed_seed = os.environ.get("DGSERVE_FUZZ_SEED")
    channel = grpc.insecure_channel(address, options=options)
    pool, lock = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="fuzz"), threading.Lock()
    free = threading.BoundedSemaphore(CONCURRENCY)  # a call is sent as soon as one of CONCURRENCY ends

    def record(call: Call, done) -> None:
        try:
            out = done.result()
            found = check(call, out, oracle)
        except Exception as e:  # the fuzz's own client or checks failed
            out, found = Outcome("CLIENT_ERROR"), [f"the fuzz client failed: {e!r}"]
        with lock:
            codes[out.code] += 1
            per_method[f"{method_name(call.method)} {out.code}"] += 1
            for p in found:
                rid = sent_request_id(call)
                kind = re.sub(r"[0-9a-f]{32}|\d{3,}", "", p.replace(rid, "") if rid else p)[:100]  # ids vary
                problems.setdefault((method_name(call.method), kind), []).append(f"{p}\n      {call!r}")
        free.release()

    @settings(max_examples=math.ceil(REQUESTS / BATCH), deadline=None, database=None, phases=[Phase.generate],
              derandomize=REQUESTS <= 1000 and fixed_seed is None, suppress_health_check=list(HealthCheck))
    @given(st.lists(calls(), min_size=BATCH, max_size=BATCH))
    def fuzz(batch):
        for c in batch:
            free.acquire()
            pool.submit(send, channel, address, c).add_done_callback(lambda done, c=c: record(c, done))

    if fixed_seed is not None:
        fuzz = seed(int(fixed_seed))(fuzz)
    t0 = time.monotonic()
    try:
        fuzz()
    finally:
        pool.shutdown(wait=True)
        took = time.monotonic() - t0
        channel.close()
        report = "".join(f"\n  {method} {kind!r}: {len(seen)} calls, e.g.\n    " + "\n    ".join(seen[:3])
                         for (method, kind), seen in sorted(problems.items()))
        with capsys.disabled():
            print(f"\nfuzz: {codes.total()} requests in {took:.1f}s, codes {dict(codes.most_common())}")
            print(f"fuzz by method: {dict(sorted(per_method.items()))}")
            if problems:
                print(f"fuzz problems:{report}")
    assert codes.total() >= REQUESTS

    # Afterwards: serving, nothing left in flight, the same unit process, the same tokens.
    from tests.cluster.gateway.conftest import health

    assert health(address) == "SERVING"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        unit = unit_status(topo)
        if not unit["slots"] and not unit["request_ids"] and unit["request_bytes"] == 0:
            break
        time.sleep(0.2)
    assert not unit["slots"] and not unit["request_ids"] and unit["request_bytes"] == 0, unit
    assert unit["healthy"] and unit["failure"] is None and unit["pid"] == unit_before["pid"], unit
    assert unit["errors"].get("INTERNAL", 0) == unit_before["errors"].get("INTERNAL", 0), unit["errors"]
    gw = gateway_status(topo)
    assert gw["serving"] and not gw["draining"] and gw["inflight"] == [], gw
    assert fixed_results(address) == before
    assert not problems, report


# -- regressions of the security review ---------------------------------------------------------------------------
MALFORMED = b"\xff\xff\xff"  # field 0x1fffffff... with a cut varint: not a message of any type
BAD_UTF8 = length_delimited(1, b"ab\xed\xa0\x80")  # a lone surrogate (CESU-8) in string field 1


@pytest.mark.parametrize("method", [GENERATE, STREAM, TOKENIZE, INFO, CHECK, WATCH, REFLECT, CHAT, CHAT_STREAM])
@pytest.mark.parametrize("payload", [MALFORMED, BAD_UTF8], ids=["malformed", "bad_utf8"])
def test_bytes_that_do_not_decode_are_invalid_argument_on_every_rpc(endpoint, method, payload):
    if not decodes(method, payload):
        with grpc.insecure_channel(endpoint[0]) as ch:
            out = send(ch, endpoint[0], Call(method, (payload,), timeout=10))
        assert out.code == "INVALID_ARGUMENT" and "not a valid protobuf message" in out.details, out
    else:  # GetModelInfoRequest has no field 1: an unknown field, kept, not refused
        assert method == INFO and payload == BAD_UTF8


@pytest.mark.parametrize(("method", "message"), [
    (GENERATE, pb.GenerateRequest(text="a" * MAX_TEXT, sampler=FIXED)),
    (STREAM, pb.GenerateRequest(text="é" * (MAX_TEXT // 2), sampler=FIXED)),
    (TOKENIZE, pb.TokenizeRequest(text="a" * MAX_TEXT)),
    (TOKENIZE, pb.TokenizeRequest(text="中" * (MAX_TEXT // 3), chat=True)),
])
def test_a_10_mb_text_is_refused_unread_by_the_message_size_limit(endpoint, method, message):
    """The message limit is what the largest valid prompt needs, so gRPC drops a 10 MB one before reading it."""
    t0 = time.monotonic()
    with grpc.insecure_channel(endpoint[0], options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        out = send(ch, endpoint[0], Call(method, (message.SerializeToString(),), timeout=30))
    assert out.code == "RESOURCE_EXHAUSTED" and "larger than max" in out.details, out
    assert time.monotonic() - t0 < 10  # tokenizing 10 MB took 12-20 s


@pytest.mark.parametrize(("method", "message"), [
    (GENERATE, pb.GenerateRequest(text="a" * (8 * 512 + 1), sampler=FIXED)),
    (STREAM, pb.GenerateRequest(text="é" * (4 * 512 + 1), sampler=FIXED)),
    (TOKENIZE, pb.TokenizeRequest(text="a" * (MAX_MESSAGE - 1024))),
    (TOKENIZE, pb.TokenizeRequest(text="中" * 2000, chat=True)),
])
def test_a_text_over_the_byte_limit_is_refused_untokenized_naming_max_text_bytes(endpoint, method, message):
    with grpc.insecure_channel(endpoint[0]) as ch:
        out = send(ch, endpoint[0], Call(method, (message.SerializeToString(),), timeout=30))
    assert out.code == "INVALID_ARGUMENT" and "gateway.max_text_bytes" in out.details, out


def test_without_strict_decoding_grpc_answers_malformed_bytes_with_unknown():
    """Why the gateway has the StrictDecoding interceptor (and why the fuzz can fail): on a plain grpc.aio
    server, bytes that do not decode end the call with UNKNOWN; with the interceptor, INVALID_ARGUMENT. A
    unary, a server-streaming and a bidirectional (reflection) method each."""
    from grpc_reflection.v1alpha import reflection

    from dgserve.cluster.gateway.security import StrictDecoding

    class Scripted(pb_grpc.DGServeServicer):
        async def Tokenize(self, request, context):
            return pb.TokenizeResponse(token_ids=[len(request.text)])

        async def GenerateStream(self, request, context):
            yield pb.GenerateStreamResponse(request_id="r")

    async def codes(interceptors) -> list[str]:
        server = grpc.aio.server(interceptors=interceptors)
        pb_grpc.add_DGServeServicer_to_server(Scripted(), server)
        reflection.enable_server_reflection(("dgserve.v1.DGServe", reflection.SERVICE_NAME), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        out = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                good = pb.TokenizeRequest(text="abc").SerializeToString()
                assert await ch.unary_unary(TOKENIZE)(good, timeout=10) == b"\x0a\x01\x03"
                for call in (ch.unary_unary(TOKENIZE)(MALFORMED, timeout=10),
                             _drain(ch.unary_stream(STREAM)(BAD_UTF8, timeout=10)),
                             _drain(ch.stream_stream(REFLECT)(iter([MALFORMED]), timeout=10))):
                    try:
                        await call
                        out.append("OK")
                    except grpc.RpcError as e:
                        out.append(e.code().name)
        finally:
            await server.stop(None)
        return out

    assert asyncio.run(codes([])) == ["UNKNOWN"] * 3
    assert asyncio.run(codes([StrictDecoding()])) == ["INVALID_ARGUMENT"] * 3


async def _drain(call):
    return [m async for m in call]


@pytest.mark.parametrize("value", ["héllo".encode(), "中".encode(), b"\xa1", b"\xff\xfe", b"a\x00b"])
def test_a_request_id_that_is_not_printable_ascii_is_replaced_not_echoed(endpoint, value):
    """gRPC refuses to send a header value that is not printable ASCII: echoing such an x-request-id (only a raw
    HTTP/2 client can send one) failed the call with INTERNAL 'Invalid metadata'."""
    for method, body in ((INFO, b""), (GENERATE, b"")):
        out = send_raw(endpoint[0], Call(method, (body,), raw_headers=(value,), timeout=10))
        assert out.code == ("OK" if method == INFO else "INVALID_ARGUMENT"), out
        assert re.fullmatch("[0-9a-f]{32}", out.metadata.get("x-request-id", "")), out


def test_a_huge_stability_threshold_fails_neither_itself_nor_its_neighbours(endpoint):
    """The API allows stability_threshold up to 2**32-1; the sampler kept a [threshold, canvas] history, so such a
    request asked for 1 TiB and the engine step failed with INTERNAL for every request in it."""
    innocent = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), stream_drafts=True,
                                  sampler=pb.SamplerParams(max_new_tokens=128, max_denoising_steps=48))
    huge = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]), sampler=pb.SamplerParams(
        max_new_tokens=32, max_denoising_steps=2, stability_threshold=2**32 - 1))
    with grpc.insecure_channel(endpoint[0]) as ch:
        stub = pb_grpc.DGServeStub(ch)
        running = stub.GenerateStream(innocent, timeout=120)
        assert next(running).HasField("draft")  # running: the huge request joins its steps
        try:
            stub.Generate(huge, timeout=60)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
        assert list(running)[-1].final.finish_reason in ("eos", "length")
