"""Where a decode step's time goes, full vs trimmed, at the same batch: self-attention, cross-attention, MLP,
crosstrim's own hooks, and the rest (embedding, norms, head, transformers' masks).

Same model as ``crosstrim bench`` (random weights, real 11B layer dimensions, cross-attention at 1, 3, 5 of 6
layers, image features of real size, 4 x 1601 tokens per image). Every variant prefills the same batch
once, then decodes ``--steps`` greedy steps exactly as generate's loop calls the model (one token, the
growing 2-D mask, the last row of the 4-D cross-attention mask, the cache); variants alternate step by
step so slow drifts of a shared machine hit them alike, and each module's time is the median over steps
of wall time between its forward pre-hook and hook (one thread: nothing overlaps). crosstrim's hooks are
timed by wrapping :class:`crosstrim.engine.handle.TrimHandle`'s hook methods. Run pinned to one core, e.g.::

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/profile_decode.py --batch 8 --steps 6

The static-cache rows (``--compile``) decode through ``generate(cache_implementation="static")`` with
``torch.compile`` (inductor) and report the median step from a streamer: full vs ``keep_ratio``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections import defaultdict

import torch

import crosstrim
from crosstrim.adapters import adapter_for
from crosstrim.bench import measure
from crosstrim.core import TrimConfig
from crosstrim.engine import handle as engine
from crosstrim.engine import memory
from crosstrim.engine.cache import cache_argument

PARTS = ("self-attn", "cross-attn", "mlp", "crosstrim hooks", "rest")


def module_timers(model, spans: dict) -> list:
    """Pre/post hooks that add each module kind's wall time of the current step to ``spans``."""
    handles, text = [], adapter_for(model).decoder(model)
    for idx, layer in enumerate(text.layers):
        cross = idx in text.config.cross_attention_layers
        attn = layer.cross_attn if cross else layer.self_attn
        for name, module in (("cross-attn" if cross else "self-attn", attn), ("mlp", layer.mlp)):
            start = {}
            handles.append(
                module.register_forward_pre_hook(lambda m, a, start=start: start.update(t=time.perf_counter()))
            )

            def done(m, a, o, name=name, start=start, idx=idx):
                spent = time.perf_counter() - start["t"]
                spans[name] += spent
                spans[f"{name} {idx}"] += spent

            handles.append(module.register_forward_hook(done))
    return handles


def timed_hooks(spans: dict) -> list:
    """Wrap TrimHandle's hook methods (before trimming binds them) so their time lands in ``spans``."""
    restore = []
    for name in ("_begin", "_end", "_gather", "_select", "_capture_query", "_capture_key"):
        original = getattr(engine.TrimHandle, name)

        @functools.wraps(original)
        def wrapped(self, *args, original=original, **kwargs):
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                spans["crosstrim hooks"] += time.perf_counter() - start

        setattr(engine.TrimHandle, name, wrapped)
        restore.append((name, original))
    return restore


def eager_breakdown(model, mm, args) -> dict:
    variants = [("full", None), (f"keep {args.keep:g}", TrimConfig(keep_ratio=args.keep))]
    spans: dict[str, float] = defaultdict(float)
    restore = timed_hooks(spans)
    timers = module_timers(model, spans)
    state, samples = {}, {name: defaultdict(list) for name, _ in variants}
    inputs = measure.make_inputs(model, mm, args.batch, args.text, 0)
    try:
        for name, config in variants:
            handle = crosstrim.trim(model, config) if config else None
            with torch.inference_mode():
                out = model(**inputs, use_cache=True, logits_to_keep=1)
            if handle is not None:
                handle.remove()
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            state[name] = [out[cache_argument(model)], token, inputs["attention_mask"], config]
        cross_mask = inputs["cross_attention_mask"][:, -1:]
        del inputs, out
        for step in range(args.steps + 1):  # the first step warms up
            for name, _ in variants if step % 2 == 0 else variants[::-1]:
                cache, token, mask, config = state[name]
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                handle = crosstrim.trim(model, config) if config else None  # the selection is on the cache
                spans.clear()
                start = time.perf_counter()
                with torch.inference_mode():
                    out = model(
                        input_ids=token,
                        attention_mask=mask,
                        cross_attention_mask=cross_mask,
                        use_cache=True,
                        **{cache_argument(model): cache},
                    )
                total = time.perf_counter() - start
                if handle is not None:
                    handle.remove()
                state[name][1:3] = out.logits[:, -1].argmax(-1, keepdim=True), mask
                if step == 0:
                    continue
                parts = {k: spans[k] for k in PARTS[:4]}
                parts["rest"] = total - sum(parts.values())
                layers = {k: v for k, v in spans.items() if k[-1].isdigit()}
                for key, value in {**parts, "step": total, **layers}.items():
                    samples[name][key].append(value)
    finally:
        for h in timers:
            h.remove()
        for name, original in restore:
            setattr(engine.TrimHandle, name, original)
    return {name: {k: statistics.median(v) for k, v in parts.items()} for name, parts in samples.items()}


