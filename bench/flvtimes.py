#!/usr/bin/env python3
"""Reads an FLV stream on stdin (ffmpeg -c copy -f flv pipe:1 from an RTMP server) and writes,
per video frame, its timestamp (ms) and the wall time it arrived (ms), one "pts arrival" line
each, to the file given as the first argument. Used to time nginx-rtmp's relay."""
import sys
import time


def main():
    out = open(sys.argv[1], "w")
    f = sys.stdin.buffer
    if len(f.read(9)) < 9:
        return
    f.read(4)  # PreviousTagSize0
    while True:
        head = f.read(11)
        if len(head) < 11:
            break
        now = time.time() * 1000.0
        kind = head[0] & 0x1F
        size = int.from_bytes(head[1:4], "big")
        ts = int.from_bytes(head[4:7], "big") | (head[7] << 24)
        body = f.read(size)
        f.read(4)
        if kind == 9 and len(body) > 1 and body[1] == 1:  # AVC NALU (not a sequence header)
            out.write(f"{ts} {now:.3f}\n")
            out.flush()


if __name__ == "__main__":
    main()
