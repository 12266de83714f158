"""Router-shift ratio γ (DESIGN §2): how far the router has moved since θ_old, measured at the experts
the OLD policy actually used for each token. Pure tensor functions, no Megatron.

Shapes: ``current_log_scores`` / ``old_log_scores`` [N, T, L, K] are the router log-scores (log of the
score over ALL experts, not the top-k-renormalised weights) at the old top-K expert ids of L MoE layers.
Optional ``layer_mask`` [L] or [N, T, L] marks which layers exist for a token (1 = present).

    d_{i,t} = (1/L) Σ_l (1/K) Σ_k |log r_θ − log r_old|     (aggregation="mean": geometric mean of
                                                              per-layer ratios exp(−d_l), the published form)
    d_{i,t} =       Σ_l (1/K) Σ_k |log r_θ − log r_old|     (aggregation="sum": product over layers,
                                                              the earlier form)
    γ_{i,t} = sg[ max(exp(−d_{i,t}), floor) ]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["mean", "sum"]
Placement = Literal["pre_clip", "post_clip", "token_gm"]
AGGREGATIONS: tuple[str, ...] = ("mean", "sum")
# token_gm is OUR extension (gmpo/rspo only): γ weights each token inside GMPO's mean (rl/losses_ext.py).
PLACEMENTS: tuple[str, ...] = ("pre_clip", "post_clip", "token_gm")


def _check_floor(floor: float) -> None:
    if not isinstance(floor, int | float) or isinstance(floor, bool) or not 0.0 <= float(floor) <= 1.0:
        raise ValueError(f"router-shift floor (γ_min) must be a number in [0, 1] (0 = no floor), got {floor!r}")


@dataclass
class RouterShiftConfig:
    """Router-shift (RS) settings.

    floor: γ_min. The paper's value is not public; 0.8 is what a public re-implementation uses
    (ablate 0.5–0.9). 0 disables the floor, 1 makes γ ≡ 1 (RS is then a no-op).
    """

    enabled: bool = False
    floor: float = 0.8
    aggregation: Aggregation = "mean"
    placement: Placement = "pre_clip"

    def __post_init__(self) -> None:
        _check_floor(self.floor)
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"router-shift aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"router-shift placement must be one of {PLACEMENTS}, got {self.placement!r}")


def _check_scores(current: torch.Tensor, old: torch.Tensor) -> None:
    if current.dim() != 4 or current.shape != old.shape:
        raise ValueError(
            "router log-scores must both be [N, T, L, K] with the same shape; got current "
            f"{tuple(current.shape)} and old {tuple(old.shape)}"
        )


def _layer_weights(layer_mask: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """Broadcast ``layer_mask`` ([L] or [N, T, L]) to a float [N, T, L] weight, or None (all present)."""
    if layer_mask is None:
        return None
    n, t, num_layers = shape
    if layer_mask.shape not in ((num_layers,), (n, t, num_layers)):
        raise ValueError(f"layer_mask must be [L]={num_layers} or [N, T, L]={(n, t, num_layers)}, "
                         f"got {tuple(layer_mask.shape)}")
    return layer_mask.to(device=device, dtype=torch.float32).expand(n, t, num_layers)


def per_layer_router_shift(
    current_log_scores: torch.Tensor, old_log_scores: torch.Tensor, layer_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """d^l_{i,t} = (1/K) Σ_k |log r_θ^l − log r_old^l| -> [N, T, L] (fp32; absent layers are 0)."""
    _check_scores(current_log_scores, old_log_scores)
    # bf16 log-scores lose ~3 significant digits: the difference must be taken in fp32.
    d = (current_log_scores.float() - old_log_scores.float()).abs().mean(dim=-1)
    w = _layer_weights(layer_mask, d.shape, d.device)
    return d if w is None else torch.where(w > 0, d, torch.zeros_like(d))


def aggregate_layers(
    per_layer: torch.Tensor, aggregation: Aggregation = "mean", layer_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Combine per-layer distances [N, T, L] into d [N, T]; "mean" averages over the PRESENT layers."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    w = _layer_weights(layer_mask, per_layer.shape, per_layer.device)
    if w is not None:
        per_layer = torch.where(w > 0, per_layer, torch.zeros_like(per_layer))
    total = per_layer.sum(dim=-1)
    if aggregation == "sum":
        return total
    count = per_layer.new_full(total.shape, per_layer.shape[-1]) if w is None else (w > 0).sum(-1).to(total.dtype)
    # A token with no MoE layer (count 0) has d = 0, i.e. γ = 1: nothing to correct.
    return total / count.clamp_min(1)


def router_shift_distance(
    current_log_scores: torch.Tensor,
    old_log_scores: torch.Tensor,
    aggregation: Aggregation = "mean",
    layer_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Router-shift distance d [N, T] (differentiable; :func:`router_shift_ratio` applies the stop-gradient)."""
    per_layer = per_layer_router_shift(current_log_scores, old_log_scores, layer_mask)
    return aggregate_layers(per_layer, aggregation, layer_mask)


