#!/usr/bin/env python3
"""Writes deep-nesting and max-size seed inputs into fuzz/corpus/<target>/ (issue 12).

    python3 fuzz/seeds.py [--out DIR]

Python 3 standard library only; deterministic; files are named seed-*.bin and rewritten on every
run (inputs libFuzzer adds to the same directories are left alone). The largest seed is about
2.2 MB (200,000 nested ECMA arrays, closed), above libFuzzer's default cap of 1 MiB on seed
length: fuzz/run.sh passes -max_len = the largest file of each corpus.

Sizes follow the fuzz targets: the message limits are read from the ChunkLimits literals in
fuzz_targets/rtmp_session.rs and rtmp_chunks.rs, the relay limits from src/relay/wire.rs, so
that "max-size" stays the targets' maximum if those change. The AMF0 nestings are byte for byte
those of `livepop::ingest::amf0::nest`.

Per target:
  amf0          200,000-level strict arrays, objects, ECMA arrays, mixed (and inside a connect
                command); the deepest nesting of each kind that fits in one max-size message;
                nestings at the bound (32) and one past it; a max-size shallow connect command;
                a realistic connect and onMetaData.
  rtmp_session  raw chunk-stream bytes after the handshake, as IngestSession::handle_input
                takes them: Set Chunk Size, then AMF0 messages (command type 20, AMF3-flagged
                command 17, data 18 and 15). The 200,000-level bodies are over the target's
                message limit (64 KiB), so the chunk layer refuses them on the header: they
                never reach the AMF0 check through the session. The deepest nestings that fit
                in a max-size message (6,000 to 13,000 levels, far past the bound of 32) do,
                and must be refused there. Also a whole publish (connect, createStream,
                publish, onMetaData, sequence headers) followed by max-size video, audio and
                metadata messages.
  rtmp_chunks   a max-size message at the default chunk size and as a single chunk, with an
                extended timestamp, one byte over the limit, and three max-size messages
                interleaved on three chunk streams (under the 256 KiB buffer limit: the target
                pushes its whole input at once, so a longer input fails on the buffer limit).
  relay_wire    a control stream whose Announce fills the control limit (256 KiB) with every
                field at its own limit (and a Refuse with the longest reason), one byte over
                it; group streams with a 1 MiB frame, a frame declared at the 16 MiB frame
                limit (incomplete) and one byte over it.
  flv_tags      max-size (64 KiB) AVC, HEVC (enhanced RTMP), AAC and MP3 bodies, sequence
                headers included.
"""

import argparse
import ast
import os
import re
import struct
import sys

FUZZ = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(FUZZ)
DEEP = 200_000

# ---- limits, read from the sources ------------------------------------------------------------


def _int_expr(text):
    """Evaluates an integer literal expression such as `64 * 1024` or `16 << 20`."""
    node = ast.parse(text.replace("_", ""), mode="eval").body

    def ev(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.BinOp):
            a, b = ev(n.left), ev(n.right)
            ops = {ast.Mult: lambda: a * b, ast.Add: lambda: a + b, ast.Sub: lambda: a - b,
                   ast.LShift: lambda: a << b}
            if type(n.op) in ops:
                return ops[type(n.op)]()
        raise ValueError(f"not an integer expression: {text!r}")

    return ev(node)


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


# ChunkLimits::default() in src/ingest/chunk.rs, for a target that uses it.
CHUNK_DEFAULTS = {"max_message_bytes": 8 << 20, "max_chunk_size": 1 << 20,
                  "max_buffered_bytes": 16 << 20}


def chunk_limits(target):
    src = _read(f"fuzz/fuzz_targets/{target}.rs")
    limits = {}
    for field in CHUNK_DEFAULTS:
        m = re.search(field + r"\s*:\s*([0-9_ *+<()-]+?)\s*[,}]", src)
        if m:
            limits[field] = _int_expr(m.group(1))
    if not limits:
        if "ChunkLimits::default()" not in src:
            sys.exit(f"seeds.py: no ChunkLimits found in fuzz_targets/{target}.rs")
        limits = dict(CHUNK_DEFAULTS)
    missing = set(CHUNK_DEFAULTS) - set(limits)
    if missing:
        sys.exit(f"seeds.py: fuzz_targets/{target}.rs: could not read {sorted(missing)}")
    return limits


