"""benchmarks/router_shift_sweep.py without training: the grid, per-cell trainer commands, seed-paired RS
differences, both tables, the plot and the doc from synthetic run summaries."""

from __future__ import annotations

import argparse
import os

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def sw():
    return load_script("benchmarks/router_shift_sweep.py")


def parse(sw, *extra):
    return sw.build_parser().parse_args(["--model", "e8=ck8", "--model", "e32=ck32", "--data-dir", "d",
                                         "--out-dir", "out", *extra])


def test_grid_and_extra_cells(sw):
    args = parse(sw, "--lrs", "3e-5", "1e-4", "--reuse", "2x8", "1x4", "--cell", "e32:3e-4:4x8",
                 "--cell", "e8:3e-5:2x8")  # the last one duplicates a grid cell
    cells = sw.build_cells(args.model, args.lrs, args.reuse, args.cell)
    assert len(cells) == 2 * 2 * 2 + 1
    assert cells[0].name == "e8/lr3e-05-2x8" and cells[0].init_from == "ck8" and cells[0].steps_per_rollout == 16
    assert cells[-1] == sw.Cell("e32", "ck32", 3e-4, 4, 8)
    with pytest.raises(SystemExit, match="MODEL:LR"):
        sw.build_cells(args.model, [1e-4], [(1, 1)], ["e64:1e-4:2x8"])
    for bad in ("2", "0x8", "ax2"):
        with pytest.raises(argparse.ArgumentTypeError):
            sw.parse_reuse(bad)
    for bad in ("ck", "=ck", "a/b=ck"):
        with pytest.raises(argparse.ArgumentTypeError):
            sw.parse_model(bad)


def test_cell_commands_parse_with_the_trainer(sw):
    from megatron_rspo.rl.trainer import build_parser

    args = parse(sw, "--seeds", "1", "2")
    cell = sw.Cell("e32", "ck32", 3e-4, 4, 8)
    runs = sw.cell_runs(cell, sw.select_configs(["gmpo", "rspo"]), args.seeds, args, python="py")
    assert [r.key for r in runs] == [f"e32/lr0.0003-4x8/{c}/seed{s}" for c in ("gmpo", "rspo") for s in (1, 2)]
    assert runs[3].dir == os.path.join("out", "e32", "lr0.0003-4x8", "rspo", "seed2")
    ns = build_parser().parse_args(runs[3].cmd[3:])
    assert (ns.init_from, ns.lr, ns.ppo_epochs, ns.num_minibatches, ns.seed) == ("ck32", 3e-4, 4, 8, 2)
    assert ns.rl_algorithm == "rspo" and ns.train_iters == 60 and ns.tensorboard_dir == runs[3].dir


def summary(sw, config, seed, final, shift=0.02, change=0.01, gamma=None, collapse=None):
    return sw.RunSummary(config=config, seed=seed, status="ok", last_iter=60, final_acc=final, init_acc=0.4,
                         router_shift=shift, expert_set_change=change, is_ratio_std=0.1, clip_frac=0.03,
                         gamma=gamma, gamma_p05=None if gamma is None else gamma - 0.05,
                         gamma_floor_frac=None if gamma is None else 0.0, collapse_iter=collapse)


def test_tables_pair_by_seed(sw, tmp_path):
    cells = [sw.Cell("e8", "ck8", 1e-4, 2, 8), sw.Cell("e8", "ck8", 3e-4, 2, 8)]
    low = sw.CellResult(cells[0], [summary(sw, "gmpo", 1, 0.40), summary(sw, "gmpo", 2, 0.30),
                                   summary(sw, "rspo", 1, 0.42, gamma=0.99), summary(sw, "rspo", 2, 0.36, gamma=0.97)])
    high = sw.CellResult(cells[1], [summary(sw, "gmpo", 1, 0.10, shift=0.2, collapse=30),
                                    summary(sw, "gmpo", 2, 0.20, shift=0.4),
                                    summary(sw, "rspo", 2, 0.30, gamma=0.8)])  # rspo seed 1 missing
    assert sw.delta(low, "gmpo", "rspo")[0] == pytest.approx(0.04)  # (0.02 + 0.06) / 2
    assert sw.delta(high, "gmpo", "rspo") == (pytest.approx(0.10), None, 1)  # seed 2 only
    configs = sw.select_configs(["gmpo", "rspo"])
    shift = sw.shift_table([low, high], "gmpo", ["rspo"])
    assert len(shift) == 4 and all(line.count("|") == shift[0].count("|") for line in shift)
    assert "| 0.3 ± 0.141 |" in shift[3] and "| 0.9800 ± 0.0141 |" in shift[2]
    outcome = sw.outcome_table([low, high], configs, n_seeds=2)
    assert outcome[0].startswith("| cell | SFT acc | GMPO final acc | RSPO final acc | Δ RSPO − GMPO |")
    assert "| +0.040 ± 0.028 |" in outcome[2] and outcome[2].endswith("| none |")
    assert "0.300 (n=1)" in outcome[3] and outcome[3].endswith("| GMPO 1/2 |")
    plot = str(tmp_path / "sweep" / "sweep.png")
    assert sw.plot_sweep([low, high], "gmpo", configs, plot) and os.path.getsize(plot) > 1000
    doc = tmp_path / "sweep.md"
    sw.write_doc(str(doc), command="python benchmarks/router_shift_sweep.py --x", settings=["s"], machine="m",
                 timing=["t"], shift=shift, outcome=outcome, plot=plot, problems=[], reference="gmpo")
    text = doc.read_text()
    assert "python benchmarks/router_shift_sweep.py --x" in text and "![sweep](sweep/sweep.png)" in text
    assert shift[2] in text and outcome[3] in text and "`gmpo` runs" in text


def test_dry_run(sw, tmp_path, capsys):
    out = tmp_path / "runs"
    assert sw.main(["--model", "e8=ck", "--data-dir", "d", "--out-dir", str(out), "--lrs", "1e-4",
                    "--reuse", "2x8", "4x8", "--seeds", "1", "--dry-run", "--doc", str(tmp_path / "x.md")]) == []
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * 2 + 1 and lines[-1].startswith("# 4 to run")
    assert "--ppo-epochs 4 --num-minibatches 8" in lines[3] and "--rl-algorithm rspo" in lines[3]
    assert not out.exists()
    with pytest.raises(SystemExit, match="reference"):
        sw.main(["--model", "e8=ck", "--reference", "grpo", "--dry-run"])
