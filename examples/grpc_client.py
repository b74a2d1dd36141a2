"""A Python gRPC client of the Gemma 4 serving API: a streamed chat, then a unary completion.

    python examples/grpc_client.py --target 127.0.0.1:9000 "Why is the sky blue?"
    python examples/grpc_client.py --target gemma.example.com:9443 --tls-ca ca.pem --api-key $KEY "Hi"

Stubs are generated from protos/ into the platform package (gemma4_platform.api.v1); another
language generates its own from the same .proto file.
"""

from __future__ import annotations

import argparse

import grpc

from gemma4_platform.api.v1 import serving_pb2 as pb
from gemma4_platform.api.v1 import serving_pb2_grpc as pb_grpc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--target", default="127.0.0.1:9000")
    parser.add_argument("--tls-ca", help="CA certificate (PEM) to verify a TLS endpoint")
    parser.add_argument("--api-key")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--thinking", action="store_true")
    args = parser.parse_args()

    if args.tls_ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=open(args.tls_ca, "rb").read())
        channel = grpc.secure_channel(args.target, credentials)
    else:
        channel = grpc.insecure_channel(args.target)
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    stub = pb_grpc.Gemma4ServingStub(channel)
    sampling = pb.SamplingParams(max_tokens=args.max_tokens, temperature=0.7)

    chat = pb.ChatRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text=args.prompt)])],
        thinking=args.thinking,
        sampling=sampling,
    )
    for message in stub.ChatStream(chat, metadata=metadata, timeout=120):  # the deadline travels with the call
        kind = message.WhichOneof("delta")
        if kind == "thinking":
            print(f"[thinking] {message.thinking}", end="", flush=True)
        elif kind == "text":
            print(message.text, end="", flush=True)
        elif kind == "tool_call":
            print(f"\n[tool call] {message.tool_call.name}({message.tool_call.arguments_json})")
        if message.finish_reason:
            print(f"\n-- {pb.FinishReason.Name(message.finish_reason)}, usage: {message.usage}".rstrip())

    reply = stub.Generate(pb.GenerateRequest(text=args.prompt, sampling=sampling), metadata=metadata, timeout=120)
    print(f"completion: {reply.text!r} ({reply.usage.completion_tokens} tokens)")


if __name__ == "__main__":
    main()