def wire_const(name):
    m = re.search(r"pub const " + name + r": usize = ([^;]+);", _read("src/relay/wire.rs"))
    if not m:
        sys.exit(f"seeds.py: {name} not found in src/relay/wire.rs")
    return _int_expr(m.group(1))


# ---- AMF0 (as livepop::ingest::amf0::nest builds it) --------------------------------------------

NUMBER, BOOLEAN, STRING, OBJECT, NULL, ECMA, OBJECT_END, STRICT = 0, 1, 2, 3, 5, 8, 9, 10


def strict_arrays(levels):
    return b"\x0a\x00\x00\x00\x01" * levels + b"\x00" + struct.pack(">d", 0.0)


def objects(levels):
    return b"\x03" + b"\x00\x01a\x03" * (levels - 1) + b"\x00\x00\x09" * levels


def ecma_arrays(levels):
    return (b"\x08\x00\x00\x00\x01" + b"\x00\x01a\x08\x00\x00\x00\x01" * (levels - 1)
            + b"\x00\x00\x09" * levels)


def mixed(levels):
    """Object, ECMA array, strict array in turn; nothing closed."""
    whole, rest = divmod(levels, 3)
    triple = b"\x03\x00\x01k" + b"\x08\x00\x00\x00\x01\x00\x01k" + b"\x0a\x00\x00\x00\x01"
    out = triple * whole
    if rest >= 1:
        out += b"\x03" + (b"\x00\x01k" if rest == 2 else b"")
    if rest == 2:
        out += b"\x08\x00\x00\x00\x01"
    return out


KINDS = {"strict_arrays": strict_arrays, "objects": objects, "ecma_arrays": ecma_arrays,
         "mixed": mixed}


def amf_str(s):
    b = s.encode()
    return bytes([STRING]) + struct.pack(">H", len(b)) + b


def amf_num(x):
    return bytes([NUMBER]) + struct.pack(">d", x)


def amf_obj(props, marker=OBJECT):
    """props: list of (name, encoded value)."""
    out = bytearray([marker])
    if marker == ECMA:
        out += struct.pack(">I", len(props))
    for k, v in props:
        kb = k.encode()
        out += struct.pack(">H", len(kb)) + kb + v
    out += b"\x00\x00\x09"
    return bytes(out)


def command(name, arg, txn=1.0):
    """As nest::command: the name, a transaction id, then `arg` (already encoded)."""
    return amf_str(name) + amf_num(txn) + arg


def padded_object(props, size, marker=OBJECT):
    """An object (or ECMA array) with `props`, then string properties p0, p1, ... of padding
    making it exactly `size` bytes."""
    need = size - len(amf_obj(props, marker))
    pads = []
    while need > 0:
        name = f"p{len(pads)}"
        frame = 2 + len(name) + 3  # name length, name, string marker and length
        take = min(65535, need - frame)
        rest = need - frame - take
        if 0 < rest < frame + 8:  # leave the next property room for its own framing
            take -= frame + 8 - rest
        if take < 0:
            raise ValueError(f"cannot pad an object to {size} bytes")
        pads.append((name, amf_str("x" * take)))
        need -= frame + take
    body = amf_obj(props + pads, marker)
    assert len(body) == size, (len(body), size)
    return body


