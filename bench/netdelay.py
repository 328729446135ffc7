#!/usr/bin/env python3
"""A user-space delay line between two network interfaces (netem is unavailable here): every
Ethernet frame received on one is sent out of the other DELAY_MS later, in both directions.
Loss is added separately (iptables -m statistic in the benchmark's namespace), so that TCP
(nginx-rtmp) and UDP (livepop's QUIC) cross the same impaired path.

usage: netdelay.py IFACE_A IFACE_B DELAY_MS   (root; the interfaces carry no addresses)
"""
import heapq
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003


def open_raw(ifname):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    s.bind((ifname, 0))
    s.setblocking(False)
    return s


def main():
    a, b, delay = sys.argv[1], sys.argv[2], float(sys.argv[3]) / 1000.0
    sa, sb = open_raw(a), open_raw(b)
    other = {sa: sb, sb: sa}
    queue, seq = [], 0
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 1.0
        ready, _, _ = select.select([sa, sb], [], [], timeout)
        now = time.monotonic()
        for s in ready:
            while True:
                try:
                    frame, addr = s.recvfrom(65535)
                except BlockingIOError:
                    break
                # Frames this program sent out of that interface are seen again: skip them.
                if addr[2] == socket.PACKET_OUTGOING:
                    continue
                heapq.heappush(queue, (now + delay, seq, other[s], frame))
                seq += 1
        while queue and queue[0][0] <= time.monotonic():
            _, _, out, frame = heapq.heappop(queue)
            try:
                out.send(frame)
            except OSError:
                pass  # a frame larger than the MTU (offloads must be off) or a full buffer


if __name__ == "__main__":
    main()
