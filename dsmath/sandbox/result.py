"""What one sandboxed run produced."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one program run in the sandbox.

    ``exit_code`` is the program's exit status, or None when a signal ended it (then ``signal`` is set).
    Every field except ``memory_exceeded`` comes from the kernel (wait status, the pool's own pipes, the
    supervisor's clock), so the program cannot forge it. ``memory_exceeded`` is True when the program
    died of a ``MemoryError`` (its address-space cap) or was SIGKILLed while under its deadline (the
    kernel's OOM killer); the first is read from the program's stderr, so a program can make itself look
    out of memory, but never make a failed run look successful.
    """

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    memory_exceeded: bool
    output_truncated: bool
    signal: int | None
    wall_s: float
    cpu_s: float = 0.0

    @property
    def ok(self) -> bool:
        """Exited by itself with status 0, inside its limits."""
        return self.exit_code == 0 and not self.timed_out and not self.memory_exceeded
