"""A hostile HTTP/3 client for the hostile-peer tests: frames that declare
huge lengths, junk that streams for as long as the server lets it, QPACK
instructions the server never allowed, trailers trickled a byte at a time.

aioquic's H3Connection sets up the connection (control stream, SETTINGS,
QPACK streams); the attack frames are written with `encode_frame` straight
onto its streams. Junk is paced by what the server acknowledges (at most
256 KiB in flight), so the byte count reported is what the server took
before it acted, and every loop is bounded by --max-bytes and --timeout.

Attacks:
  control-reserved   a reserved frame on the control stream declaring
                     4 GiB, then its payload as junk
  request-reserved   HEADERS + DATA, then a reserved frame declaring 4 GiB
                     on the request stream, then junk
  headers-large      a HEADERS frame declaring 512 MiB, then junk
  trailers-large     HEADERS + DATA, then trailers declaring 4 GiB, then junk
  trailers-slow      HEADERS + DATA, then a 200-byte trailers frame sent one
                     byte every --pace-ms
  qpack-capacity     Set Dynamic Table Capacity 4096 on the encoder stream
                     (spooky advertised 0)

Prints one JSON line: {"status", "reset", "stop_sending", "closed",
"sent", "acked", "seconds", "timeout"}.
"""

import argparse
import asyncio
import json
import sys
import time

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection, encode_frame
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StopSendingReceived, StreamReset

RESERVED_FRAME = 0x21  # 0x1f * 0 + 0x21
CHUNK = 16 * 1024
IN_FLIGHT = 256 * 1024


class AttackClient(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.sid = None
        self.outcome = {
            "status": None,
            "reset": None,
            "stop_sending": None,
            "closed": None,
            "sent": 0,
            "acked": 0,
            "seconds": 0.0,
            "timeout": False,
        }
        self.ended = asyncio.get_running_loop().create_future()

    def _end(self):
        if not self.ended.done():
            self.ended.set_result(True)

    def quic_event_received(self, event):
        if isinstance(event, StreamReset) and event.stream_id == self.sid:
            self.outcome["reset"] = event.error_code
            self._end()
        elif isinstance(event, StopSendingReceived) and event.stream_id == self.sid:
            self.outcome["stop_sending"] = event.error_code
            self._end()
        elif isinstance(event, ConnectionTerminated):
            self.outcome["closed"] = event.error_code
            self._end()
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived) and getattr(ev, "stream_id", None) == self.sid:
                if self.outcome["status"] is None:
                    self.outcome["status"] = int(dict(ev.headers).get(b":status", b"0"))
                if ev.stream_ended:
                    self._end()

    def write(self, sid, data):
        self._quic.send_stream_data(sid, data)
        self.transmit()
        self.outcome["sent"] += len(data)

    def acked(self, sid):
        stream = self._quic._streams.get(sid)
        return stream.sender._buffer_start if stream else 0

    async def junk(self, sid, max_bytes, deadline):
        """Streams zero bytes on `sid` until the server acts, `max_bytes`
        were sent, or the deadline passes."""
        start = self.outcome["sent"]
        chunk = bytes(CHUNK)
        while not self.ended.done() and self.outcome["sent"] - start < max_bytes:
            if time.monotonic() > deadline:
                self.outcome["timeout"] = True
                return
            stream = self._quic._streams.get(sid)
            if stream is None:
                return
            if stream.sender._buffer_stop - stream.sender._buffer_start > IN_FLIGHT:
                try:
                    await asyncio.wait_for(asyncio.shield(self.ended), 0.005)
                except asyncio.TimeoutError:
                    pass
                continue
            self.write(sid, chunk)

    def request_head(self, authority):
        self.sid = self._quic.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", b"/attack"),
        ]
        block = self.h3._encode_headers(self.sid, headers)
        self.write(self.sid, encode_frame(FrameType.HEADERS, block))
        return self.sid


def frame_header(ty, length):
    return encode_uint_var(ty) + encode_uint_var(length)


async def attack(client, a):
    deadline = time.monotonic() + a.timeout
    # Let SETTINGS and the QPACK streams go out first.
    client.transmit()
    await asyncio.sleep(0.05)
    kind = a.attack
    if kind == "control-reserved":
        sid = client.h3._local_control_stream_id
        client.write(sid, frame_header(RESERVED_FRAME, 4 << 30))
        await client.junk(sid, a.max_bytes, deadline)
    elif kind == "request-reserved":
        sid = client.request_head(a.authority)
        client.write(sid, encode_frame(FrameType.DATA, b"x" * 100))
        client.write(sid, frame_header(RESERVED_FRAME, 4 << 30))
        await client.junk(sid, a.max_bytes, deadline)
    elif kind == "headers-large":
        client.sid = sid = client._quic.get_next_available_stream_id()
        client.write(sid, frame_header(FrameType.HEADERS, 512 << 20))
        await client.junk(sid, a.max_bytes, deadline)
    elif kind == "trailers-large":
        sid = client.request_head(a.authority)
        client.write(sid, encode_frame(FrameType.DATA, b"x" * 100))
        client.write(sid, frame_header(FrameType.HEADERS, 4 << 30))
        await client.junk(sid, a.max_bytes, deadline)
    elif kind == "trailers-slow":
        sid = client.request_head(a.authority)
        client.write(sid, encode_frame(FrameType.DATA, b"x" * 100))
        client.write(sid, frame_header(FrameType.HEADERS, 200))
        for _ in range(200):
            if client.ended.done() or time.monotonic() > deadline:
                break
            client.write(sid, b"\x00")
            try:
                await asyncio.wait_for(asyncio.shield(client.ended), a.pace_ms / 1000)
            except asyncio.TimeoutError:
                pass
    elif kind == "qpack-capacity":
        sid = client.h3._local_encoder_stream_id
        # Set Dynamic Table Capacity (001xxxxx, 5-bit prefix) = 4096.
        client.write(sid, bytes([0x3F, 0xE1, 0x1F]))
    else:
        raise SystemExit(f"unknown attack {kind}")
    remaining = deadline - time.monotonic()
    if not client.ended.done() and remaining > 0:
        try:
            await asyncio.wait_for(asyncio.shield(client.ended), remaining)
        except asyncio.TimeoutError:
            client.outcome["timeout"] = True
    elif not client.ended.done():
        client.outcome["timeout"] = True


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sni", default="localhost")
    p.add_argument("--ca")
    p.add_argument("--attack", required=True)
    p.add_argument("--max-bytes", type=int, default=64 << 20)
    p.add_argument("--pace-ms", type=int, default=200)
    p.add_argument("--timeout", type=float, default=20.0)
    a = p.parse_args()
    a.authority = f"{a.sni}:{a.port}"

    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=a.sni)
    cfg.idle_timeout = a.timeout + 10
    if a.ca:
        cfg.load_verify_locations(a.ca)
    started = time.monotonic()
    async with connect(a.host, a.port, configuration=cfg, create_protocol=AttackClient) as client:
        await attack(client, a)
        out = dict(client.outcome)
        sid = client.sid if client.sid is not None else client.h3._local_control_stream_id
        out["acked"] = client.acked(sid)
    out["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
