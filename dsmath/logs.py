"""Quiet terminals: the libraries' log lines (vLLM, Ray, Ray Data, transformers, DeepSpeed, torch) go to a file; the
terminal keeps dsmath's own lines, errors, dsmath's warnings and progress bars.

:func:`quiet` turns it on for one command (the CLI does, unless ``--verbose``): every log record of a logger outside
dsmath's packages goes to the log file, and to the terminal (stderr) too when it is ERROR or worse; Python warnings
issued from dsmath's own files still print, the libraries' go to the file; the Hugging Face progress bars are off
(``HF_HUB_DISABLE_PROGRESS_BARS``). The file is named by :func:`log_to` (a command's run or output folder) and
opened at its first line, which prints its path once; a command that names none gets a temporary file, said the
same way, when it heard a warning or worse (or more than a few thousand lines); INFO chatter alone is dropped. Ray workers started by a command that asks for it (``wiring.cluster``) run :func:`quiet_worker` first
(Ray's ``worker_process_setup_hook``): their whole stdout/stderr goes to ``LOGDIR/worker-PID.log`` and only their
ERROR records and dsmath's warnings reach Ray's stream, which Ray forwards to the driver's terminal; a command's
``multiprocessing`` children do the same through :func:`quiet_child`.

Guaranteed: no record at ERROR or above and no exception is hidden (Ray raises an actor's error in the driver as
before); nothing a library prints straight to a file descriptor of the driver (C++ warnings) is caught. The
libraries' own handlers are bypassed while quiet, so Ray's session log ``ray-data.log`` and vLLM's format are not
used; the file's lines read ``TIME LEVEL LOGGER: message``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator, TextIO

# dsmath's own packages: their loggers and warnings stay on the terminal
OURS = ("dsmath", "wiring", "actors", "learner", "data_pipeline", "bench", "__main__")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OUR_DIRS = tuple(os.path.join(_ROOT, p) + os.sep for p in OURS[:-1])
WORKER_LOG_DIR_ENV = "DSMATH_WORKER_LOG_DIR"
WORKER_HOOK = "dsmath.logs.quiet_worker"  # Ray's runtime_env worker_process_setup_hook
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # transformers' "Loading weights" / "Writing model shards" bars
_BUFFER_MAX = 2000  # lines held before a file is named; more spill to a temporary file
_FILE_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
_TERMINAL_FORMAT = logging.Formatter("%(levelname)s %(name)s: %(message)s")
_LIBRARY_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _ours(name: str) -> bool:
    return name.split(".", 1)[0] in OURS


class _Router:
    """Where a quiet process's records go: the log file (opened at its first line) and, for errors, the terminal."""

    def __init__(self, terminal: TextIO, announce: Callable[[str], None], file: TextIO | None = None) -> None:
        self.terminal, self.announce, self.file = terminal, announce, file
        self.path: Path | None = None
        self.buffer: list[str] = []
        self.worth_keeping = False  # the held lines include a warning or worse
        self.lock = threading.RLock()

    def handle(self, record: logging.LogRecord) -> None:
        if _ours(record.name):
            self.to_terminal(_TERMINAL_FORMAT.format(record) if record.levelno >= logging.WARNING
                             else record.getMessage())
            return
        if record.levelno >= logging.ERROR:
            self.to_terminal(_TERMINAL_FORMAT.format(record))
        if record.levelno >= logging.INFO:  # a library's DEBUG logger (torch's trace) is not kept
            self.to_file(_FILE_FORMAT.format(record), keep=record.levelno >= logging.WARNING)

    def to_terminal(self, text: str) -> None:
        with self.lock, contextlib.suppress(Exception):
            self.terminal.write(text.rstrip("\n") + "\n")
            self.terminal.flush()

    def to_file(self, text: str, keep: bool = True) -> None:
        with self.lock:
            if self.file is None and self.path is None:
                self.buffer.append(text)
                self.worth_keeping = self.worth_keeping or keep
                if len(self.buffer) < _BUFFER_MAX:
                    return
                self.path = _temp_log()
            if self.file is None:
                self._open()
            with contextlib.suppress(Exception):
                self.file.write(text.rstrip("\n") + "\n")
                self.file.flush()

    def _open(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a", encoding="utf-8", errors="replace")
        self.announce(f"library logs (vLLM, Ray, transformers, DeepSpeed, ...): {self.path} "
                      "(dsmath --verbose prints them here)")
        held, self.buffer = self.buffer, []
        for text in held:
            self.file.write(text.rstrip("\n") + "\n")

    def close(self) -> None:
        """Write what is held: to the named file, else to a temporary one when it holds a warning or worse (a
        command with no folder of its own that only heard INFO chatter leaves no file behind)."""
        with self.lock:
            if self.buffer and self.file is None and (self.path is not None or self.worth_keeping):
                if self.path is None:
                    self.path = _temp_log()
                self._open()
            if self.file is not None and self.file is not sys.stderr:
                self.file.close()
            self.file = None


def _temp_log() -> Path:
    fd, name = tempfile.mkstemp(prefix="dsmath-", suffix=".log")
    os.close(fd)
    return Path(name)


_ROUTER: _Router | None = None


class _RoutedLogger(logging.Logger):
    """A logger whose records go to the router while quiet (the library's own handlers are skipped), and to its
    handlers as usual otherwise."""

    def callHandlers(self, record: logging.LogRecord) -> None:  # noqa: N802 - the logging API's name
        router = _ROUTER
        if router is not None and not _ours(self.name):
            router.handle(record)
            return
        super().callHandlers(record)


class _RouterHandler(logging.Handler):
    """On the root logger: records of loggers that were not routed themselves (ours, or plain ones)."""

    def emit(self, record: logging.LogRecord) -> None:
        router = _ROUTER
        if router is not None:
            router.handle(record)


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings API
    router = _ROUTER
    text = warnings.formatwarning(message, category, filename, lineno, line)
    if router is None:
        sys.stderr.write(text)
        return
    if str(filename).startswith(_OUR_DIRS) and not issubclass(category, _LIBRARY_WARNINGS):
        router.to_terminal(text)
    router.to_file(text, keep=not issubclass(category, _LIBRARY_WARNINGS))


def _install(router: _Router) -> Callable[[], None]:
    """Route every logger (those already made, and those made later) and warnings; returns the undo."""
    global _ROUTER
    _ROUTER = router
    manager = logging.Logger.manager
    for logger in list(manager.loggerDict.values()):
        if type(logger) is logging.Logger:  # made before: same layout, only callHandlers differs
            logger.__class__ = _RoutedLogger
    previous_class = logging.getLoggerClass()
    logging.setLoggerClass(_RoutedLogger)
    root = logging.getLogger()
    handler, level = _RouterHandler(), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # libraries that set no level log INFO to the file
    previous_show = warnings.showwarning
    warnings.showwarning = _showwarning

    def undo() -> None:
        global _ROUTER
        warnings.showwarning = previous_show
        root.removeHandler(handler)
        root.setLevel(level)
        logging.setLoggerClass(previous_class)
        router.close()
        _ROUTER = None  # routed loggers behave as plain ones from here on

    return undo


@contextlib.contextmanager
def quiet(enabled: bool = True, announce: Callable[[str], None] | None = None) -> Iterator[None]:
    """Quiet logging for the duration (nothing changes when not ``enabled``). ``announce`` prints the log file's
    path once (default: a ``[dsmath]`` line on stdout). Environment variables it sets are restored after."""
    if not enabled or _ROUTER is not None:
        yield
        return
    added = {k: v for k, v in QUIET_ENV.items() if k not in os.environ}
    os.environ.update(added)
    undo = _install(_Router(sys.stderr, announce or (lambda line: print(f"[dsmath] {line}", flush=True))))
    try:
        yield
    finally:
        undo()
        for key in added:
            os.environ.pop(key, None)


def log_to(path: str | Path) -> None:
    """While quiet, the libraries' lines of this process go to ``path`` (created at its first line, with the lines
    held so far); Ray workers that :func:`worker_env` is given to write beside it. The first folder named wins: a
    command that runs others (``compare``, ``iterate``) keeps every line in its own. No effect when not quiet."""
    router = _ROUTER
    if router is None:
        return
    with router.lock:
        if router.path is None:
            router.path = Path(path).absolute()


def worker_env() -> dict[str, str]:
    """``env_vars`` for Ray workers that should be quiet too (empty when this process is not quiet): their log
    folder is the one of :func:`log_to` (a temporary folder when none was named)."""
    router = _ROUTER
    if router is None:
        return {}
    with router.lock:
        if router.path is None and os.environ.get(WORKER_LOG_DIR_ENV):  # a quiet worker: its own folder
            return {WORKER_LOG_DIR_ENV: os.environ[WORKER_LOG_DIR_ENV], **QUIET_ENV}
        if router.path is None:
            router.path = Path(tempfile.mkdtemp(prefix="dsmath-logs-")) / "driver.log"
        return {WORKER_LOG_DIR_ENV: str(router.path.parent), **QUIET_ENV}


def quiet_child(env: dict[str, str]) -> None:
    """``multiprocessing`` initializer for a child process of a quiet command (``initargs=(worker_env(),)``): the
    child's stdout and stderr go to ``worker-PID.log`` beside the command's log, as a Ray worker's do
    (:func:`quiet_worker`). An empty ``env`` (the command is not quiet) leaves the child as it is."""
    os.environ.update(env)
    quiet_worker()


def quiet_worker() -> None:
    """Ray ``worker_process_setup_hook``: this worker's stdout and stderr go to ``$DSMATH_WORKER_LOG_DIR/
    worker-PID.log``; its ERROR records and dsmath's warnings still go to Ray's stream (forwarded to the driver).
    A folder this node cannot write leaves the worker as it was."""
    log_dir = os.environ.get(WORKER_LOG_DIR_ENV)
    if not log_dir or _ROUTER is not None:
        return
    try:
        os.makedirs(log_dir, exist_ok=True)
        fd = os.open(os.path.join(log_dir, f"worker-{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                     0o644)
    except OSError:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(QUIET_ENV)
    _install(_Router(terminal, announce=lambda line: None, file=sys.stderr))
