"""A bounded handshake flood for tests: opens COUNT QUIC handshakes (real
aioquic Initials, ALPN h3) towards HOST:PORT and never answers the
server's flight, leaving every one half-open. Only towards loopback or
the 198.18.0.0/15 addresses of a namespace the test created: the test
passes spooky's address (and, in a namespace, the source to bind).

Prints one JSON line: bytes and datagrams sent and received, Retry
packets received, and the worst ratio of received to sent bytes, per
socket (the amplification a spoofed victim would see) and per handshake
(what RFC 9000 Section 8.1 limits to 3x: server datagrams are matched to
a handshake by their destination connection ID, the client's source CID).
"""

import argparse
import json
import select
import socket
import time

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

# The length of aioquic's connection IDs (its `connection_id_length`).
CID_LEN = 8


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bind", default="127.0.0.1", help="the flood's source address")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--sockets", type=int, default=100)
    p.add_argument("--listen-s", type=float, default=3.0)
    p.add_argument("--rate", type=int, default=0, help="Initials per second (0 = as fast as possible)")
    a = p.parse_args()
    addr = (a.host, a.port)

    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(a.sockets)]
    for s in socks:
        s.bind((a.bind, 0))
        s.setblocking(False)
    sent = {s.fileno(): 0 for s in socks}
    recv = {s.fileno(): 0 for s in socks}
    stats = {"sent_datagrams": 0, "recv_datagrams": 0, "retry_packets": 0, "unmatched_datagrams": 0}
    # Per handshake, keyed by the client's source connection ID.
    sent_by_cid = {}
    recv_by_cid = {}

    def drain(timeout):
        ready, _, _ = select.select(socks, [], [], timeout)
        for s in ready:
            while True:
                try:
                    data = s.recv(65535)
                except BlockingIOError:
                    break
                recv[s.fileno()] += len(data)
                stats["recv_datagrams"] += 1
                # Long header: flags, version (4), DCID length, DCID. Short
                # header (1-RTT, sent once the server has its keys): flags,
                # DCID of the length aioquic chooses.
                if len(data) > 6 and data[0] & 0x80:
                    cid = data[6 : 6 + data[5]]
                else:
                    cid = data[1 : 1 + CID_LEN]
                if cid in recv_by_cid:
                    recv_by_cid[cid] += len(data)
                else:
                    stats["unmatched_datagrams"] += 1
                # Long header, QUIC v1, type Retry (0b11).
                if data and data[0] & 0xF0 == 0xF0:
                    stats["retry_packets"] += 1

    start = time.time()
    for i in range(a.count):
        cfg = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name="localhost")
        conn = QuicConnection(configuration=cfg)
        now = time.time()
        conn.connect(addr, now=now)
        s = socks[i % len(socks)]
        cid = conn.host_cid
        assert len(cid) == CID_LEN, cid
        sent_by_cid[cid] = 0
        recv_by_cid[cid] = 0
        for data, _ in conn.datagrams_to_send(now=now):
            s.sendto(data, addr)
            sent[s.fileno()] += len(data)
            sent_by_cid[cid] += len(data)
            stats["sent_datagrams"] += 1
        if a.rate:
            delay = start + (i + 1) / a.rate - time.time()
            if delay > 0:
                drain(delay)
        else:
            drain(0)
    flood_s = time.time() - start
    deadline = time.time() + a.listen_s
    while time.time() < deadline:
        drain(0.05)

    worst = max((recv[f] / sent[f] for f in sent if sent[f]), default=0.0)
    worst_handshake = max(
        (recv_by_cid[c] / sent_by_cid[c] for c in sent_by_cid if sent_by_cid[c]), default=0.0
    )
    print(
        json.dumps(
            {
                "handshakes": a.count,
                "sent_bytes": sum(sent.values()),
                "recv_bytes": sum(recv.values()),
                "worst_socket_ratio": round(worst, 3),
                "worst_handshake_ratio": round(worst_handshake, 3),
                "flood_s": round(flood_s, 3),
                **stats,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
