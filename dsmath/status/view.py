"""Compact terminal rendering of a :class:`RunSnapshot` (what ``dsmath status`` prints).

Pure string functions: no terminal queries, no colour, so the output is the same in a pipe, a log and
a test. Guaranteed: every line fits in ``width`` columns (default 100) except over-long paths and names.
"""

from __future__ import annotations

import datetime as _dt
import time

from dsmath.status.snapshot import RunSnapshot

SPARK_CHARS = "▁▂▃▄▅▆▇█"
# One fill character per stage, so the bar reads without colour.
BAR_STAGES = (("generate", "generate_s", "█"), ("reward", "reward_s", "▓"), ("train", "train_s", "▒"), ("sync", "sync_s", "░"))


def sparkline(values: list[float] | tuple[float, ...], width: int = 30) -> str:
    """One character per value (the last ``width`` values), scaled between their min and max.

    A flat series renders at mid height, so "no change" is not mistaken for "zero".
    """
    vals = list(values)[-width:]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        return SPARK_CHARS[len(SPARK_CHARS) // 2 - 1] * len(vals)
    top = len(SPARK_CHARS) - 1
    return "".join(SPARK_CHARS[round((v - lo) / (hi - lo) * top)] for v in vals)


def format_duration(seconds: float) -> str:
    """``3h12m``, ``4m05s``, ``12.3s``; ``?`` for unknown (negative)."""
    if seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s"


def format_count(n: float) -> str:
    """``950``, ``12.3k``, ``4.56M``, ``1.20G``."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.1f}"


def time_split_bar(snapshot: RunSnapshot, width: int = 40) -> str:
    """``[████████▓▓▒▒▒▒░]`` with stage widths proportional to the seconds spent; empty when nothing timed."""
    total = snapshot.time_split.total_s
    if total <= 0:
        return ""
    parts = []
    used = 0
    for i, (_, attr, ch) in enumerate(BAR_STAGES):
        secs = getattr(snapshot.time_split, attr)
        # the last stage takes the rounding remainder so the bar is always exactly `width` wide
        n = width - used if i == len(BAR_STAGES) - 1 else round(secs / total * width)
        n = max(0, min(n, width - used))
        parts.append(ch * n)
        used += n
    return "[" + "".join(parts) + "]"


def _ts(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if t > 0 else "?"


def render(snapshot: RunSnapshot, *, source: str = "", now: float | None = None) -> str:
    """The multi-line view. ``source`` says where the figures came from (an address or a directory)."""
    now = time.time() if now is None else now
    s = snapshot
    lines: list[str] = []
    pct = f" ({100.0 * s.step / s.total_steps:.1f}%)" if s.total_steps > 0 else ""
    total = str(s.total_steps) if s.total_steps > 0 else "?"
    head = f"{s.run_name or '(unnamed run)'}  [{s.state}]  step {s.step}/{total}{pct}"
    if s.state == "running":
        head += f"  ETA {format_duration(s.eta_s)}"
    lines.append(head)
    age = f"updated {format_duration(max(0.0, now - s.updated_at))} ago" if s.updated_at > 0 else ""
    lines.append(f"  started {_ts(s.started_at)}   {age}" + (f"   from {source}" if source else ""))
    if s.message:
        lines.append(f"  message: {s.message}")

    def trend_line(label: str, vals: tuple[float, ...]) -> str:
        if not vals:
            return f"{label:<9} -"
        return (
            f"{label:<9} {sparkline(vals):<30} last {vals[-1]:.3f}  "
            f"min {min(vals):.3f}  max {max(vals):.3f}  (n={len(vals)})"
        )

    lines.append(trend_line("reward", s.reward_trend))
    lines.append(trend_line("accuracy", s.accuracy_trend))
    lines.append(f"{'tokens/s':<9} {format_count(s.tokens_per_s)}")

    bar = time_split_bar(s)
    if bar:
        t = s.time_split
        legend = "  ".join(
            f"{ch}{name} {100 * getattr(t, attr) / t.total_s:.0f}%" for name, attr, ch in BAR_STAGES
        )
        lines.append(f"{'step time':<9} {format_duration(t.total_s)}  {bar}")
        lines.append(f"{'':<9} {legend}")

    if s.generators:
        alive = sum(g.alive for g in s.generators)
        versions = {g.weight_version for g in s.generators if g.alive}
        lines.append(f"generators {alive}/{len(s.generators)} alive" + ("" if len(versions) <= 1 else "  (weight versions differ)"))
        lines.append(f"  {'id':>4} {'alive':<5} {'weights':>8} {'requests':>9} {'tokens':>9}")
        for g in s.generators:
            lines.append(
                f"  {g.id:>4} {'yes' if g.alive else 'NO':<5} {g.weight_version:>8} "
                f"{format_count(g.requests):>9} {format_count(g.tokens):>9}"
            )
    if s.queues:
        lines.append(
            "queues    "
            + "   ".join(f"{q.name}: depth {q.depth}, timeouts {100 * q.timeout_rate:.1f}%" for q in s.queues)
        )
    m = dict(s.metrics)
    if any(k.startswith("faults/") for k in m):
        lines.append(f"{'restarts':<10} generators {int(m.get('faults/generator_restarts', 0))}, reward workers "
                     f"{int(m.get('faults/reward_worker_restarts', 0))}; samples reissued "
                     f"{int(m.get('faults/reissued_samples', 0))}")
    if m.get("staleness/max", 0) > 0 or m.get("dynamic_sampling/dropped_groups", 0) > 0:
        lines.append(f"{'off-policy':<10} staleness mean {m.get('staleness/mean', 0.0):.2f} max "
                     f"{int(m.get('staleness/max', 0))}; dynamic sampling dropped "
                     f"{int(m.get('dynamic_sampling/dropped_groups', 0))} groups")
    ck = f"step {s.last_checkpoint.step}  {s.last_checkpoint.path}" if s.last_checkpoint else "-"
    ev = f"step {s.last_eval.step}  accuracy {s.last_eval.accuracy:.3f}" if s.last_eval else "-"
    lines.append(f"{'checkpoint':<10} {ck}")
    lines.append(f"{'eval':<10} {ev}")
    return "\n".join(lines)
