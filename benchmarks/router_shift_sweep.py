"""Where does router shift matter? A grid of (SFT model, learning rate, off-policy reuse) cells on Countdown.

In every cell the same trainer runs each ``--configs`` entry (default: GMPO and RSPO, which differ only by the
router-shift weight γ) for ``--seeds`` seeds. The report has two tables, one row per cell:

* **how far the router moves**: router shift (mean over MoE layers of the per-token |Δ log score| at the
  rollout's experts), the fraction of rollout top-K expert slots that are no longer in the current top-K
  (expert-set change rate), token IS-ratio std and clip fraction -- all measured in ``--reference`` runs
  (default GMPO, so no γ acts) -- and γ mean / p05 / fraction at the floor from the RS runs;
* **whether it changes the outcome**: held-out accuracy of the SFT model and of each configuration after
  ``--train-iters`` iterations (mean ± std over seeds), the RS − base difference for each pair present
  (GMPO→RSPO, GRPO→GRPO+RS, GSPO→GSPO+RS), and collapses (same definition as the stability study).

Runs go to ``<out-dir>/<model>/lr<lr>-<epochs>x<minibatches>/<config>/seed<seed>`` and are reused when
complete (same trainer command), so a sweep can be extended cell by cell.

    python benchmarks/router_shift_sweep.py --model e8=runs/countdown_tiny/sft --model e32=runs/e32/sft \\
        --data-dir data/countdown --lrs 3e-5 1e-4 3e-4 --reuse 2x8 --seeds 1 2 --jobs 2 \\
        --doc docs/router_shift_sweep.md
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/studylib

from studylib.analysis import CollapseCriterion, RunSummary, fmt, mean_std, summarize_run  # noqa: E402
from studylib.configs import (  # noqa: E402
    add_collapse_args,
    add_execution_args,
    add_trainer_args,
    common_trainer_flags,
    expand_runs,
    select_configs,
)
from studylib.runs import (  # noqa: E402
    REPO,
    Run,
    StudyConfig,
    load_plot_metrics,
    load_run,
    log_tail,
    machine_description,
    model_description,
    run_pending,
    write_markdown,
)

# (base, base + router shift): the RS − base differences the outcome table reports when both are run
RS_PAIRS = (("gmpo", "rspo"), ("grpo", "grpo_rs"), ("gspo", "gspo_rs"), ("gmpo", "rspo_post"),
            ("gmpo", "rspo_floor05"), ("gmpo", "rspo_floor09"))


@dataclass(frozen=True)
class Cell:
    model: str  # --model NAME
    init_from: str
    lr: float
    epochs: int
    minibatches: int

    @property
    def name(self) -> str:
        return f"{self.model}/lr{self.lr:g}-{self.epochs}x{self.minibatches}"

    @property
    def steps_per_rollout(self) -> int:
        return self.epochs * self.minibatches


def parse_model(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path or "/" in name:
        raise argparse.ArgumentTypeError(f"--model wants NAME=CHECKPOINT (NAME without '/'), got {text!r}")
    return name, path


def parse_reuse(text: str) -> tuple[int, int]:
    try:
        e, m = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--reuse wants EPOCHSxMINIBATCHES like 2x8, got {text!r}") from None
    if e < 1 or m < 1:
        raise argparse.ArgumentTypeError(f"--reuse needs positive counts, got {text!r}")
    return e, m


def build_cells(models: list[tuple[str, str]], lrs: list[float], reuse: list[tuple[int, int]],
                extra: list[str]) -> list[Cell]:
    """The product grid, then each ``--cell MODEL:LR:EPOCHSxMINIBATCHES`` (duplicates dropped, order kept)."""
    paths = dict(models)
    cells = [Cell(m, paths[m], lr, e, mb) for (m, _), lr, (e, mb) in itertools.product(models, lrs, reuse)]
    for text in extra:
        parts = text.split(":")
        if len(parts) != 3 or parts[0] not in paths:
            raise SystemExit(f"--cell wants MODEL:LR:EPOCHSxMINIBATCHES with MODEL one of {sorted(paths)}, "
                             f"got {text!r}")
        try:
            lr, (e, mb) = float(parts[1]), parse_reuse(parts[2])
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise SystemExit(f"--cell {text!r}: {err}") from None
        cells.append(Cell(parts[0], paths[parts[0]], lr, e, mb))
    return list(dict.fromkeys(cells))


def cell_runs(cell: Cell, configs: list[StudyConfig], seeds: list[int], args: argparse.Namespace,
              python: str = sys.executable) -> list[Run]:
    ns = argparse.Namespace(**{**vars(args), "init_from": cell.init_from, "lr": cell.lr,
                               "ppo_epochs": cell.epochs, "num_minibatches": cell.minibatches})
    return expand_runs(configs, seeds, os.path.join(args.out_dir, cell.name), common_trainer_flags(ns), python,
                       cell=cell.name)


# ---------------------------------------------------------------------------------------------- report
@dataclass
class CellResult:
    cell: Cell
    summaries: list[RunSummary]

    def of(self, config: str) -> list[RunSummary]:
        return [s for s in self.summaries if s.config == config and s.status != "missing"]

    def stat(self, configs: list[str], attr: str) -> tuple:
        return mean_std([getattr(s, attr) for c in configs for s in self.of(c)])


def delta(result: CellResult, base: str, rs: str) -> tuple:
    """Mean RS − base final accuracy over seeds present on both sides (paired by seed), with its std."""
    a = {s.seed: s.final_acc for s in result.of(base)}
    b = {s.seed: s.final_acc for s in result.of(rs)}
    return mean_std([b[k] - a[k] for k in a if k in b and a[k] is not None and b[k] is not None])


def shift_table(results: list[CellResult], reference: str, rs_configs: list[str]) -> list[str]:
    lines = ["| cell | model | lr | steps / rollout | router shift | expert-set change | token IS-ratio std "
             "| clip frac | γ mean | γ p05 | at floor |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        c = r.cell
        ref = [fmt(r.stat([reference], a), ".3g") for a in ("router_shift", "expert_set_change", "is_ratio_std",
                                                            "clip_frac")]
        gam = [fmt(r.stat(rs_configs, a), f) for a, f in (("gamma", ".4f"), ("gamma_p05", ".4f"),
                                                          ("gamma_floor_frac", ".3g"))]
        lines.append("| " + " | ".join([f"`{c.name}`", model_description(c.init_from, short=True), f"{c.lr:g}",
                                         str(c.steps_per_rollout), *ref, *gam]) + " |")
    return lines


def outcome_table(results: list[CellResult], configs: list[StudyConfig], n_seeds: int) -> list[str]:
    names = [c.name for c in configs]
    pairs = [(b, rs) for b, rs in RS_PAIRS if b in names and rs in names]
    label = {c.name: c.label for c in configs}
    head = ["cell", "SFT acc", *[f"{c.label} final acc" for c in configs],
            *[f"Δ {label[rs]} − {label[b]}" for b, rs in pairs], "collapsed"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for r in results:
        collapsed = ", ".join(f"{label[c]} {sum(s.collapse_iter is not None for s in r.of(c))}/{n_seeds}"
                              for c in names if any(s.collapse_iter is not None for s in r.of(c))) or "none"
        cells = [f"`{r.cell.name}`", fmt(r.stat(names, "init_acc"), ".3f"),
                 *[fmt(r.stat([c], "final_acc"), ".3f", n_seeds) for c in names],
                 *[fmt(delta(r, b, rs), "+.3f") for b, rs in pairs], collapsed]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_sweep(results: list[CellResult], reference: str, configs: list[StudyConfig], path: str) -> bool:
    """Left: router shift vs lr, one line per (model, reuse). Right: RS − base accuracy vs router shift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.name for c in configs]
    pairs = [(b, rs) for b, rs in RS_PAIRS if b in names and rs in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    groups: dict[tuple[str, int, int], list[tuple[float, float, float]]] = {}
    for r in results:
        m, s, _ = r.stat([reference], "router_shift")
        if m is not None:
            groups.setdefault((r.cell.model, r.cell.epochs, r.cell.minibatches), []).append((r.cell.lr, m, s or 0.0))
    for (model, e, mb), pts in groups.items():
        pts.sort()
        ax1.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                     label=f"{model}, {e}x{mb} = {e * mb} steps/rollout")
    ax1.set_xscale("log")
    ax1.set_xlabel("learning rate")
    ax1.set_ylabel(f"router shift ({reference} runs)")
    ax1.set_title("how far the router moves within one rollout's updates", fontsize=10)
    ax1.grid(alpha=0.3)
    if groups:
        ax1.legend(fontsize=8)
    for base, rs in pairs:
        xs, ys, es = [], [], []
        for r in results:
            (shift, _, _), (d, ds, _) = r.stat([reference], "router_shift"), delta(r, base, rs)
            if shift is not None and d is not None:
                xs.append(shift)
                ys.append(d)
                es.append(ds or 0.0)
        if xs:
            ax2.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, label=f"{rs} − {base}")
    ax2.axhline(0.0, color="gray", lw=0.8)
    ax2.set_xscale("log")
    ax2.set_xlabel("router shift")
    ax2.set_ylabel("final held-out accuracy difference")
    ax2.set_title("does the RS weight change the outcome? (paired by seed)", fontsize=10)
    ax2.grid(alpha=0.3)
    if pairs:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return bool(groups)


