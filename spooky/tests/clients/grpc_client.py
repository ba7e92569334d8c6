"""A gRPC client on grpcio, over HTTP/2 with TLS: calls spooky.test.Demo
through spooky's TCP listener and prints one line per call."""

import argparse
import sys

import grpc


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--name", default="localhost")
    a = p.parse_args()

    with open(a.ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    channel = grpc.secure_channel(
        f"127.0.0.1:{a.port}", creds, options=(("grpc.ssl_target_name_override", a.name),)
    )
    say = channel.unary_unary("/spooky.test.Demo/Say")
    resp, call = say.with_call(b"grpc", timeout=10)
    trailers = dict(call.trailing_metadata() or ())
    print(f"unary {resp.decode()} code={call.code().name} served-by={trailers.get('x-served-by')}")

    count = channel.unary_stream("/spooky.test.Demo/Count")
    items = [m.decode() for m in count(b"5", timeout=10)]
    print("stream " + ",".join(items))

    fail = channel.unary_unary("/spooky.test.Demo/Fail")
    try:
        fail(b"", timeout=10)
        print("fail unexpectedly succeeded")
    except grpc.RpcError as e:
        print(f"fail code={e.code().name} details={e.details()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
