"""Malformed calls a stock client can send: raw bytes as a request.

usage: raw_calls.py SOCKET_PATH
Prints one JSON object per case: {"case", "code", "message"}.
"""

import json
import sys

import grpc

METHOD = "/jitgate.v1.JitGate/RequestAccess"

CASES = {
    # Field 1 (request_id, a string) holding bytes that are not UTF-8.
    "invalid-utf8": bytes([0x0A, 0x02, 0xFF, 0xFE]),
    # Field 5 tag then a varint whose continuation bit never ends.
    "truncated-varint": bytes([0x0A, 0x01, 0x61, 0x28, 0xFF, 0xFF]),
    # A 5 MB request_id.
    "oversize": bytes([0x0A, 0xC0, 0x96, 0xB1, 0x02]) + b"x" * 5_000_000,
}


def main():
    with grpc.insecure_channel(f"unix://{sys.argv[1]}") as channel:
        call = channel.unary_unary(
            METHOD,
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        for case, raw in CASES.items():
            try:
                call(raw, timeout=20)
                code, message = "OK", ""
            except grpc.RpcError as error:
                code, message = error.code().name, error.details()
            print(json.dumps({"case": case, "code": code, "message": message}), flush=True)


if __name__ == "__main__":
    main()
