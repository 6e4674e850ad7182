"""Delay packets by a fixed time with an iptables NFQUEUE and a netlink socket (no sch_netem on this kernel).

Run inside a network namespace (``ip netns exec NS python nfqueue_delay.py --queue 1 --delay_ms 300``) after
``iptables -A INPUT -s PEER -j NFQUEUE --queue-num 1`` there: every packet that rule queues is accepted
``delay_ms`` later, in order, so the namespace's traffic gets that much extra round trip (a far teacher) while
the kernels still do the TCP (data and ACKs come late, as over a long link). On INPUT, not OUTPUT: a packet held
on its way out still counts against its socket's TCP Small Queues, so the sender could send only ~2 segments per
delay (netns.py). Pure Python over AF_NETLINK (nfnetlink_queue, copy
mode "meta": packets are not copied to user space), no binding to install. ``--delay_file PATH``: read the delay
(ms) from that file each 0.2 s, so a test can change it (heal: 0) without restarting. Ends on SIGTERM.
"""
from __future__ import annotations

import argparse
import heapq
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2


def _attr(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _message(msg: int, queue: int, attrs: bytes, family: int = socket.AF_UNSPEC) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, NLM_F_REQUEST, 0, 0) + body


def _packet_ids(data: bytes):
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _, _, _ = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            return
        if kind & 0xFF == NFQNL_MSG_PACKET and kind >> 8 == NFNL_SUBSYS_QUEUE:
            position = offset + 20
            while position + 4 <= offset + length:
                attr_length, attr_kind = struct.unpack_from("=HH", data, position)
                if attr_length < 4:
                    break
                if attr_kind & 0x7FFF == NFQA_PACKET_HDR:
                    yield struct.unpack_from("!I", data, position + 4)[0]
                position += (attr_length + 3) & ~3
        offset += (length + 3) & ~3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queue", type=int, default=1, help="NFQUEUE number of the iptables rule")
    parser.add_argument("--delay_ms", type=float, default=0.0, help="delay of every queued packet, ms")
    parser.add_argument("--delay_file", default="", help="file holding the delay in ms, read every 0.2 s")
    args = parser.parse_args(argv)
    delay = args.delay_ms / 1000.0
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((0, 0))
    sock.send(_message(NFQNL_MSG_CONFIG, args.queue, _attr(NFQA_CFG_CMD, struct.pack("=BBH", NFQNL_CFG_CMD_BIND, 0,
                                                                                      socket.htons(socket.AF_INET)))))
    sock.send(_message(NFQNL_MSG_CONFIG, args.queue, _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))))
    sock.send(_message(NFQNL_MSG_CONFIG, args.queue, _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 65536))))
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    pending: list[tuple[float, int, int]] = []
    order = 0
    next_read = 0.0
    print("ready", flush=True)
    while running[0]:
        now = time.monotonic()
        if args.delay_file and now >= next_read:
            next_read = now + 0.2
            try:
                with open(args.delay_file) as f:
                    delay = float(f.read().strip() or 0) / 1000.0
            except (OSError, ValueError):
                pass
        while pending and pending[0][0] <= now:
            _, _, packet_id = heapq.heappop(pending)
            sock.send(_message(NFQNL_MSG_VERDICT, args.queue,
                               _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))))
        wait = min(0.2, max(0.0, pending[0][0] - now)) if pending else 0.2
        ready, _, _ = select.select([sock], [], [], wait)
        if ready:
            data = sock.recv(1 << 20)
            arrived = time.monotonic()
            for packet_id in _packet_ids(data):
                order += 1
                heapq.heappush(pending, (arrived + delay, order, packet_id))
    for _, _, packet_id in pending:   # let the rest through
        sock.send(_message(NFQNL_MSG_VERDICT, args.queue,
                           _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
