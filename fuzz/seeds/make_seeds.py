#!/usr/bin/env python3
"""Writes seed inputs for every fuzz target into fuzz/corpus/<target>/ (then `cargo fuzz cmin`
keeps the ones that add coverage). Seeds are the JSON bodies, SSE streams and configs the
core's own tests use (string literals lifted from core/src), wrapped in each target's input
layout (see fuzz/harness.rs). Run from anywhere: python3 fuzz/seeds/make_seeds.py [output dir, default fuzz/corpus]"""

import hashlib
import pathlib
import re
import struct
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORPUS = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "fuzz" / "corpus"

RAW = re.compile(r'b?r(#+)"(.*?)"\1', re.S)
PLAIN = re.compile(r'b?"((?:[^"\\]|\\.)*)"', re.S)
CONCAT = re.compile(r"concat!\((.*?)\)\s*;", re.S)


def unescape(s):
    return (s.replace("\\\n", "").replace("\\n", "\n").replace("\\r", "\r")
            .replace("\\t", "\t").replace('\\"', '"').replace("\\\\", "\\"))


def literals(text):
    out = [m.group(2) for m in RAW.finditer(text)]
    for m in CONCAT.finditer(text):
        parts = []
        for lit in re.finditer(r'b?r(#+)"(.*?)"\1|b?"((?:[^"\\]|\\.)*)"', m.group(1), re.S):
            parts.append(lit.group(2) if lit.group(2) is not None else unescape(lit.group(3)))
        out.append("".join(parts))
    out += [unescape(m.group(1)) for m in PLAIN.finditer(text) if "data:" in m.group(1)]
    return out


texts = []
for path in sorted((ROOT / "core" / "src").rglob("*.rs")):
    texts += literals(path.read_text())
jsons = sorted({t.strip().encode() for t in texts if t.strip().startswith("{") and len(t) < 6000})
sse = sorted({t.encode() for t in texts if "data:" in t and len(t) < 12000})
configs = sorted({t.encode() for t in texts if ("consumers:" in t or "providers:" in t) and len(t) < 8000})
configs += [p.read_bytes() for p in sorted((ROOT / "envoy-config").glob("*.yaml"))
            if "static_resources" not in p.read_text()]

chat = [j for j in jsons if b'"messages"' in j and b'"max_tokens"' not in j or b'"role"' in j]
messages_req = [j for j in jsons if b'"max_tokens"' in j and b'"messages"' in j]
completions = [j for j in jsons if b'"choices"' in j or b'"usage"' in j]
anthropic_bodies = [j for j in jsons if b'"type"' in j]
errors = [j for j in jsons if b'"error"' in j]


def write(target, blobs):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    n = 0
    for b in blobs:
        (d / ("seed-" + hashlib.sha1(b).hexdigest())).write_bytes(b)
        n += 1
    print(f"{target}: {n} seeds")


plans = [b"\x00", b"\x01\x01", b"\x03\x07\x00\x1d", b"\x02\x40\x05"]
write("sse", [p + s for s in sse for p in plans])
write("openai_usage", completions + [s for t in sse for s in t.split(b"data: ")[1:]][:200])
write("openai_wire", [bytes([f]) + j for j in chat for f in (0, 15)])
write("config_load", [bytes([m]) + c for c in configs for m in (1, 2)])
prompt_bodies = [b"{}", b'{"s":"hi"}', b'{"text":"a","lang":"de","tags":["x","y"],"score":1.5,"strict":true}',
                 b'{"text":"}}{{text}}","tags":[]}', b'{"n":3,"e":"a"}', b' \n', b'{"text":1}']
write("prompt_render",
      [bytes([m]) + b for b in prompt_bodies for m in (0x00, 0x11, 0x20, 0x21)]
      + [bytes([m]) + b for m in (0x12, 0x02, 0x22) for b in (b"Hi {{ s }} and {{text}}", b"{{lang}}{{", b"2", b"7")]
      + [b"\x03" + c for c in completions[:40]]
      + [b"\x03" + s for t in sse[:20] for s in t.split(b"data: ")[1:2]])
sig_lines = [b"20", b"1.5", b"250", b"Sun, 06 Nov 1994 08:49:37 GMT", b"6m0s", b"1h2m3.5s", b"20ms",
             b"2026-11-22T10:00:05Z", b"2026-11-22T10:00:05.250+01:00", b"99", b"0", b"1s",
             b"2026-11-22T10:00:05Z", b"2026-11-22 10:00:05-05:30"]
