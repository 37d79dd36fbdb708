"""A stock gRPC client (Python grpcio) against the agent's Unix socket.

Default channel options only: no grpc.default_authority, no .proto file.
It finds the API through server reflection, then calls it. Prints one JSON
object per step on stdout; exits non-zero on the first failure.

usage: stock_client.py SOCKET_PATH
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def call(channel, pool, service, method, fields):
    """Calls a unary method known only through reflection."""
    descriptor = pool.FindServiceByName(service).FindMethodByName(method)
    request_class = GetMessageClass(descriptor.input_type)
    response_class = GetMessageClass(descriptor.output_type)
    stub = channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    return stub(request_class(**fields), timeout=10)


def main():
    socket_path = sys.argv[1]
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        print(json.dumps({"step": "health", "status": answer.status}), flush=True)

        reflection = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(reflection.get_services())
        print(json.dumps({"step": "reflection", "services": services}), flush=True)

        pool = descriptor_pool.DescriptorPool(reflection)
        status = call(channel, pool, "jitgate.v1.JitGate", "GetStatus", {})
        print(
            json.dumps(
                {
                    "step": "GetStatus",
                    "version": status.version,
                    "configured_mode": status.configured_mode,
                }
            ),
            flush=True,
        )
        try:
            call(channel, pool, "jitgate.v1.JitGate", "RevokeGrant", {"grant_id": 424242})
            print(json.dumps({"step": "RevokeGrant", "code": "OK"}), flush=True)
        except grpc.RpcError as error:
            print(
                json.dumps(
                    {
                        "step": "RevokeGrant",
                        "code": error.code().name,
                        "message": error.details(),
                    }
                ),
                flush=True,
            )

        # Two requests in one batch: each answered in its place, the
        # refused one with the code a call of its own would have got.
        batch = call(
            channel,
            pool,
            "jitgate.v1.JitGate",
            "RequestAccessBatch",
            {
                "requests": [
                    {
                        "request_id": f"python-{source}",
                        "ports": [{"port": 22, "source": source}],
                        "duration": {"seconds": 60},
                        "requester": "python",
                    }
                    for source in ["198.51.100.7", "not-an-address"]
                ]
            },
        )
        results = []
        for result in batch.results:
            if result.WhichOneof("outcome") == "response":
                results.append({"grants": [g.source for g in result.response.grants]})
            else:
                results.append(
                    {"code": result.refusal.code, "message": result.refusal.message}
                )
        print(json.dumps({"step": "RequestAccessBatch", "results": results}), flush=True)


if __name__ == "__main__":
    main()
