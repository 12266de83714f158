"""The off-policy schedule (``--async-rollout --max-staleness N``): rollouts generated ahead of training.

When iteration k starts (weights of version k), rollouts k+1 .. k+N are generated with those weights while
iteration k trains on rollout k, which was generated with version max(0, k−N): every sample is at most
N versions old when it is trained on (``Rollout.weight_version`` says which). The weight sync to version
k+1 happens after training, once the generation started at version k has finished.

With an external engine in another process (vLLM, one trainer rank) the generation runs in a thread while
the trainer computes, so the two overlap in time; otherwise (the built-in engine samples with the
training model itself; several ranks would interleave their collectives) the same schedule runs
sequentially: generate ahead, then train. N = 0 is the synchronous loop.

Roles (DESIGN §7, the decoupled-PPO reading): the behaviour policy is the rollout's version (π_rollout:
the engine's log-probs, used by the mismatch corrections); the proximal policy is θ at the start of the
update round, recomputed by the old-policy pass (π_old: the ratio and the clip); RSPO's reference router
is the proximal one (router shift measures θ_old → θ at the proximal policy's experts).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from megatron_rspo.rl.experience import Experience, tensors_to


class RolloutQueue:
    def __init__(self, produce: Callable[[int], Any], staleness: int, overlap: bool,
                 position: Callable[[], int]) -> None:
        self.produce, self.staleness, self.overlap, self.position = produce, staleness, overlap, position
        self.ready: dict[int, tuple[Any, int]] = {}  # index -> (rollout, stream position before it)
        self.scheduled: set[int] = set()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.wait_seconds = 0.0  # time the trainer waited for generation after training (overlap: not hidden)
        self.generate_seconds = 0.0  # time spent producing rollouts ahead (in the thread when overlapping)

    def _make(self, index: int) -> None:
        before = self.position()
        self.ready[index] = (self.produce(index), before)

    def _ahead(self, indices: list[int]) -> None:
        t0 = time.perf_counter()
        try:
            for j in indices:
                self._make(j)
        except BaseException as e:  # re-raised by wait()
            self._error = e
        self.generate_seconds += time.perf_counter() - t0

    def get(self, index: int) -> Any:
        """Rollout ``index``; then start generating the ones the schedule puts ahead of it."""
        self.wait()
        if index not in self.ready:
            self._make(index)
        ahead = [j for j in range(index + 1, index + self.staleness + 1) if j not in self.ready
                 and j not in self.scheduled]
        self.scheduled.update(ahead)
        if ahead:
            if self.overlap:
                self._thread = threading.Thread(target=self._ahead, args=(ahead,), daemon=True)
                self._thread.start()
            else:
                self._ahead(ahead)
                self._raise()
        rollout, _ = self.ready.pop(index)
        self.scheduled.discard(index)
        return rollout

    def wait(self) -> None:
        """Block until the generation started by the last ``get`` is done (call before a weight sync)."""
        if self._thread is not None:
            t0 = time.perf_counter()
            self._thread.join()
            self.wait_seconds += time.perf_counter() - t0
            self._thread = None
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def resume_position(self, default: int) -> int:
        """The data-stream position before the oldest rollout generated but not yet trained on: where a resumed
        run that cannot restore those rollouts (another world size or schedule) generates them again."""
        return min((pos for _, pos in self.ready.values()), default=default)

    def pending(self) -> list[tuple[int, Any, int]]:
        """(index, rollout, stream position before it) of the rollouts generated but not yet trained on."""
        if self._thread is not None:
            raise RuntimeError("a generation is in flight: wait() before reading the pending rollouts")
        return [(i, *self.ready[i]) for i in sorted(self.ready)]

    def restore(self, items: list[tuple[int, Any, int]]) -> None:
        for index, rollout, position in items:
            self.ready[index] = (rollout, position)


# ------------------------------------------------------------------ exact resume
def pending_state(queue: RolloutQueue, stream_position: int) -> dict[str, Any]:
    """This rank's pending rollouts as plain CPU data for the checkpoint, so a resumed run trains on the very
    samples (generated with the older weights) that the uninterrupted run would have."""
    return {"stream_position": stream_position,
            "pending": [{"index": i, "position": pos, "experience": exp.state_dict(),
                         "stats": tensors_to(stats, "cpu")}
                        for i, (exp, stats), pos in queue.pending()]}


def restore_pending(queue: RolloutQueue, state: dict[str, Any], iteration: int, device: torch.device) -> int:
    """Put the checkpoint's pending rollouts back into ``queue``; returns the stream position to resume from
    (after them). Rollouts the resumed schedule cannot use (older than its --max-staleness,
    or already behind ``iteration``) are dropped with every later one, and the stream rewinds to the first
    dropped, which is generated again."""
    items = sorted(state.get("pending", []), key=lambda it: it["index"])
    keep = []
    for it in items:
        exp = Experience.from_state_dict(it["experience"], device)
        if it["index"] < iteration or it["index"] - exp.weight_version > queue.staleness:
            break
        keep.append((it["index"], (exp, tensors_to(it["stats"], device)), it["position"]))
    queue.restore(keep)
    return state["stream_position"] if len(keep) == len(items) else items[len(keep)]["position"]
