"""Stubs generated from `reflex/v1/reflex.proto` by tools/generate_stubs.py (do not edit).

`reflex_pb2` holds the messages, `reflex_pb2_grpc` the `PolicyStub` and `RecorderStub`.
They live here, not under a top-level `reflex`, which is the seed tool's package name.
"""
