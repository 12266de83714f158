"""Pure-tensor diagnostic statistics (DESIGN §4) and a collapse detector. No logging backends here.

All values are detached 0-d tensors (floats for the detector) keyed by their tensorboard names.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from megatron_rspo.rl.losses import masked_mean


def masked_quantile(x: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """q-quantile of the valid entries, linear interpolation (numpy's default); 0 when none are valid.
    Sort-based (torch.quantile refuses inputs above 2^24 elements) and sync-free: invalid entries sort
    last as +inf, and the interpolation indices are computed on the device from the valid count."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    m = mask.bool().flatten()
    vals = torch.where(m, x.detach().float().flatten(), torch.full_like(m, torch.inf, dtype=torch.float32))
    vals = vals.sort().values
    n = m.sum()
    pos = (n - 1).clamp_min(0).float() * q
    lo, hi = pos.floor().long(), pos.ceil().long()
    v_lo, v_hi = vals.gather(0, lo.reshape(1))[0], vals.gather(0, hi.reshape(1))[0]
    out = v_lo + (v_hi - v_lo) * (pos - lo.float())
    return torch.where(n > 0, out, torch.zeros_like(out))


@torch.no_grad()
def gamma_stats(gamma: torch.Tensor, mask: torch.Tensor, floor: float) -> dict[str, torch.Tensor]:
    """γ mean/min/p05 over valid tokens, and the fraction of valid tokens held at the floor."""
    m = mask.bool()
    g = gamma.detach().float()
    gmin = torch.where(m, g, torch.full_like(g, torch.inf)).min()
    gmin = torch.where(m.any(), gmin, torch.ones_like(gmin))
    # γ = max(exp(-d), floor) equals the floor exactly when clamped; the tolerance covers dtype round trips.
    at_floor = (g <= floor * (1 + 1e-6)) if floor > 0 else torch.zeros_like(m)
    return {
        "gamma_mean": masked_mean(g, m),
        "gamma_min": gmin,
        "gamma_p05": masked_quantile(g, m, 0.05),
        "gamma_floor_frac": masked_mean(at_floor.float(), m),
    }


@torch.no_grad()
def router_shift_stats(
    per_layer_d: torch.Tensor,
    mask: torch.Tensor,
    layer_ids: Sequence[int] | None = None,
    layer_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Mean router-shift distance per MoE layer over valid tokens: ``router_shift/layer_{l}`` (l = position
    in the L axis unless ``layer_ids`` names them), plus ``router_shift/mean`` (mean over layers)."""
    if per_layer_d.dim() != 3 or per_layer_d.shape[:2] != mask.shape:
        raise ValueError(f"per_layer_d must be [N, T, L] matching mask [N, T]; got {tuple(per_layer_d.shape)} "
                         f"and {tuple(mask.shape)}")
    num_layers = per_layer_d.shape[-1]
    ids = list(range(num_layers)) if layer_ids is None else list(layer_ids)
    if len(ids) != num_layers:
        raise ValueError(f"layer_ids has {len(ids)} entries for {num_layers} layers")
    w = mask.bool()[..., None].expand_as(per_layer_d)
    if layer_mask is not None:
        w = w & layer_mask.bool().expand_as(per_layer_d)
    per = masked_mean(per_layer_d.detach().float(), w, dim=(0, 1))  # [L]
    out = {f"router_shift/layer_{lid}": per[i] for i, lid in enumerate(ids)}
    out["router_shift/mean"] = per.mean() if num_layers else per.new_zeros(())
    return out


@torch.no_grad()
def expert_load_stats(
    tokens_per_expert: torch.Tensor, layer_ids: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Load imbalance max/mean of tokens per expert: per layer (``expert_load/layer_{l}_max_over_mean``),
    averaged over layers (``expert_load/max_over_mean``) and the worst layer (``expert_load/max_over_mean_max``).
    1.0 = perfectly balanced; a layer that routed no tokens reports 1.0."""
    if tokens_per_expert.dim() != 2:
        raise ValueError(f"tokens_per_expert must be [L, E], got {tuple(tokens_per_expert.shape)}")
    c = tokens_per_expert.detach().float()
    mean = c.mean(-1)
    ratio = torch.where(mean > 0, c.max(-1).values / mean.clamp_min(1e-12), torch.ones_like(mean))
    ids = list(range(c.shape[0])) if layer_ids is None else list(layer_ids)
    out = {f"expert_load/layer_{lid}_max_over_mean": ratio[i] for i, lid in enumerate(ids)}
    out["expert_load/max_over_mean"] = ratio.mean()
    out["expert_load/max_over_mean_max"] = ratio.max()
    return out


class CollapseDetector:
    """Warns when a scalar (clip fraction, IS-ratio std, ...) bursts above its rolling baseline.

    ``update(name, value)`` returns True when, with at least ``min_history`` (default min(5, window))
    earlier values of ``name``, value > mean + k·std of the last ``window`` earlier values AND
    value − mean > ``min_margin`` (so a flat baseline with ~0 std does not fire on noise). Every value
    joins the history afterwards, so a lasting level shift is absorbed after about ``window`` steps.
    A non-finite value always fires (and is not recorded). State is a plain dict (checkpointable).
    """

    def __init__(
        self, window: int = 20, k: float = 4.0, min_margin: float = 0.05, min_history: int | None = None
    ) -> None:
        min_history = min(5, window) if min_history is None else min_history
        if window < 2 or min_history < 2 or min_history > window:
            raise ValueError(f"need 2 <= min_history <= window, got window={window}, min_history={min_history}")
        self.window, self.k, self.min_margin, self.min_history = window, float(k), float(min_margin), min_history
        self._history: dict[str, deque[float]] = {}
        self.last_message: str = ""

    def update(self, name: str, value: float | torch.Tensor, min_margin: float | None = None) -> bool:
        v = float(value)
        hist = self._history.setdefault(name, deque(maxlen=self.window))
        fired = False
        if math.isfinite(v) and len(hist) >= self.min_history:
            mean = sum(hist) / len(hist)
            std = math.sqrt(sum((h - mean) ** 2 for h in hist) / len(hist))
            margin = self.min_margin if min_margin is None else min_margin
            fired = v > mean + self.k * std and v - mean > margin
            if fired:
                self.last_message = (f"collapse warning: {name}={v:.4g} above rolling baseline "
                                     f"{mean:.4g} ± {std:.3g} (k={self.k:g}, last {len(hist)} steps)")
        elif not math.isfinite(v):
            fired = True
            self.last_message = f"collapse warning: {name} is {v}"
        if math.isfinite(v):
            hist.append(v)
        return fired

    def state_dict(self) -> dict[str, Any]:
        """Only the histories: thresholds come from the constructor, so a resumed run may retune them."""
        return {"history": {name: list(h) for name, h in self._history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._history = {name: deque(map(float, h), maxlen=self.window) for name, h in state["history"].items()}


def reduction_of(name: str) -> str:
    """How a scalar combines over micro-batches and ranks, read off its name: extremes stay extremes
    (``*_max`` -> max, ``*_min`` -> min), counts add up (``*_sum``, ``*_count``), the rest is a mean."""
    for suffix, op in (("_max", "max"), ("_min", "min"), ("_sum", "sum"), ("_count", "sum")):
        if name.endswith(suffix):
            return op
    return "mean"


class MetricAccumulator:
    """Per-micro-batch scalar stats (0-d tensors on the model's device) combined without host syncs:
    ``add`` keeps them; ``result`` reduces each name by ``reduction_of`` (a mean is over the micro-batches
    that reported the name) and returns 0-d tensors, ready for one cross-rank reduction."""

    def __init__(self) -> None:
        self._values: dict[str, list[torch.Tensor]] = {}

    def add(self, stats: dict[str, torch.Tensor | float]) -> None:
        for k, v in stats.items():
            self._values.setdefault(k, []).append(torch.as_tensor(v).detach().float().reshape(()))

    def result(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, vs in self._values.items():
            t = torch.stack([v.to(vs[0].device) for v in vs])
            op = reduction_of(k)
            out[k] = {"max": t.max, "min": t.min, "sum": t.sum}.get(op, t.mean)()
        return out


def pooled_mean_std(total: torch.Tensor | float, total_sq: torch.Tensor | float,
                    count: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std of values pooled from per-rank sums (Σx, Σx², n): the std of the whole
    batch, not a mean of per-rank stds."""
    total, total_sq, count = (torch.as_tensor(v, dtype=torch.float64) for v in (total, total_sq, count))
    mean = total / count.clamp_min(1)
    var = (total_sq - count * mean**2).clamp_min(0) / (count - 1).clamp_min(1)
    return mean, var.sqrt()


def router_stat_names(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Loss/step stats come back as ``policy/<name>``; router diagnostics live under ``router/``."""
    out = {}
    for k, v in stats.items():
        name = k.split("/", 1)[1] if k.startswith("policy/") else k
        if name.startswith("gamma_") or name == "expert_set_change_rate":
            out[f"router/{name}"] = v
        elif k.startswith("router_shift/"):
            out[f"router/shift_{k.split('/', 1)[1]}"] = v
        else:
            out[k] = v
    return out