def write_doc(path: str, *, command: str, settings: list[str], machine: str, timing: list[str],
              shift: list[str], outcome: list[str], plot: str | None, problems: list[str], reference: str) -> None:
    doc_dir = os.path.dirname(os.path.abspath(path))
    script = os.path.relpath(os.path.join(REPO, "benchmarks", "router_shift_sweep.py"), doc_dir)
    lines = [
        "# Where router shift matters: a sweep on Countdown", "",
        f"Generated by [`{os.path.basename(script)}`]({script}) from the runs' tensorboard logs. To regenerate "
        "(complete runs are reused):", "", "```bash", command, "```", "",
        "## Settings", "", *[f"- {s}" for s in settings], "",
        "## Machine and time", "", f"- {machine}", *[f"- {t}" for t in timing], "",
        "## How far the router moves", "", *shift, "",
        f"Router shift, expert-set change, IS-ratio std and clip fraction: per-run means over iterations in the "
        f"`{reference}` runs, then mean ± std over seeds. Router shift = `router/shift_mean` (mean over MoE layers "
        "and valid tokens of |log r_θ(e) − log r_old(e)| averaged over the rollout's top-K experts e); "
        "expert-set change = `router/expert_set_change_rate` (fraction of the rollout's top-K expert slots not in "
        "the current top-K); γ columns from the runs of the first router-shift configuration (`router/gamma_mean`, "
        "`router/gamma_p05`, `router/gamma_floor_frac`).", "",
        "## Outcome", "", *outcome, "",
        "Held-out accuracy (greedy, `eval/accuracy`) at iteration 0 (SFT) and at the last iteration; Δ = mean over "
        "seeds of the per-seed difference (same seed = same data order and sampling seed).", "",
    ]
    if plot:
        lines += ["![sweep](" + os.path.relpath(os.path.abspath(plot), doc_dir) + ")", ""]
    lines += ["## Failed, timed-out or missing runs", "", *([f"- {p}" for p in problems] or ["None."])]
    write_markdown(path, lines)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("sweep")
    g.add_argument("--model", type=parse_model, action="append", required=True, metavar="NAME=CHECKPOINT",
                   help="an SFT checkpoint to start from (repeat for several)")
    g.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4])
    g.add_argument("--reuse", type=parse_reuse, nargs="+", default=[(2, 8)], metavar="EPOCHSxMINIBATCHES")
    g.add_argument("--cell", action="append", default=[], metavar="MODEL:LR:EPOCHSxMINIBATCHES",
                   help="an extra cell outside the product grid (repeatable)")
    g.add_argument("--data-dir", default="data/countdown", help="train.jsonl, test.jsonl, tokenizer.model")
    g.add_argument("--out-dir", default="runs/router_shift_sweep")
    g.add_argument("--configs", nargs="+", default=["gmpo", "rspo"], metavar="NAME")
    g.add_argument("--reference", default=None,
                   help="configuration whose runs measure the router movement (default: the first without RS)")
    g.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    g.add_argument("--doc", default="docs/router_shift_sweep.md")
    g.add_argument("--plot", default=None, help="default: <doc without .md>/sweep.png")
    add_execution_args(p)
    add_trainer_args(p)
    add_collapse_args(p)
    p.set_defaults(train_iters=60, eval_interval=20)
    return p


