"""Generated protobuf modules: Prometheus remote-write and Loki push payloads, and partial OTLP views.

The ``.proto`` files beside them are kotel's own (message names and field numbers are facts of the
protocols). The gencode needs a protobuf runtime at least as new as the protoc that produced it
(``# Protobuf Python Version`` in each ``*_pb2.py``). Regenerate from the repository root with::

    .venv/bin/python -m grpc_tools.protoc -I streams/sinks/proto \\
        --python_out=streams/sinks/proto --pyi_out=streams/sinks/proto \\
        streams/sinks/proto/remote_write.proto streams/sinks/proto/loki_push.proto \\
        streams/sinks/proto/otlp_views.proto
"""

from streams.sinks.proto import loki_push_pb2, remote_write_pb2

__all__ = ["loki_push_pb2", "remote_write_pb2"]
