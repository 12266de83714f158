"""benchmarks/stability_countdown.py and its benchmarks/studylib, without training: config expansion,
resume planning, collapse detection, tables, the summary sentence, plots and the doc from synthetic series,
and the subprocess executor on stub commands."""

from __future__ import annotations

import json
import math
import os
import sys
import types

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def sc():
    mod = load_script("benchmarks/stability_countdown.py")  # puts benchmarks/ on sys.path: studylib importable
    from studylib import analysis, plots, runs

    # one namespace over the script and the library it is built from
    return types.SimpleNamespace(**{k: v for m in (runs, analysis, plots, mod) for k, v in vars(m).items()})


def series(values, start=1):
    return list(range(start, start + len(values))), list(values)


def args_for(sc, *extra):
    return sc.build_parser().parse_args(["--init-from", "ck", "--data-dir", "d", "--out-dir", "out", *extra])


# ------------------------------------------------------------------ configuration expansion
def test_all_configs_and_flags(sc):
    names = [c.name for c in sc.select_configs(None)]
    assert names == ["grpo", "gspo", "gmpo", "rspo", "grpo_rs", "gspo_rs", "gmpo_replay", "gmpo_frozen"]
    flags = {c.name: c.flags for c in sc.CONFIGS}
    assert flags["rspo"] == ("--rl-algorithm", "rspo")
    assert flags["grpo_rs"] == ("--rl-algorithm", "grpo", "--router-shift")
    assert flags["gspo_rs"] == ("--rl-algorithm", "gspo", "--router-shift")
    assert flags["gmpo_replay"] == ("--rl-algorithm", "gmpo", "--routing-replay")
    assert flags["gmpo_frozen"] == ("--rl-algorithm", "gmpo", "--freeze-router")
    assert [c.name for c in sc.select_configs(["rspo", "grpo", "rspo"])] == ["rspo", "grpo"]
    with pytest.raises(SystemExit, match="unknown"):
        sc.select_configs(["ppo"])


def test_expand_runs(sc):
    args = args_for(sc, "--seeds", "1", "2", "3", "2", "--extra=--clip-eps-high 0.28")
    common = sc.common_trainer_flags(args)
    assert common[common.index("--ppo-epochs") + 1] == "2"  # heavy reuse by default
    assert common[common.index("--num-minibatches") + 1] == "8"
    assert common[-2:] == ["--clip-eps-high", "0.28"]
    assert common[common.index("--tokenizer-model") + 1] == os.path.join("d", "tokenizer.model")
    runs = sc.expand_runs(sc.select_configs(None), args.seeds, args.out_dir, common, python="py")
    assert len(runs) == 8 * 3  # duplicate seeds dropped
    r = next(r for r in runs if r.key == "gmpo_replay/seed3")
    assert r.dir == os.path.join("out", "gmpo_replay", "seed3")
    assert r.cmd[:3] == ["py", "-m", "megatron_rspo.rl.trainer"]
    assert r.cmd[-5:] == ["--routing-replay", "--seed", "3", "--tensorboard-dir", r.dir]
    assert r.cmd[r.cmd.index("--seed") + 1] == "3" and r.cmd[r.cmd.index("--tensorboard-dir") + 1] == r.dir
    assert "--routing-replay" in r.cmd and r.cmd[r.cmd.index("--rl-algorithm") + 1] == "gmpo"


def test_commands_parse_with_the_trainer(sc):
    from megatron_rspo.rl.trainer import build_parser

    args = args_for(sc, "--seeds", "7")
    for run in sc.expand_runs(sc.select_configs(None), [7], "out", sc.common_trainer_flags(args)):
        ns = build_parser().parse_args(run.cmd[3:])
        assert ns.ppo_epochs == 2 and ns.num_minibatches == 8 and ns.seed == 7 and not ns.progress
        assert ns.tensorboard_dir == run.dir and ns.eval_interval >= 1
        assert ns.router_shift == (run.config.name.endswith("_rs"))
        assert ns.routing_replay == (run.config.name == "gmpo_replay")
        assert ns.freeze_router == (run.config.name == "gmpo_frozen")


