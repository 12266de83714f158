"""How much rollout time the one-step-off schedule hides: the same RSPO run from the SFT model with the vLLM
engine, synchronous vs ``--async-rollout --max-staleness 1``, side by side in one invocation.

    python benchmarks/async_overlap.py --sft runs/countdown_tiny/sft --data data/countdown --iters 6

Mean seconds per iteration over the iterations after the first (the first is synchronous in both runs):
the whole iteration, the rollout the trainer waited for at its start, and (async) the time it still waited
after training for the generation running beside it.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_rspo.rl import trainer

KEYS = ("time/iteration_s", "time/rollout_s", "time/rollout_wait_s", "time/train_s", "rollout/staleness_max")


def _means(logdir: str) -> dict[str, float]:
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for k in KEYS:
        values = [e.value for e in acc.Scalars(k) if e.step > 1] if k in acc.Tags()["scalars"] else []
        out[k] = sum(values) / len(values) if values else float("nan")
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="runs/countdown_tiny/sft")
    p.add_argument("--data", default="data/countdown")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--engine", default="vllm", choices=["vllm", "megatron"])
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("synchronous", []), ("async, staleness 1", ["--async-rollout", "--max-staleness", "1"])):
            tb = os.path.join(tmp, name.replace(" ", "_").replace(",", ""))
            trainer.main(["--init-from", args.sft, "--tokenizer-model", os.path.join(args.data, "tokenizer.model"),
                          "--train-data", os.path.join(args.data, "train.jsonl"),
                          "--test-data", os.path.join(args.data, "test.jsonl"), "--rl-algorithm", "rspo",
                          "--train-iters", str(args.iters), "--rollout-batch-size", "16", "--num-generations", "8",
                          "--max-new-tokens", "16", "--num-minibatches", "4", "--lr", "1e-4", "--no-progress",
                          "--log-interval", "1000", "--rollout-engine", args.engine, "--seed", "5",
                          "--tensorboard-dir", tb, *extra])
            results[name] = _means(tb)
    print(f"| schedule ({args.engine}) | iteration (s) | rollout wait at start (s) | wait after train (s) | "
          "train (s) | staleness |\n|---|---:|---:|---:|---:|---:|")
    for name, m in results.items():
        print(f"| {name} | {m['time/iteration_s']:.2f} | {m['time/rollout_s']:.2f} | "
              f"{m['time/rollout_wait_s']:.2f} | {m['time/train_s']:.2f} | {m['rollout/staleness_max']:.0f} |")
    return results


if __name__ == "__main__":
    main()
