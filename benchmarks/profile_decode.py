"""Where a decode step's time goes, full vs trimmed: torch.profiler over greedy decode steps.

Same model and inputs as ``crosstrim bench`` (random weights, real 11B layer dims, 4 layers, image features
of real size). Prints per variant the CPU time of weight GEMMs (aten::mm/addmm/bmm), attention (sdpa) and
everything else, per step. Run pinned to one core, e.g.::

    taskset -c 1 .venv/bin/python benchmarks/profile_decode.py --batch 8 --text 128 --steps 6
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from crosstrim.bench import measure
from crosstrim.core import TrimConfig
from crosstrim.engine import memory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cross = list(range(1, args.layers, 2))
    model = measure.random_model("11b", args.layers, cross, 16384, torch.device("cpu"), torch.float32, 0)
    mm = memory.MemoryModel.from_config(model.config)
    inputs = measure.make_inputs(model, mm, args.batch, args.text, 0)
    variants = [
        ("full", None),
        ("keep 0.25", TrimConfig(keep_ratio=0.25)),
        ("keep 0.25, first layer too", TrimConfig(keep_ratio=0.25, trim_first_layer_cache=True)),
    ]
    clock = measure.Clock(torch.device("cpu"))
    print(f"batch {args.batch}, text {args.text}, {args.layers} layers (cross {cross}), 1 thread; ms per step")
    for name, config in variants:
        cache, token, _, _, _ = measure.timed_call(model, config, clock, **inputs, logits_to_keep=1)
        mask, cross_mask = inputs["attention_mask"], inputs["cross_attention_mask"][:, -1:]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                step = {"attention_mask": mask, "cross_attention_mask": cross_mask, "past_key_values": cache}
                _, token, _, _, _ = measure.timed_call(model, config, clock, input_ids=token, **step)
        totals = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
        for event in prof.key_averages():
            if event.key in ("aten::mm", "aten::addmm", "aten::bmm"):
                totals["gemm"] += event.self_cpu_time_total
            elif "scaled_dot_product" in event.key:
                totals["attention"] += event.self_cpu_time_total
            else:
                totals["other"] += event.self_cpu_time_total
        per_step = {k: v / 1e3 / args.steps for k, v in totals.items()}
        print(f"{name:>28}: " + ", ".join(f"{k} {v:.1f}" for k, v in per_step.items()))


if __name__ == "__main__":
    main()
