"""Smoke tests of the command-line tools and benchmarks (tiny settings, real code paths)."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import load_script


def test_plot_metrics_writes_pngs(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for run, offset in (("rspo", 0.0), ("grpo", 0.1)):
        w = SummaryWriter(str(tmp_path / run))
        for step in range(1, 6):
            w.add_scalar("reward/mean", offset + 0.1 * step, step)
            w.add_scalar("router/gamma_mean", 1.0 - 0.01 * step, step)
            w.add_scalar("router/shift_layer_0", 0.01 * step, step)
            w.add_scalar("router/shift_layer_1", 0.02 * step, step)
        w.close()
    plot_metrics = load_script("tools/plot_metrics.py")
    assert plot_metrics.read_scalars(str(tmp_path / "rspo"))["reward/mean"][0] == [1, 2, 3, 4, 5]
    written = plot_metrics.main([str(tmp_path / "rspo"), f"GRPO={tmp_path / 'grpo'}", "--out", str(tmp_path / "png")])
    assert [Path(p).name for p in written] == ["curves.png", "router_shift_per_layer.png"]
    for p in written:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(p).stat().st_size > 10_000


def test_plot_metrics_says_one_line_for_a_folder_without_logs(tmp_path):
    import pytest

    from megatron_rspo.config import ConfigError

    plot_metrics = load_script("tools/plot_metrics.py")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as err:
        plot_metrics.main([str(tmp_path / "empty"), "--out", str(tmp_path / "png")])
    assert "no tensorboard scalars" in str(err.value) and not list((tmp_path / "png").glob("*.png"))


def test_overhead_benchmark_runs(tmp_path):
    overhead = load_script("benchmarks/overhead.py")
    results = overhead.main(["--shapes", "small E=8", "--rows", "4", "--seq", "16", "--repeats", "1",
                             "--out", str(tmp_path / "o.md")])
    assert results[0]["rspo_ms"] > 0 and results[0]["ratio"] > 0
    assert results[0]["record_bytes_per_token"] == 2 * 2 * (1 + 4)  # L=2, K=2: uint8 ids + fp32 scores
    assert "RSPO/GMPO" in (tmp_path / "o.md").read_text()


def test_gpu_step_benchmark_smoke(monkeypatch, capsys):
    """benchmarks/gpu_step.py (run by tools/gpu_check.sh) on toy sizes: the same code path on the CPU."""
    gpu_step = load_script("benchmarks/gpu_step.py")
    monkeypatch.setattr(sys, "argv", ["gpu_step.py", "--smoke"])
    gpu_step.main()
    out = capsys.readouterr().out
    assert "| standard |" in out and "| fused |" in out