class StepClock:
    def __init__(self) -> None:
        self.marks: list[float] = []

    def put(self, value) -> None:
        self.marks.append(time.perf_counter())

    def end(self) -> None:
        pass


def compiled_steps(model, mm, args) -> dict:
    """generate with a static cache, decode step compiled by torch.compile (inductor): median step, ms."""
    from transformers import CompileConfig

    config = CompileConfig(backend=args.backend, mode=None, fullgraph=False)
    config._compile_all_devices = True  # transformers compiles on GPU only unless told
    inputs = measure.pixel_inputs(model, mm, args.batch, args.text, 0)  # as a processor gives them
    greedy = {"do_sample": False, "pad_token_id": 0, "max_new_tokens": args.steps + 2, "min_new_tokens": args.steps + 2}
    result = {}
    for name, trim in (("full", None), (f"keep {args.keep:g}", TrimConfig(keep_ratio=args.keep))):
        handle = crosstrim.trim(model, trim) if trim else None
        try:
            runs = []
            for mode in ("dynamic", "static compiled"):
                extra = {"cache_implementation": "static", "compile_config": config} if mode != "dynamic" else {}
                for rep in range(2):  # the first compiled call compiles
                    clock = StepClock()
                    with torch.inference_mode():
                        model.generate(**inputs, **greedy, **extra, streamer=clock)
                    steps = [b - a for a, b in zip(clock.marks[2:], clock.marks[3:])]
                    if rep == 1 or mode == "dynamic":
                        runs.append((mode, statistics.median(steps)))
            result[name] = dict(runs)
        finally:
            if handle is not None:
                handle.remove()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dims", default="11b", help="11b, or tiny for a smoke run")
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--compile", action="store_true", help="also the static cache + torch.compile decode step")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend with --compile")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cross = list(range(1, args.layers, 2))
    dtype = getattr(torch, args.dtype)
    model = measure.random_model(
        args.dims, args.layers, cross, 512 if args.dims == "tiny" else 16384, torch.device("cpu"), dtype, 0
    )
    mm = memory.MemoryModel.from_config(model.config)
    print(f"batch {args.batch}, text {args.text}, {args.layers} layers (cross {cross}), {args.dtype}, 1 thread")
    eager = eager_breakdown(model, mm, args)
    print("eager decode step, ms (median of steps): " + ", ".join([*PARTS, "step"]))
    for name, parts in eager.items():
        print(f"  {name:>10}: " + ", ".join(f"{k} {parts[k] * 1e3:.1f}" for k in [*PARTS, "step"]))
    for name, parts in eager.items():
        layers = sorted((k for k in parts if k[-1].isdigit()), key=lambda k: int(k.split()[-1]))
        print(f"  {name:>10} by layer: " + ", ".join(f"{k} {parts[k] * 1e3:.1f}" for k in layers))
    names = list(eager)
    ratio = eager[names[0]]["step"] / eager[names[1]]["step"]
    print(f"  step full / trimmed at the same batch: {ratio:.3f} (tokens/s trimmed / full)")
    out = {"args": vars(args), "eager": eager, "loadavg": list(__import__("os").getloadavg())}
    if args.compile:
        out["compiled"] = compiled_steps(model, mm, args)
        for name, modes in out["compiled"].items():
            print(f"  {name:>10}: " + ", ".join(f"{m} {v * 1e3:.1f} ms" for m, v in modes.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
