"""Protocol buffers for dsmath's gRPC services, with generated code committed next to each ``.proto``.

Regenerate after editing a ``.proto`` (from the repo root)::

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. dsmath/proto/<name>.proto

The generated code refuses, at import, a grpcio or protobuf older than the tools that generated it
(``GRPC_GENERATED_VERSION``, ``Protobuf Python Version``): after regenerating with newer tools, raise the ``grpcio``
and ``protobuf`` floors in pyproject.toml to those versions. tests/test_status.py checks both, ignoring the stamps
when it compares regenerated code with the committed code.
"""
