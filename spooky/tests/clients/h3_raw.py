"""A raw-frame HTTP/3 client for the hardening tests: sends exactly the
header fields it is given, in order, with no validation (duplicated or
misplaced pseudo-headers, uppercase names, CR/LF in values, connection
headers...), then the DATA frames it is given, and reports what the server
did with the request stream.

aioquic's H3Connection sets up the connection (control stream, SETTINGS,
QPACK streams); the request stream's HEADERS block comes from the same
QPACK encoder (`_encode_headers`) but bypasses `send_headers`, and the
frames are written with `encode_frame`.

Prints one JSON line: {"status": int|null, "body": str, "reset": int|null,
"stop_sending": int|null, "closed": int|null, "timeout": bool}.
"""

import argparse
import asyncio
import json
import sys

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection, encode_frame
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StopSendingReceived, StreamReset


class RawClient(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.sid = None
        self.outcome = {
            "status": None,
            "body": "",
            "reset": None,
            "stop_sending": None,
            "closed": None,
            "timeout": False,
        }
        self.done = asyncio.get_running_loop().create_future()

    def _finish(self):
        if not self.done.done():
            self.done.set_result(self.outcome)

    def quic_event_received(self, event):
        # Transport-level events H3Connection does not report.
        if isinstance(event, StreamReset) and event.stream_id == self.sid:
            self.outcome["reset"] = event.error_code
            self._finish()
        elif isinstance(event, StopSendingReceived) and event.stream_id == self.sid:
            self.outcome["stop_sending"] = event.error_code
        elif isinstance(event, ConnectionTerminated):
            self.outcome["closed"] = event.error_code
            self._finish()
        for ev in self.h3.handle_event(event):
            if getattr(ev, "stream_id", None) != self.sid:
                continue
            if isinstance(ev, HeadersReceived) and self.outcome["status"] is None:
                status = dict(ev.headers).get(b":status", b"0")
                self.outcome["status"] = int(status)
            elif isinstance(ev, DataReceived):
                self.outcome["body"] += ev.data.decode("utf-8", "replace")
            if getattr(ev, "stream_ended", False):
                self._finish()

    async def send_raw(self, headers, data, fin, pause):
        self.sid = self._quic.get_next_available_stream_id()
        block = self.h3._encode_headers(self.sid, headers)
        frames = [encode_frame(FrameType.HEADERS, block)]
        frames += [encode_frame(FrameType.DATA, d) for d in data]
        for f in frames:
            self._quic.send_stream_data(self.sid, f)
            self.transmit()
            if pause:
                # Let the server act on what it has (forward the head and
                # the body so far) before the next frame.
                await asyncio.sleep(pause)
        if fin:
            self._quic.send_stream_data(self.sid, b"", end_stream=True)
            self.transmit()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sni", default="localhost")
    p.add_argument("--ca")
    p.add_argument(
        "--headers",
        required=True,
        help='JSON list of [name, value] pairs, sent in order as given, e.g. [[":method","GET"]]',
    )
    p.add_argument("--data", default="[]", help="JSON list of strings: one DATA frame each")
    p.add_argument("--no-fin", action="store_true", help="leave the request stream open")
    p.add_argument("--pause-ms", type=int, default=0, help="pause after each frame")
    p.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args()

    headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in json.loads(a.headers)]
    data = [d.encode("latin-1") for d in json.loads(a.data)]

    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=a.sni)
    if a.ca:
        cfg.load_verify_locations(a.ca)
    async with connect(a.host, a.port, configuration=cfg, create_protocol=RawClient) as client:
        await client.send_raw(headers, data, not a.no_fin, a.pause_ms / 1000)
        try:
            # A copy: closing the connection on the way out adds its own
            # ConnectionTerminated.
            outcome = dict(await asyncio.wait_for(asyncio.shield(client.done), a.timeout))
        except asyncio.TimeoutError:
            outcome = dict(client.outcome, timeout=True)
    print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
