"""The wiring layer's own terminal lines: ``[dsmath] ...`` on stdout, flushed (also from Ray job logs)."""


def log(msg: str) -> None:
    print(f"[dsmath] {msg}", flush=True)
