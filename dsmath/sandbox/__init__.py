"""A real sandbox for model-written Python (see README.md here for what it guarantees and how).

``run(code, timeout_s=, memory_mb=, max_output_bytes=) -> ExecResult`` uses a lazily created default
:class:`SandboxPool`; program-of-thought rewards and tool-integrated helpers live in ``dsmath.sandbox.pot``;
the gRPC service and client in ``dsmath.sandbox.service`` (imports grpc only there).
"""

from dsmath.sandbox.pool import Limits, SandboxCancelled, SandboxError, SandboxPool, default_pool, run
from dsmath.sandbox.runner import runner_for
from dsmath.sandbox.pot import PotReward, extract_program, format_tool_output, pot_reward, split_tool_call
from dsmath.sandbox.result import ExecResult

__all__ = ["ExecResult", "Limits", "PotReward", "SandboxCancelled", "SandboxError", "SandboxPool", "default_pool",
           "extract_program", "format_tool_output", "pot_reward", "run", "runner_for", "split_tool_call"]
