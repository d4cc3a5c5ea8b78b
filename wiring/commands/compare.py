"""``dsmath compare``: several training configs, same seed, same sample budget → a table and a plot.

The shape of DeepSeekMath Figure 5: held-out accuracy against samples trained, one curve per config
(e.g. GRPO vs online RFT vs RFT).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HELP = "run several configs with the same seed and sample budget; table + plot of held-out accuracy"
DESCRIPTION = """Run several training configs one after another with the same seed and the same budget of
samples trained, then write a table and a plot of held-out greedy accuracy against samples trained
(DeepSeekMath Figure 5). Each --config is a preset name or a YAML file; a YAML file is read as changes on
top of --base (so it may hold only what differs, e.g. `algorithm: {name: rft, beta: 0.0}`).

examples:
  dsmath compare --config grpo.yaml --config online_rft.yaml --config rft.yaml --samples 2048 --eval-every 4
  dsmath compare --config a.yaml --config b.yaml --out runs/compare rollout.max_new_tokens=64

writes OUT/NAME/ (each run: metrics.jsonl, summary.json, ...), OUT/compare.md, OUT/compare.json, OUT/compare.png
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides applied to every config after its own file, e.g. rollout.group_size=8")
    p.add_argument("--config", action="append", required=True, metavar="PRESET_OR_YAML",
                   help="a config to run (repeat, at least twice); its name is the file stem")
    p.add_argument("--base", default="tiny_cpu",
                   help="preset or YAML every --config file is applied on top of (default: tiny_cpu)")
    p.add_argument("--samples", type=int,
                   help="samples trained per run (steps = samples / (questions_per_step × group_size); must divide); "
                        "default: the first config's steps × its samples per step")
    p.add_argument("--seed", type=int, help="the seed every run uses (default: the first config's)")
    p.add_argument("--eval-every", type=int,
                   help="held-out evaluation every N steps (the curve's points; default: the configs' eval_every, "
                        "or a quarter of the steps when that is 0)")
    p.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    p.add_argument("--reuse", action="store_true",
                   help="skip a run whose folder already holds a summary.json made with the identical config")
    p.add_argument("--no-progress", action="store_true", help="no per-step progress bars")


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict:
    """A training config file's mapping; a key that moved (``grpo:`` -> ``algorithm:``) is refused naming this file."""
    from dsmath.config import read_yaml_mapping, refuse_renamed_keys

    data = read_yaml_mapping(path)
    refuse_renamed_keys(data, str(path))
    return data