now = struct.pack("<QQQ", 1_795_341_600_000, 1_000, 3_600_000)
write("signals", [now + b"\n".join(sig_lines), now + b"\n".join(reversed(sig_lines)),
                  now + b"\n" * 2 + b"Wed, 21 Oct 2015 07:28:00 GMT", now + b"\n" * 5 + b"1.5us"])
write("anthropic_provider",
      [b"\x00\x10" + j for j in chat]
      + [b"\x01\x00" + j for j in anthropic_bodies]
      + [b"\x02\x00" + j for j in errors]
      + [b"\x03" + bytes([i]) + p + s for s in sse for p in plans[:2] for i in (0, 1)])
write("anthropic_client",
      [b"\x00\x00" + j for j in messages_req]
      + [b"\x01\x00" + j for j in messages_req]
      + [b"\x02\x00" + j for j in completions]
      + [b"\x03\x01" + j for j in messages_req[:20]]
      + [b"\x04\x3f" + j for j in messages_req[:20]]
      + [b"\x05\x00" + p + s for s in sse for p in plans[:2]]
      + [b"\x06\x1d" + s for s in sse[:30]] + [b"\x06\x00" + e for e in errors])
write("refusal", [struct.pack("<H", s) + e for e in errors for s in (400, 429, 402, 503, 529)])

# exchange: control bytes, request headers, path suffix, body, response headers, chunks.
# The status is read as 100 + (u16 % 500).
SEP = b"\xff"


def st(status):
    return bytes([(status - 100) & 0xFF, (status - 100) >> 8])

openai_sse = [s for s in sse if b"chat.completion.chunk" in s or b'"choices"' in s]
anth_sse = [s for s in sse if b"message_start" in s]
resp_heads = [b"content-type: application/json",
              b"content-type: text/event-stream\nx-ratelimit-remaining-tokens: 10\nretry-after: 2",
              b"content-type: text/html",
              b"x-tollgate-local-reply: provider 429\nretry-after-ms: 300"]
ex = []
PATHS = 12
for body in chat[:30]:
    for model in (b"gpt", b"claude", b"mock-gpt"):
        b = re.sub(rb'"model":\s*"[^"]*"', b'"model":"' + model + b'"', body)
        for stream in (False, True):
            bb = b.replace(b'{"model"', b'{"stream":true,"model"', 1) if stream else b
            chunk = (openai_sse if model != b"claude" else anth_sse) if stream else (completions if model != b"claude" else anthropic_bodies)
            chunk = chunk[len(ex) % max(1, len(chunk))] if chunk else b""
            ctrl = bytes([0, 0, len(ex) % 3, 3]) + st(200) + b"\x01"
            ex.append(SEP.join([ctrl, b"content-type: application/json", b"", bb, resp_heads[len(ex) % 2], chunk[: len(chunk) // 2], chunk[len(chunk) // 2:]]))
for body in messages_req[:20]:
    b = re.sub(rb'"model":\s*"[^"]*"', b'"model":"claude"', body)
    ex.append(SEP.join([bytes([1, 0, 1, 2]) + st(200) + b"\x00", b"anthropic-version: 2023-06-01", b"", b, resp_heads[0], anthropic_bodies[0] if anthropic_bodies else b""]))
    b = re.sub(rb'"model":\s*"[^"]*"', b'"model":"gpt"', body)
    ex.append(SEP.join([bytes([1, 0, 0, 0]) + st(200) + b"\x00", b"", b"", b, resp_heads[1]] + (openai_sse[:1] or [b""])))
    ex.append(SEP.join([bytes([2, 0, 0, 0]) + st(200) + b"\x00", b"", b"", b]))
for p, body in [(3, b'{"text":"hi"}'), (4, b'{"text":"hi"}'), (5, b'{}'), (6, b'{"text":"echo"}'), (7, b""), (8, b"")]:
    for stream in (b"", b"?stream=true", b"?version=1"):
        ex.append(SEP.join([bytes([p, 0 if p < 7 else 1, 0, 0]) + st(200) + b"\x00", b"", stream, body, resp_heads[0]] + completions[:1]))
for status in (429, 401, 500, 529, 400):
    for e in errors[:6]:
        ex.append(SEP.join([bytes([0, 0, 0, 2]) + st(status) + b"\x00", b"", b"", chat[0] if chat else b"", resp_heads[3 if status == 429 else 0], e]))
write("exchange", ex)
