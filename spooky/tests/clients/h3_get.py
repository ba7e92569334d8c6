"""An HTTP/3 client built on aioquic: the end-to-end tests' independent
client (a QUIC and HTTP/3 stack that shares no code with spooky).

Prints one line per response: `STATUS LENGTH bytes FIRST-LINE-OF-BODY`.
"""

import argparse
import asyncio
import sys

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.streams = {}

    def quic_event_received(self, event):
        for ev in self.h3.handle_event(event):
            st = self.streams.get(getattr(ev, "stream_id", None))
            if st is None:
                continue
            if isinstance(ev, HeadersReceived):
                if st["headers"] is None:
                    st["headers"] = dict(ev.headers)
                else:
                    st["trailers"] = dict(ev.headers)
            elif isinstance(ev, DataReceived):
                st["body"] += ev.data
            if getattr(ev, "stream_ended", False) and not st["done"].done():
                st["done"].set_result(st)

    async def request(self, authority, path, method=b"GET", body=b""):
        sid = self._quic.get_next_available_stream_id()
        done = asyncio.get_running_loop().create_future()
        self.streams[sid] = {"headers": None, "trailers": None, "body": b"", "done": done}
        headers = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", authority),
            (b":path", path),
            (b"user-agent", b"aioquic-test"),
        ]
        self.h3.send_headers(sid, headers, end_stream=not body)
        if body:
            self.h3.send_data(sid, body, end_stream=True)
        self.transmit()
        return await asyncio.wait_for(done, 30)


def line(st):
    status = st["headers"].get(b":status", b"?").decode()
    first = st["body"].split(b"\n", 1)[0][:80].decode("utf-8", "replace")
    if not all(32 <= ord(c) < 127 for c in first):
        first = ""
    return f"{status} {len(st['body'])} bytes {first}".rstrip()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sni", default="localhost")
    p.add_argument("--ca")
    p.add_argument("--path", default="/")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--concurrent", action="store_true")
    p.add_argument(
        "--malformed-first",
        action="store_true",
        help="first send a request without :path (malformed, RFC 9114 4.3.1) on its own stream",
    )
    a = p.parse_args()

    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=a.sni)
    if a.ca:
        cfg.load_verify_locations(a.ca)
    authority = f"{a.sni}:{a.port}".encode()
    async with connect(a.host, a.port, configuration=cfg, create_protocol=Client) as client:
        path = a.path.encode()
        if a.malformed_first:
            sid = client._quic.get_next_available_stream_id()
            # aioquic's H3Connection validates headers it sends, so write the
            # HEADERS frame's QPACK block ourselves: :method GET, :scheme https
            # (static table 17 and 23), nothing else.
            client._quic.send_stream_data(sid, bytes([0x01, 0x04, 0x00, 0x00, 0xD1, 0xD7]), end_stream=True)
            client.transmit()
            await asyncio.sleep(0.2)
            print(f"malformed stream {sid} sent")
        if a.concurrent:
            results = await asyncio.gather(*(client.request(authority, path) for _ in range(a.count)))
        else:
            results = [await client.request(authority, path) for _ in range(a.count)]
        for st in results:
            print(line(st))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