def router_shift_ratio(d: torch.Tensor, floor: float = 0.8) -> torch.Tensor:
    """γ = sg[max(exp(−d), floor)] [N, T]. Never carries gradient, whatever ``d`` does."""
    _check_floor(floor)
    return torch.exp(-d.detach().float()).clamp_min(float(floor))


@torch.no_grad()
def compute_router_shift(
    current_log_scores: torch.Tensor,
    old_log_scores: torch.Tensor,
    cfg: RouterShiftConfig,
    layer_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ [N, T], per-layer distance [N, T, L]) in one pass, without building an autograd graph
    (γ is stop-gradient, so keeping the router scores' graph alive would only cost memory)."""
    per_layer = per_layer_router_shift(current_log_scores, old_log_scores, layer_mask)
    d = aggregate_layers(per_layer, cfg.aggregation, layer_mask)
    return router_shift_ratio(d, cfg.floor), per_layer


@torch.no_grad()
def expert_set_changed(old_ids: torch.Tensor, current_topk_ids: torch.Tensor) -> torch.Tensor:
    """Per token and layer, the fraction of the old top-K ids that are not in the current top-K: [N, T, L]."""
    if old_ids.dim() != 4 or current_topk_ids.dim() != 4 or old_ids.shape[:3] != current_topk_ids.shape[:3]:
        raise ValueError(f"expert ids must be [N, T, L, K] with matching N, T, L; got {tuple(old_ids.shape)} "
                         f"and {tuple(current_topk_ids.shape)}")
    # Loop over the current K rather than broadcasting [.., K, K]: keeps memory at one [N, T, L, K] bool.
    kept = torch.zeros(old_ids.shape, dtype=torch.bool, device=old_ids.device)
    cur = current_topk_ids.to(old_ids.dtype)
    for k in range(cur.shape[-1]):
        kept |= old_ids == cur[..., k : k + 1]
    return (~kept).float().mean(dim=-1)


@torch.no_grad()
def expert_set_change_rate(
    old_ids: torch.Tensor,
    current_topk_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    layer_mask: torch.Tensor | None = None,
    per_layer: bool = False,
) -> torch.Tensor:
    """Fraction of old top-K expert ids that are no longer in the current top-K.

    ``old_ids`` [N, T, L, K], ``current_topk_ids`` [N, T, L, K'] (same N, T, L), ``mask`` [N, T] valid tokens.
    Returns a scalar (averaged over valid token×layer×k) or, with ``per_layer``, an [L] tensor.
    """
    return change_rate(expert_set_changed(old_ids, current_topk_ids), mask, layer_mask, per_layer)


@torch.no_grad()
def change_rate(
    changed: torch.Tensor,
    mask: torch.Tensor | None = None,
    layer_mask: torch.Tensor | None = None,
    per_layer: bool = False,
) -> torch.Tensor:
    """The mean of :func:`expert_set_changed`'s [N, T, L] fractions over valid tokens (and layers): a scalar
    or, with ``per_layer``, an [L] tensor. Split out for callers that already hold ``changed`` (pipeline
    stages send it to the last stage)."""
    n, t, num_layers = changed.shape
    w = torch.ones_like(changed)
    if mask is not None:
        if mask.shape != (n, t):
            raise ValueError(f"mask must be [N, T]={(n, t)}, got {tuple(mask.shape)}")
        w = w * (mask.to(changed.device) > 0).float()[..., None]
    lw = _layer_weights(layer_mask, changed.shape, changed.device)
    if lw is not None:
        w = w * (lw > 0).float()
    changed = changed * w
    if per_layer:
        return changed.sum(dim=(0, 1)) / w.sum(dim=(0, 1)).clamp_min(1)
    return changed.sum() / w.sum().clamp_min(1)
