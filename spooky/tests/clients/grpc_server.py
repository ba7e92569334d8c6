"""A gRPC server on grpcio (the reference C-core implementation): the
backend of spooky's gRPC tests, over cleartext HTTP/2 (h2c).

Service spooky.test.Demo, raw-bytes messages (gRPC does not care):
  Say(name)   -> b"hello " + name          (unary, trailer x-served-by)
  Count(n)    -> b"item 0" .. b"item n-1"  (server streaming)
  Fail(_)     -> NOT_FOUND "no such thing"
"""

import argparse
import sys
from concurrent import futures

import grpc


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--id", default="grpc")
    a = p.parse_args()

    def say(request, context):
        context.set_trailing_metadata((("x-served-by", a.id),))
        return b"hello " + request

    def count(request, context):
        for i in range(int(request.decode())):
            yield f"item {i}".encode()

    def fail(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    handler = grpc.method_handlers_generic_handler(
        "spooky.test.Demo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"127.0.0.1:{a.port}")
    server.start()
    print(f"grpc-server {a.id} listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