def resolve_configs(args: argparse.Namespace, out: Path) -> list[tuple[str, object]]:
    """``(name, TrainConfig)`` per --config with the shared seed, budget, eval cadence and run dir applied."""
    from dsmath.config import ConfigError, load_config, resolve_preset
    from dsmath.errors import UserError

    if len(args.config) < 2:
        raise UserError("--config: give at least two configs to compare")
    base = _read_yaml(resolve_preset(args.base))
    merged: list[tuple[str, dict]] = []
    for item in args.config:
        path = resolve_preset(item)
        name = path.stem
        if any(name == n for n, _ in merged):
            raise UserError(f"--config: two configs are named {name!r} (file stems must differ)")
        merged.append((name, _deep_merge(base, _read_yaml(path))))
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: _write(out / f"{name}.config.yaml", data) for name, data in merged}

    def load(name: str, extra: list[str]):
        try:
            return load_config(paths[name], list(args.overrides) + extra)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None

    first = load(merged[0][0], [])
    seed = args.seed if args.seed is not None else first.seed
    samples = args.samples if args.samples is not None else (
        first.steps * first.rollout.questions_per_step * first.rollout.group_size)
    if samples <= 0:
        raise UserError(f"--samples: must be > 0, got {samples}")
    configs = []
    for name, _data in merged:
        cfg = load(name, [])
        per = cfg.rollout.questions_per_step * cfg.rollout.group_size
        if samples % per:
            raise UserError(f"--samples: {samples} is not a multiple of {name}'s {per} samples per step "
                            "(rollout.questions_per_step × rollout.group_size)")
        steps = samples // per
        eval_every = args.eval_every if args.eval_every is not None else (cfg.eval_every or max(1, steps // 4))
        if eval_every <= 0:
            raise UserError(f"--eval-every: must be > 0, got {eval_every}")
        configs.append((name, load(name, [f"seed={seed}", f"steps={steps}", f"eval_every={eval_every}",
                                          f"run_dir={out / name}"])))
    return configs


def _write(path: Path, data: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def accuracy_curve(run_dir: Path) -> list[tuple[int, int, float]]:
    """``(step, samples_trained, held-out accuracy)`` points of a finished run: before RL, every
    ``eval_every`` step, after RL. Read from its metrics.jsonl and summary.json."""
    from dsmath.utils.metrics import read_metrics

    summary = json.loads((run_dir / "summary.json").read_text())
    points = [(0, 0, float(summary["heldout_accuracy_before"]))]
    for row in read_metrics(run_dir):
        if row.get("eval/accuracy") is not None:
            points.append((int(row["step"]), int(row["samples_trained"]), float(row["eval/accuracy"])))
    points.append((int(summary["steps"]), int(summary["samples_trained"]), float(summary["heldout_accuracy_after"])))
    return points


def _same_config(run_dir: Path, cfg) -> bool:
    import yaml

    from dsmath.config import to_dict

    saved = run_dir / "config.yaml"
    return (run_dir / "summary.json").exists() and saved.exists() and yaml.safe_load(saved.read_text()) == to_dict(cfg)


def table(rows: list[dict]) -> str:
    """The Markdown table of compare.md."""
    lines = ["| config | algorithm | sampling | steps | samples trained | held-out before | held-out after | "
             "best | Δ after | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['algorithm']} | {r['sampling']} | {r['steps']} | {r['samples_trained']:,} | "
                     f"{r['before']:.1%} | **{r['after']:.1%}** | {r['best']:.1%} | {r['after'] - r['before']:+.1%} | "
                     f"{r['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """compare.png: held-out accuracy against samples trained, one line per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r in rows:
        xs = [p[1] for p in r["curve"]]
        ys = [100 * p[2] for p in r["curve"]]
        ax.plot(xs, ys, marker="o", label=f"{r['name']} ({r['algorithm']}, {r['sampling']})")
    ax.set_xlabel("samples trained")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from dsmath.methods import resolve_sampling

    out = Path(args.out)
    configs = resolve_configs(args, out)
    from dsmath.logs import log_to

    log_to(out / "logs" / "driver.log")  # while quiet (the default): the libraries' lines of every run
    from wiring.driver import train

    rows = []
    for i, (name, cfg) in enumerate(configs, 1):
        run_dir = Path(cfg.run_dir)
        sampling = resolve_sampling(cfg.algorithm.name, cfg.algorithm.sampling)
        print(f"[compare] {i}/{len(configs)} {name}: {cfg.algorithm.name}, {sampling} sampling, {cfg.steps} steps "
              f"× {cfg.rollout.questions_per_step * cfg.rollout.group_size} samples, seed {cfg.seed} -> {run_dir}",
              flush=True)
        start = time.time()
        if args.reuse and _same_config(run_dir, cfg):
            print(f"[compare] {name}: reusing the finished run in {run_dir}", flush=True)
        else:
            train(cfg, progress=not args.no_progress)
        summary = json.loads((run_dir / "summary.json").read_text())
        curve = accuracy_curve(run_dir)
        rows.append({"name": name, "algorithm": cfg.algorithm.name, "sampling": sampling, "steps": summary["steps"],
                     "samples_trained": summary["samples_trained"], "before": summary["heldout_accuracy_before"],
                     "after": summary["heldout_accuracy_after"], "best": max(p[2] for p in curve),
                     "wall_seconds": summary["wall_seconds"], "curve": curve, "run_dir": str(run_dir)})
        print(f"[compare] {i}/{len(configs)} {name}: held-out {summary['heldout_accuracy_before']:.1%} -> "
              f"{summary['heldout_accuracy_after']:.1%} ({time.time() - start:.0f} s)", flush=True)
    heldout = json.loads((Path(rows[0]["run_dir"]) / "summary.json").read_text())["heldout_size"]
    title = (f"held-out accuracy ({heldout} problems) vs samples trained, seed {configs[0][1].seed}")
    text = table(rows)
    (out / "compare.md").write_text(f"# dsmath compare\n\n{title}\n\n{text}")
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "compare.png", title)
    print(text, end="")
    print(f"[compare] wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")
    return 0
