"""The floor: an ext_authz server that does the least any real one must do.

Same gRPC stack as the sidecar (grpc.aio, the project's generated protos, one process);
each Check parses the JSON body, as every decision must, and allows with the one header
the rendered Envoy requires on every allow (the splice plan "-": leave the body alone):
no key lookup, no policy, no routing.

    python -m bench.noop_server --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

import grpc

from extauthz.proto.envoy.config.core.v3 import base_pb2
from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from extauthz.proto.google.rpc import status_pb2
from extauthz.domain.envoy_names import NO_SPLICE, SPLICE_HEADER

NO_REWRITE = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=SPLICE_HEADER, value=NO_SPLICE))


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request: external_auth_pb2.CheckRequest, context: Any) -> external_auth_pb2.CheckResponse:
        json.loads(request.attributes.request.http.raw_body or b"{}")
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0),
                                               ok_response=external_auth_pb2.OkHttpResponse(headers=[NO_REWRITE]))


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(1)


def main() -> None:
    p = argparse.ArgumentParser(description="no-op ext_authz server (benchmark floor)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