def main(argv: list[str] | None = None) -> list[CellResult]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    configs = select_configs(args.configs)
    names = [c.name for c in configs]
    rs_configs = [c.name for c in configs if "--router-shift" in c.flags or c.name.startswith("rspo")][:1]
    reference = args.reference or next((n for n in names if n not in rs_configs), names[0])
    if reference not in names:
        raise SystemExit(f"--reference {reference!r} is not among --configs {names}")
    cells = build_cells(args.model, args.lrs, args.reuse, args.cell)
    crit = CollapseCriterion(args.collapse_window, args.collapse_drop, args.collapse_min_peak)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(args.jobs, 1))
    by_cell = {c: cell_runs(c, configs, args.seeds, args) for c in cells}
    runs = [r for rs in by_cell.values() for r in rs]
    reader = load_plot_metrics().read_scalars
    t_start = time.time()
    counts = run_pending(runs, args, reader, threads, "sweep",
                         f"{len(cells)} cells x {len(configs)} configs x {len(args.seeds)} seeds = {len(runs)} runs")
    if counts is None:
        return []
    executed, reused = counts
    wall = time.time() - t_start

    results, problems, walls = [], [], []
    for cell, cruns in by_cell.items():
        summaries = []
        for r in cruns:
            scalars, man, problem = load_run(r, reader)
            if problem:
                problems.append(problem)
            s = summarize_run(r.config.name, r.seed, scalars, man, crit)
            summaries.append(s)
            if s.wall_s is not None:
                walls.append(s.wall_s)
            if s.status in ("failed", "timeout", "missing"):
                problems.append(f"{r.key}: {s.status} after iteration {s.last_iter} `{log_tail(r.dir)[-200:]}`")
        results.append(CellResult(cell, summaries))

    plot = args.plot or os.path.join(os.path.splitext(args.doc)[0], "sweep.png")
    plot = plot if plot_sweep(results, reference, configs, plot) else None
    shift = shift_table(results, reference, rs_configs)
    outcome = outcome_table(results, configs, len(dict.fromkeys(args.seeds)))
    models = "; ".join(f"`{m}` = `{p}` ({model_description(p)})" for m, p in dict(args.model).items())
    settings = [
        f"models: {models}; data `{args.data_dir}`",
        f"{args.train_iters} RL iterations per run; each: {args.rollout_batch_size} prompts x "
        f"{args.num_generations} samples (<= {args.max_new_tokens} new tokens), lr ({args.lr_decay_style}) and "
        f"reuse (epochs x mini-batches = optimizer steps per rollout) per cell; clip-grad {args.clip_grad:g}; "
        f"held-out eval every {args.eval_interval} iterations on {args.eval_samples} test prompts",
        "configurations: " + "; ".join(f"{c.label} = `{' '.join(c.flags)}`" for c in configs)
        + f"; seeds {' '.join(map(str, dict.fromkeys(args.seeds)))}",
        "one run = `python -m megatron_rspo.rl.trainer " + shlex.join(cell_runs(cells[0], configs[:1], [0], args)[0]
                                                                      .cmd[3:-4]) + " --seed <seed> ...` "
        "(init, lr and reuse vary by cell)" if cells else "no cells",
    ]
    timing = [f"this invocation: {wall:.0f} s wall ({executed} run(s) executed, "
              f"{reused} reused), finished {time.strftime('%Y-%m-%d %H:%M')}",
              f"per-run wall time: mean {sum(walls) / len(walls):.0f} s over {len(walls)} run(s)"
              if walls else "per-run wall time: none recorded"]
    command = "python benchmarks/router_shift_sweep.py " + shlex.join(argv)
    write_doc(args.doc, command=command, settings=settings, machine=machine_description(args.jobs, threads),
              timing=timing, shift=shift, outcome=outcome, plot=plot, problems=problems, reference=reference)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "sweep_summary.json"), "w") as fh:
        json.dump([{"cell": r.cell.name, "runs": [dataclasses.asdict(s) for s in r.summaries]} for r in results],
                  fh, indent=1)
    print("\n".join(shift + [""] + outcome))
    print(f"[sweep] wrote {args.doc}" + (f", {plot}" if plot else ""))
    return results


if __name__ == "__main__":
    main()