def deepest_fit(make, budget):
    """The most levels of `make` whose encoding fits in `budget` bytes."""
    lo, hi = 1, budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(make(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


CONNECT_OBJECT = [("app", amf_str("live")), ("type", amf_str("nonprivate")),
                  ("flashVer", amf_str("FMLE/3.0 (compatible; FMSc/1.0)")),
                  ("tcUrl", amf_str("rtmp://127.0.0.1/live"))]


def connect_command():
    return command("connect", amf_obj(CONNECT_OBJECT))


def metadata_body(pad_to=None):
    props = [("duration", amf_num(0)), ("width", amf_num(1280)), ("height", amf_num(720)),
             ("videodatarate", amf_num(2500)), ("framerate", amf_num(30)),
             ("videocodecid", amf_num(7)), ("audiodatarate", amf_num(128)),
             ("audiosamplerate", amf_num(44100)), ("stereo", bytes([BOOLEAN, 1])),
             ("audiocodecid", amf_num(10)), ("encoder", amf_str("obs-output module")),
             ("encoder_info",
              amf_obj([("name", amf_str("x264")), ("preset", amf_str("veryfast"))]))]
    head = amf_str("@setDataFrame") + amf_str("onMetaData")
    if pad_to is None:
        return head + amf_obj(props, ECMA)
    return head + padded_object(props, pad_to - len(head), ECMA)


# ---- RTMP chunks (as livepop::ingest::chunk::write builds them) ---------------------------------


def basic_header(fmt, csid):
    if 2 <= csid <= 63:
        return bytes([(fmt << 6) | csid])
    if 64 <= csid <= 319:
        return bytes([fmt << 6, csid - 64])
    v = csid - 64
    return bytes([(fmt << 6) | 1, v & 0xFF, v >> 8])


def type0(csid, ts, length, type_id, stream_id):
    field = min(ts, 0xFFFFFF)
    out = basic_header(0, csid) + field.to_bytes(3, "big") + length.to_bytes(3, "big")
    out += bytes([type_id]) + struct.pack("<I", stream_id)
    if field == 0xFFFFFF:
        out += struct.pack(">I", ts)
    return out


def message(csid, ts, type_id, stream_id, payload, chunk_size):
    out = bytearray(type0(csid, ts, len(payload), type_id, stream_id))
    for i in range(0, max(len(payload), 1), chunk_size):
        if i:
            out += basic_header(3, csid)
            if ts >= 0xFFFFFF:
                out += struct.pack(">I", ts)
        out += payload[i:i + chunk_size]
    return bytes(out)


def set_chunk_size(size):
    # Sent while the peer's chunk size is still the default 128; its 4 bytes fit one chunk.
    return message(2, 0, 1, 0, struct.pack(">I", size), 128)


def interleave(msgs):
    """Chunks of several already-chunked messages, alternating between them. Each item is
    (bytes, first_chunk_len, chunk_len_with_header): splits at chunk boundaries."""
    parts = []
    for data, first, step in msgs:
        chunks = [data[:first]] + [data[i:i + step] for i in range(first, len(data), step)]
        parts.append(chunks)
    out = bytearray()
    for i in range(max(len(c) for c in parts)):
        for chunks in parts:
            if i < len(chunks):
                out += chunks[i]
    return bytes(out)


# ---- FLV tag bodies ------------------------------------------------------------------------------

SPS = bytes([0x67, 0x64, 0x00, 0x1F, 0xAC, 0xD9, 0x40, 0x50, 0x05, 0xBB, 0x01, 0x10, 0x00, 0x00,
             0x03, 0x00, 0x10, 0x00, 0x00, 0x03, 0x03, 0xC0, 0xF1, 0x83, 0x19, 0x60])
PPS = bytes([0x68, 0xEB, 0xE3, 0xCB, 0x22, 0xC0])


def avc_record(size=None):
    rec = bytes([1, 0x64, 0x00, 0x1F, 0xFF, 0xE1]) + struct.pack(">H", len(SPS)) + SPS
    rec += bytes([1]) + struct.pack(">H", len(PPS)) + PPS
    if size is not None:  # trailing SPS-extension-like bytes: parsers must ignore them
        rec += b"\xfd" * (size - len(rec))
    return rec


def nal_units(size, first_type):
    """Length-prefixed (4-byte) NAL units filling exactly `size` bytes."""
    out = bytearray()
    t = first_type
    while len(out) < size:
        n = min(size - len(out) - 4, 16384)
        if n < 1:
            out += b"\x00" * (size - len(out))
            break
        out += struct.pack(">I", n) + bytes([t]) + bytes((i * 7 + 3) & 0xFF for i in range(n - 1))
        t = 0x01 if first_type == 0x65 else first_type
    return bytes(out)


def flv_bodies(size):
    """Name -> a video or audio tag body of exactly `size` bytes (sequence headers included)."""
    return {
        "avc_keyframe": bytes([0x17, 1, 0, 0, 66]) + nal_units(size - 5, 0x65),
        "avc_interframe": bytes([0x27, 1, 0xFF, 0xFF, 0xFE]) + nal_units(size - 5, 0x41),
        "avc_sequence_header": bytes([0x17, 0, 0, 0, 0]) + avc_record(size - 5),
        "hevc_coded_frames": bytes([0x91]) + b"hvc1" + bytes([0, 0, 33])
        + nal_units(size - 8, 0x26),
        "hevc_coded_frames_x": bytes([0x93]) + b"hvc1" + nal_units(size - 5, 0x26),
        "hevc_sequence_start": bytes([0x90]) + b"hvc1" + b"\x01" + b"\x60" * (size - 6),
        "aac_raw": bytes([0xAF, 1]) + bytes((i * 13) & 0xFF for i in range(size - 2)),
        "aac_config": bytes([0xAF, 0, 0x12, 0x10]) + b"\x56\xe5\x00" + b"\x00" * (size - 7),
        "mp3": bytes([0x2F]) + bytes([0xFF, 0xFB, 0x90, 0x64]) + b"\x55" * (size - 5),
    }


# ---- relay wire ----------------------------------------------------------------------------------


def varint(v):
    if v < 1 << 6:
        return bytes([v])
    if v < 1 << 14:
        return struct.pack(">H", 0x4000 | v)
    if v < 1 << 30:
        return struct.pack(">I", 0x8000_0000 | v)
    return struct.pack(">Q", 0xC000_0000_0000_0000 | min(v, (1 << 62) - 1))


def wire_bytes(b):
    return varint(len(b)) + b


def control(t, body):
    return varint(t) + varint(len(body)) + body


def relay_seeds():
    max_control = wire_const("MAX_CONTROL")
    max_frame = wire_const("MAX_FRAME")
    max_string = wire_const("MAX_STRING")
    name = ("s" * max_string).encode()
    hello = control(1, varint(1) + wire_bytes(("n" * max_string).encode()))
    announce = bytearray()
    announce += varint(7) + wire_bytes(name) + varint(3) + varint(2) + varint(1 << 40)
    announce += bytes([1]) + wire_bytes(avc_record(65536))          # video config at its limit
    announce += bytes([1]) + wire_bytes(b"\x12\x10" + b"\x00" * 1022)  # audio config at its limit
    announce += varint(44100) + bytes([2])
    for v in (1280 + 1, 720 + 1, 30000 + 1, 4000 + 1):               # Some(..) is value + 1
        announce += varint(v)
    announce += wire_bytes(("e" * max_string).encode())
    padded = bytes(announce) + b"\x00" * (max_control - len(announce))  # trailing bytes ignored
    end = control(4, varint(7))
    # Refuse (type 5, core -> edge) with its reason at the string limit; an older decoder skips
    # an unknown type.
    refuse = control(5, varint(7) + wire_bytes(("r" * max_string).encode()))
    seeds = {
        "control_max": hello + control(3, padded) + refuse + end,
        "control_fields_at_limits": hello + control(3, bytes(announce)) + refuse + end,
        "control_over_limit": hello + varint(3) + varint(max_control + 1) + padded + b"\x00",
    }
    group = b"\x47" + varint(7) + varint(12) + bytes([0]) + varint(2)
    frame_data = nal_units(1 << 20, 0x65)

    def frame(key, dts_delta, data, declared=None):
        n = len(data) if declared is None else declared
        return (varint(int(key)) + varint(dts_delta) + varint(66) + varint(1_700_000_000_000_000)
                + varint(n) + data)

    small = [frame(False, 66, nal_units(4000, 0x41)) for _ in range(8)]
    seeds["group_1mib_frame"] = group + frame(True, 0, frame_data) + b"".join(small)
    seeds["group_frame_at_limit"] = group + frame(True, 0, frame_data, declared=max_frame)
    seeds["group_frame_over_limit"] = group + frame(True, 0, frame_data[:4096],
                                                    declared=max_frame + 1)
    return seeds


# ---- the seed sets -------------------------------------------------------------------------------


def amf0_seeds(max_message):
    seeds = {}
    for kind, make in KINDS.items():
        seeds[f"{kind}_{DEEP}"] = make(DEEP)
        fit = deepest_fit(lambda n: command("connect", make(n)), max_message)
        body = command("connect", make(fit))
        seeds[f"connect_{kind}_{fit}_max_size"] = body + b"\x05" * (max_message - len(body))
        if kind != "mixed":
            seeds[f"{kind}_32_at_bound"] = make(32)
        seeds[f"{kind}_33_past_bound"] = make(33)
    seeds[f"connect_strict_arrays_{DEEP}"] = command("connect", strict_arrays(DEEP))
    seeds["connect_shallow_max_size"] = command(
        "connect", padded_object(CONNECT_OBJECT, max_message - 19 - 1)) + bytes([NULL])
    seeds["connect"] = connect_command() + bytes([NULL])
    seeds["metadata"] = metadata_body()
    seeds["metadata_max_size"] = metadata_body(pad_to=max_message)
    return seeds


def session_seeds(limits):
    max_message = limits["max_message_bytes"]
    max_chunk = limits["max_chunk_size"]
    big = min(max_chunk, max(max_message, 128))  # a max-size message travels as one chunk
    seeds = {}

    def cmd(body, type_id=20, stream_id=0, csid=3, chunk=big, ts=0):
        return message(csid, ts, type_id, stream_id, body, chunk)

    for kind, make in KINDS.items():
        # Over the message limit: refused by the chunk layer on the header.
        seeds[f"connect_{kind}_{DEEP}_over_limit"] = set_chunk_size(big) + cmd(
            command("connect", make(DEEP)))
        # The deepest that fits: reaches the AMF0 check, which must refuse it.
        fit = deepest_fit(lambda n: command("connect", make(n)), max_message)
        body = command("connect", make(fit))
        body += b"\x05" * (max_message - len(body))
        seeds[f"connect_{kind}_{fit}_max_size"] = set_chunk_size(big) + cmd(body)
        # The same at the default chunk size of 128, without Set Chunk Size.
        if kind == "strict_arrays":
            seeds[f"connect_{kind}_{fit}_chunks_of_128"] = cmd(body, chunk=128)
    # The other AMF0-bearing types.
    deep_meta = amf_str("@setDataFrame") + amf_str("onMetaData")
    deep_meta += ecma_arrays(deepest_fit(ecma_arrays, max_message - len(deep_meta)))
    deep_meta += b"\x05" * (max_message - len(deep_meta))
    deep_cmd = command("connect", strict_arrays(deepest_fit(
        lambda n: command("connect", strict_arrays(n)), max_message - 1)))
    deep_cmd += b"\x05" * (max_message - 1 - len(deep_cmd))
    seeds["data18_ecma_arrays_max_size"] = set_chunk_size(big) + cmd(deep_meta, 18, 1, 5)
    seeds["data15_ecma_arrays_max_size"] = set_chunk_size(big) + cmd(deep_meta, 15, 1, 5)
    seeds["command17_strict_arrays_max_size"] = set_chunk_size(big) + cmd(b"\x00" + deep_cmd, 17)

    # A whole publish, then max-size media and metadata.
    chunk = min(4096, max_chunk)
    publish = set_chunk_size(chunk)
    publish += cmd(connect_command(), chunk=chunk)
    publish += cmd(command("createStream", bytes([NULL]), 2.0), chunk=chunk)
    publish += cmd(command("publish", bytes([NULL]) + amf_str("streamkey?token=1")
                           + amf_str("live"), 3.0), stream_id=1, csid=4, chunk=chunk)
    publish += cmd(metadata_body(), 18, 1, 5, chunk)
    flv = flv_bodies(max_message)
    publish += message(6, 0, 9, 1, bytes([0x17, 0, 0, 0, 0]) + avc_record(), chunk)
    publish += message(4, 0, 8, 1, bytes([0xAF, 0, 0x12, 0x10]), chunk)
    seeds["publish"] = publish
    seeds["publish_max_size_media"] = (
        publish
        + message(6, 33, 9, 1, flv["avc_keyframe"], chunk)
        + message(4, 23, 8, 1, flv["aac_raw"], chunk)
        # The chunk size raised mid-stream: the rest as single chunks.
        + set_chunk_size(big)
        + message(6, 66, 9, 1, flv["avc_interframe"], big)
        + cmd(metadata_body(pad_to=max_message), 18, 1, 5)
        + cmd(command("FCUnpublish", bytes([NULL]) + amf_str("streamkey"), 4.0))
        + cmd(command("deleteStream", bytes([NULL]) + amf_num(1), 5.0))
    )
    seeds["publish_max_size_hevc"] = (
        publish + message(6, 0, 9, 1, flv["hevc_sequence_start"][:64], chunk)
        + message(6, 33, 9, 1, flv["hevc_coded_frames"], chunk)
        + message(6, 66, 9, 1, flv["hevc_coded_frames_x"], chunk)
        + message(4, 23, 8, 1, flv["mp3"], chunk)
    )
    return seeds


def chunk_seeds(limits):
    max_message = limits["max_message_bytes"]
    max_chunk = limits["max_chunk_size"]
    payload = bytes((i * 31 + 7) & 0xFF for i in range(max_message))
    big = min(max_chunk, max_message)
    seeds = {
        "max_size_chunks_of_128": message(6, 1234, 9, 1, payload, 128),
        "max_size_one_chunk": set_chunk_size(big) + message(6, 1234, 9, 1, payload, big),
        "max_size_extended_timestamp": set_chunk_size(4096)
        + message(6, 0x0100_0000, 9, 1, payload, 4096),
        "max_size_plus_one": set_chunk_size(big) + message(6, 0, 9, 1, payload + b"\x00", big),
    }
    # Three max-size messages on chunk streams 4, 6 and 8 (and a 3-byte csid), interleaved
    # chunk by chunk; with 4096-byte chunks each type 0 header is 12 bytes, continuations 1.
    msgs = []
    for csid, type_id in ((4, 8), (6, 9), (8, 18)):
        data = message(csid, 40, type_id, 1, payload, 4096)
        msgs.append((data, 12 + 4096, 1 + 4096))
    inter = set_chunk_size(4096) + interleave(msgs)
    if len(inter) <= limits["max_buffered_bytes"]:
        seeds["max_size_interleaved_x3"] = inter
    return seeds


def flv_seeds(max_message):
    seeds = {f"{k}_max_size": v for k, v in flv_bodies(max_message).items()}
    seeds["avc_sequence_header"] = bytes([0x17, 0, 0, 0, 0]) + avc_record()
    return seeds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(FUZZ, "corpus"),
                    help="corpus root (default: fuzz/corpus)")
    args = ap.parse_args()

    session = chunk_limits("rtmp_session")
    chunks = chunk_limits("rtmp_chunks")
    sets = {
        "amf0": amf0_seeds(session["max_message_bytes"]),
        "rtmp_session": session_seeds(session),
        "rtmp_chunks": chunk_seeds(chunks),
        "relay_wire": relay_seeds(),
        "flv_tags": flv_seeds(session["max_message_bytes"]),
    }
    for target, seeds in sets.items():
        d = os.path.join(args.out, target)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(d, f"seed-{name}.bin"), "wb") as f:
                f.write(data)
        largest = max(len(v) for v in seeds.values())
        print(f"{target}: {len(seeds)} seeds, largest {largest} bytes -> {d}")


if __name__ == "__main__":
    main()
