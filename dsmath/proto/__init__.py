"""Protocol buffers for dsmath's gRPC services, with generated code committed next to each ``.proto``.

Regenerate after editing a ``.proto`` (from the repo root)::

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. dsmath/proto/<name>.proto
"""