# ------------------------------------------------------------------ resume planning
def test_plan_skips_complete_runs_of_the_same_command(sc, tmp_path):
    common = sc.common_trainer_flags(args_for(sc))
    runs = sc.expand_runs(sc.select_configs(["grpo", "rspo", "gspo"]), [1], str(tmp_path), common, python="py")
    fake = {}

    def reader(d):
        return fake[d]

    def record(run, status, last, cmd=None):
        os.makedirs(run.dir, exist_ok=True)
        open(os.path.join(run.dir, "events.out.tfevents.1"), "w").close()
        with open(os.path.join(run.dir, "run.json"), "w") as fh:
            json.dump({"cmd": cmd or ["other-python", *run.cmd[1:]], "status": status}, fh)
        fake[run.dir] = {"reward/mean": series([0.1] * last)}

    grpo, rspo, gspo = runs
    record(grpo, "ok", 100)  # complete; a different python executable does not matter
    record(rspo, "failed", 40)
    record(gspo, "ok", 100, cmd=["py", "changed"])  # older settings
    todo, skipped = sc.plan(runs, 100, reader)
    assert [r.key for r in todo] == ["rspo/seed1", "gspo/seed1"] and skipped == {"grpo/seed1": "complete"}
    todo, skipped = sc.plan(runs, 100, reader, skip_failed=True)
    assert [r.key for r in todo] == ["gspo/seed1"] and skipped["rspo/seed1"] == "recorded failed"
    todo, _ = sc.plan(runs, 100, reader, force=True)
    assert len(todo) == 3
    assert not sc.is_complete({}, 1) and sc.is_complete({"reward/mean": series([1.0] * 3)}, 3)


# ------------------------------------------------------------------ collapse detection
def test_reward_collapse_step(sc):
    crit = sc.CollapseCriterion(window=3, drop=0.5, min_peak=0.05)
    # MA: t3 .4, t4 .533, t5 .6 (peak), t6 .433, t7 .267 < .3 -> collapse at 7
    rew = series([0.2, 0.4, 0.6, 0.6, 0.6, 0.1, 0.1, 0.1])
    assert sc.reward_collapse_step(rew, crit) == 7
    assert sc.reward_collapse_step(series([0.5, 0.55, 0.45, 0.6, 0.4, 0.5, 0.52] * 5), crit) is None
    # never above min_peak: a drop from noise near zero is not a collapse
    assert sc.reward_collapse_step(series([0.04, 0.04, 0.04, 0.0, 0.0, 0.0]), crit) is None
    # the iteration-0 point (if any) is ignored; NaNs are skipped (they are rule b)
    # MA over the finite values: t5 (.2+.2+.02)/3 = .14, t6 (.2+.02+.02)/3 = .08 < .1
    steps, vals = series([9.0, 0.2, 0.2, 0.2, float("nan"), 0.02, 0.02, 0.02], start=0)
    assert sc.reward_collapse_step((steps, vals), crit) == 6
    # an unsorted series is sorted by step first
    assert sc.reward_collapse_step(([8, 7, 6, 5, 4, 3, 2, 1], rew[1][::-1]), crit) == 7


def test_summarize_run_causes(sc):
    crit = sc.CollapseCriterion(window=3, drop=0.5, min_peak=0.05)
    ok = {"cmd": [], "status": "ok", "rc": 0, "wall_s": 10.0}
    scalars = {
        "reward/mean": series([0.5] * 10),
        "eval/accuracy": ([0, 5, 10], [0.1, 0.3, 0.2]),
        "policy/clip_frac_low": series([0.01] * 10), "policy/clip_frac_high": series([0.03] * 10),
        "policy/is_ratio_std": series([0.2] * 10), "router/shift_mean": series([0.05] * 10),
        "collapse/warning": series([0, 1, 0, 0, 1, 0, 0, 0, 0, 0]), "time/iteration_s": series([2.0] * 10),
    }
    s = sc.summarize_run("gmpo", 1, scalars, ok, crit)
    assert (s.status, s.last_iter, s.collapse_iter) == ("ok", 10, None)
    assert (s.init_acc, s.best_acc, s.final_acc) == (0.1, 0.3, 0.2)
    assert s.clip_frac == pytest.approx(0.04) and s.is_ratio_std == pytest.approx(0.2)
    assert s.router_shift == pytest.approx(0.05) and s.gamma is None and s.burst_warnings == 2

    nan = dict(scalars, **{"policy/is_ratio_std": series([0.2] * 6 + [math.nan] * 4),
                           "time/iteration_s": series([math.inf] * 10)})  # time/* is ignored
    s = sc.summarize_run("gmpo", 1, nan, ok, crit)
    assert (s.collapse_iter, s.collapse_cause) == (7, "non-finite policy/is_ratio_std")

    failed = {"status": "failed", "rc": 1}
    part = {k: (v[0][:5], v[1][:5]) for k, v in scalars.items()}
    s = sc.summarize_run("gmpo", 1, part, failed, crit)
    assert (s.collapse_iter, s.collapse_cause, s.final_acc, s.best_acc) == (6, "failed (rc=1)", None, 0.3)
    s = sc.summarize_run("gmpo", 1, {}, {"status": "failed", "rc": 2}, crit)  # set-up error: no collapse
    assert s.collapse_iter is None and s.status == "failed"
    assert sc.summarize_run("gmpo", 1, {}, None, crit).status == "missing"


# ------------------------------------------------------------------ table and summary
def make_summary(sc, config, seed, final, collapse=None, status="ok", gamma=None):
    return sc.RunSummary(config=config, seed=seed, status=status, last_iter=10, final_acc=final,
                         best_acc=None if final is None else final + 0.1, collapse_iter=collapse, clip_frac=0.01,
                         is_ratio_std=0.2, router_shift=0.05, gamma=gamma, iter_time_s=2.0, burst_warnings=1)


def test_aggregate_and_table(sc):
    summaries = [
        make_summary(sc, "rspo", 1, 0.30, gamma=0.95), make_summary(sc, "rspo", 2, 0.40, gamma=0.97),
        make_summary(sc, "rspo", 3, 0.50, gamma=0.96),
        make_summary(sc, "grpo", 1, 0.10, collapse=40), make_summary(sc, "grpo", 2, None, 12, status="failed"),
        make_summary(sc, "grpo", 3, 0.30),
        sc.RunSummary(config="gmpo", seed=1, status="missing"),
    ]
    rows = sc.aggregate(summaries, sc.select_configs(["rspo", "grpo", "gmpo"]), 3)
    rspo, grpo, gmpo = rows
    assert rspo.final_acc[0] == pytest.approx(0.4) and rspo.final_acc[1] == pytest.approx(0.1)
    assert rspo.gamma[0] == pytest.approx(0.96) and grpo.gamma == (None, None, 0)
    assert (grpo.n_ok, grpo.collapsed, grpo.collapse_iters, grpo.final_acc[2]) == (2, 2, [12, 40], 2)
    assert (gmpo.n_ok, gmpo.collapsed, gmpo.final_acc) == (0, 0, (None, None, 0))
    lines = sc.format_table(rows)
    assert lines[:2] == list(sc.TABLE_HEADER)
    assert lines[2].startswith("| RSPO | 3/3 | 0.400 ± 0.100 | 0.500 ± 0.100 | 0/3 | – |")
    assert "| 0.9600 ± 0.0100 |" in lines[2]
    assert lines[3].startswith("| GRPO | 2/3 | 0.200 ± 0.141 (n=2) |") and "| 2/3 | 12, 40 |" in lines[3]
    assert lines[4].startswith("| GMPO | 0/3 | – | – | 0/3 | – |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)

    text = sc.summary_sentence(rows)
    assert "RSPO: final held-out accuracy 0.400 ± 0.100 over 3 completed run(s), 0/3 run(s) collapsed" in text
    assert "GRPO: final held-out accuracy 0.200 ± 0.141 over 2 completed run(s), 2/3 run(s) collapsed" in text
    assert "(RSPO − GRPO): +0.200, larger than the larger seed std of the two (0.141)" in text
    assert "not include both" in sc.summary_sentence([rspo])
    assert "no completed run" in sc.summary_sentence([rspo, gmpo], "rspo", "gmpo")
    assert sc.fmt((0.5, None, 1), ".2f", 3) == "0.50 (n=1)" and sc.fmt((None, None, 0)) == "–"


# ------------------------------------------------------------------ curves and the doc
def test_band_and_smooth(sc):
    xs, mean, lo, hi = sc.band([([1, 2, 3], [1.0, 2.0, math.nan]), ([1, 2], [3.0, 4.0]), ([3], [5.0])])
    assert xs == [1, 2, 3] and mean == [2.0, 3.0, 5.0] and lo == [1.0, 2.0, 5.0] and hi == [3.0, 4.0, 5.0]
    assert sc.smooth(([1, 2, 3], [1.0, 3.0, 5.0]), 2) == ([1, 2, 3], [1.0, 2.0, 4.0])
    assert sc.smooth(([1, 2], [1.0, 2.0]), 1) == ([1, 2], [1.0, 2.0])
    both = {"policy/clip_frac_low": ([1, 2], [0.1, 0.2]), "policy/clip_frac_high": ([2, 1], [0.5, 0.3])}
    assert sc.derived_series(both, "clip_frac") == ([1, 2], [pytest.approx(0.4), pytest.approx(0.7)])
    assert sc.derived_series({"policy/clip_frac": ([1], [0.2])}, "clip_frac") == ([1], [0.2])


def test_plots_and_doc(sc, tmp_path):
    def run(scale):
        return {"reward/mean": series([0.2 * scale, 0.3, 0.4]), "eval/accuracy": ([0, 3], [0.1, 0.2 * scale]),
                "policy/clip_frac_low": series([0.01] * 3), "policy/clip_frac_high": series([0.02] * 3),
                "router/shift_layer_0": series([0.1] * 3), "router/shift_layer_1": series([0.2, 0.1, math.nan]),
                "router/shift_mean": series([0.15] * 3), "router/gamma_mean": series([0.9] * 3)}

    plots = sc.make_plots({"RSPO": [run(1), run(2)], "GRPO": [run(1)]}, str(tmp_path / "doc" / "stability"),
                          "t", smooth_window=2)
    assert [os.path.basename(p) for p in plots] == ["curves.png", "router_shift_per_layer.png"]
    assert all(os.path.getsize(p) > 1000 for p in plots)

    rows = sc.aggregate([make_summary(sc, "rspo", 1, 0.3), make_summary(sc, "grpo", 1, 0.2)],
                        sc.select_configs(["rspo", "grpo"]), 1)
    doc = tmp_path / "doc" / "stability.md"
    sc.write_doc(str(doc), command="python benchmarks/stability_countdown.py --seeds 1", settings=["s1"],
                 machine="m", timing=["t1"], crit=sc.CollapseCriterion(), rows=rows, init_acc=(0.1, None, 2),
                 plots=plots, problems=["grpo/seed2: failed"])
    text = doc.read_text()
    assert "python benchmarks/stability_countdown.py --seeds 1" in text
    assert "![curves](stability/curves.png)" in text and "(stability/router_shift_per_layer.png)" in text
    assert sc.format_table(rows)[2] in text and sc.summary_sentence(rows) in text
    assert "t-4..t" in text and "MA(t) < 0.5 x peak(t)" in text and "- grpo/seed2: failed" in text


# ------------------------------------------------------------------ execution (stub commands, no training)
def test_executor_records_status(sc, tmp_path):
    cfg = sc.CONFIGS[0]
    runs = [sc.Run(cfg, 1, str(tmp_path / "a"), [sys.executable, "-c", "print('hi')"]),
            sc.Run(cfg, 2, str(tmp_path / "b"), [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]),
            sc.Run(cfg, 3, str(tmp_path / "c"), [sys.executable, "-c", "import time; time.sleep(30)"])]
    os.makedirs(runs[0].dir)
    open(os.path.join(runs[0].dir, "events.out.tfevents.old"), "w").close()  # stale events are removed
    done = {}
    sc.Executor(jobs=2, threads=1, timeout=3).execute(runs, lambda r, m: done.__setitem__(r.seed, m))
    assert {k: (m["status"], m["rc"]) for k, m in done.items()} == {1: ("ok", 0), 2: ("failed", 3),
                                                                      3: ("timeout", -9)}
    assert sc.read_manifest(runs[1].dir)["cmd"] == runs[1].cmd
    assert sc.log_tail(runs[1].dir) == "boom" and not sc.has_events(runs[0].dir)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_concurrent_runs_get_disjoint_cores(sc, tmp_path):
    cfg = sc.CONFIGS[0]
    probe = ("import os, json, time; time.sleep(0.5); "
             "print(json.dumps([sorted(os.sched_getaffinity(0)), os.environ['VLLM_CPU_OMP_THREADS_BIND']]))")
    runs = [sc.Run(cfg, s, str(tmp_path / str(s)), [sys.executable, "-c", probe]) for s in (1, 2, 3)]
    sc.Executor(jobs=2, threads=1, timeout=30).execute(runs)
    seen = [json.loads(sc.log_tail(r.dir)) for r in runs]
    assert all(",".join(map(str, cores)) == bind for cores, bind in seen)
    slots = sc.core_slots(2)
    assert {tuple(c) for c, _ in seen} <= set(slots) and not set(slots[0]) & set(slots[1])
    assert sc.core_slots(1) == [()]  # one run at a time: not pinned


def test_dry_run_prints_commands(sc, tmp_path, capsys):
    out = tmp_path / "runs"
    assert sc.main(["--init-from", "ck", "--data-dir", "d", "--out-dir", str(out), "--configs", "grpo", "rspo",
                    "--seeds", "1", "2", "--dry-run", "--doc", str(tmp_path / "x.md")]) == []
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("# 4 to run, 0 skipped")
    assert "--rl-algorithm rspo --seed 2 --tensorboard-dir" in lines[3]
    assert not out.exists() and not (tmp_path / "x.md").exists()
