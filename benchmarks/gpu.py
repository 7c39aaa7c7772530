"""Every GPU figure crosstrim needs, in one run of under 10 minutes on one H200 (or one 80 GB GPU).

    PYTHONPATH=src python benchmarks/gpu.py          # on a CUDA machine: writes benchmarks/results/gpu-*
    PYTHONPATH=src python benchmarks/gpu.py --smoke  # CPU, tiny dimensions, to a temporary folder

(crosstrim installed, or ``PYTHONPATH=src`` for this checkout's.)

Three steps, each writing its files as it finishes, so a run cut short keeps what it measured:

1. correctness on the device: trimmed logits vs the masked reference (``tests/support.py``: the unpatched
   model with every dropped image token masked) on a random tiny model, in float32 and bfloat16, for the
   paper's rule, an exact fraction and a trimmed first-layer cache; and ``crosstrim.generate`` micro-batched
   vs one-shot greedy tokens; a fixed budget with a static cache vs the dynamic cache, greedy tokens, eager and
   under ``torch.compile`` (inductor on the GPU, the "eager" backend in the smoke run). Tolerances on max
   |logit difference|: float32 1e-4 (TF32 off; the CPU tests hold
   1e-5, GPU kernels reduce in other orders); bfloat16 8 units in the last place of the largest logit,
   ``8 * 2**-7 * max|logit|`` (bf16 carries 8 significant bits, and trimmed and reference sum attention over
   different lengths, so they round differently); the smoke run on CPU measured 2e-3 in bf16;
2. ``crosstrim bench`` at full 11B depth (40 layers, 8 cross, full vocabulary), random weights, bf16,
   batch 1..128 at 128 text tokens, full vs keep 0.5 / 0.25 / 0.1;
3. ``crosstrim bench --memory-budget`` with the full 11B vision encoder: the largest batch each variant fits
   (micro-batched prefill), predicted and measured, and decode tokens/s at it.

Nothing here is a figure until it ran on a GPU; the smoke run writes only to a temporary folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SOURCE = str(ROOT / "src")  # this checkout's crosstrim, for the bench subprocesses

ULP = {torch.float32: None, torch.bfloat16: 2**-7}  # bf16: relative spacing of values in [1, 2)
BATCH = [  # (tiles per image, prompt) for the tiny processor: several images, padding tiles, left padding
    ([2, 1], "<|image|> what is the color <|image|> of the circle ?"),
    ([4], "<|image|> how many shapes are there ?"),
    ([1, 1], "describe it <|image|> a red <|image|> left"),
]


def load_test_support():
    """``tests/support.py`` (the masked reference lives with the tests), loaded from its file: no import path
    of this process changes."""
    spec = importlib.util.spec_from_file_location("crosstrim_test_support", ROOT / "tests" / "support.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def correctness(device: torch.device) -> dict:
    """Trimmed vs masked reference (logits, every dtype), micro-batched vs one-shot generate (tokens), static
    cache vs dynamic (tokens, eager and compiled)."""
    support = load_test_support()
    inputs, masked_reference, positions = support.inputs, support.masked_reference, support.positions

    import crosstrim
    from crosstrim import tiny

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    configs = [
        crosstrim.TrimConfig(k_ratio=0.25),
        crosstrim.TrimConfig(keep_ratio=0.3),
        crosstrim.TrimConfig(k_ratio=0.1, trim_first_layer_cache=True),
    ]
    model, processor = tiny.random_model(seed=0)
    batch = inputs(processor, BATCH)
    results = []
    for dtype, ulp in ULP.items():
        model.to(device, dtype)
        feed = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}
        feed["position_ids"] = positions(feed["attention_mask"])
        for config in configs:
            with torch.no_grad(), crosstrim.trimmed(model, config) as handle:
                logits = model(**feed).logits.float()
                kept = handle.stats.kept_indices
            with torch.no_grad(), masked_reference(model, tuple(k.to(device) for k in kept), handle.stats.image_tokens):
                reference = model(**feed).logits.float()
            diff = (logits - reference).abs().max().item()
            tolerance = 1e-4 if ulp is None else 8 * ulp * reference.abs().max().item()
            ok, first = diff <= tolerance, config.trim_first_layer_cache
            results.append({"dtype": str(dtype), "config": config.describe(), "first_layer": first, "ok": ok})
            results[-1] |= {"max_abs_logit_diff": diff, "tolerance": tolerance}
            label = f"{dtype} {config.describe():>16}"
            print(f"  {label}: max |trimmed - masked reference| = {diff:.2e} (tolerance {tolerance:.1e})", flush=True)
    model.to(device, torch.float32)
    feed = {k: v.to(device) for k, v in batch.items()}
    greedy = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with crosstrim.trimmed(model, configs[1]):
        one_shot = model.generate(**feed, **greedy)
        micro = crosstrim.generate(model, prefill_batch_size=2, **feed, **greedy)
    same = torch.equal(one_shot, micro)
    print(f"  crosstrim.generate(prefill_batch_size=2) == model.generate, greedy tokens: {same}", flush=True)
    results.append({"dtype": "torch.float32", "config": "generate micro-batched vs one-shot", "ok": same})
    from transformers import CompileConfig

    compile_config = CompileConfig(backend="inductor" if device.type == "cuda" else "eager")
    compile_config._compile_all_devices = True  # CPU smoke run: transformers compiles on GPU only unless told
    static = {**greedy, "cache_implementation": "static"}
    for label, extra in (
        ("eager", {}),
        (f"torch.compile {compile_config.backend}", {"compile_config": compile_config}),
    ):
        with crosstrim.trimmed(model, configs[1]):
            dynamic = model.generate(**feed, **greedy)
            fixed = model.generate(**feed, **static, **extra)
        same = torch.equal(dynamic, fixed)
        print(f"  keep_ratio with a static cache ({label}) == dynamic cache, greedy tokens: {same}", flush=True)
        results.append({"dtype": "torch.float32", "config": f"static cache {label} vs dynamic", "ok": same})
    return {"device": str(device), "checks": results, "ok": all(r["ok"] for r in results)}


def bench(argv: list[str], log: Path, limit: int) -> int:
    """``crosstrim bench ARGV``, its output teed to ``log``, killed after ``limit`` seconds."""
    command = [sys.executable, "-m", "crosstrim.cli", "bench", *argv]
    print("$ " + " ".join(command), flush=True)
    with log.open("w") as out:
        out.write("$ " + " ".join(command) + "\n")
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [SOURCE, os.environ.get("PYTHONPATH")]))}
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        start = time.monotonic()
        for line in process.stdout:
            print(line, end="", flush=True)
            out.write(line)
            if time.monotonic() - start > limit:
                process.kill()
                out.write(f"killed after {limit} s\n")
                break
    return process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny dimensions, temporary folder")
    parser.add_argument("--out", help="results folder (default benchmarks/results; --smoke: a temporary one)")
    parser.add_argument("--budget", type=float, default=48.0, help="memory budget of step 3, GB (default 48)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --smoke to check the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.out:
        out = Path(args.out)
    else:
        out = Path(tempfile.mkdtemp(prefix="crosstrim-gpu-smoke-")) if args.smoke else ROOT / "benchmarks/results"
    out.mkdir(parents=True, exist_ok=True)
    name = "smoke-cpu" if args.smoke else torch.cuda.get_device_name().replace(" ", "-")
    started = time.monotonic()

    print(f"1/3 correctness on {device} ({name})", flush=True)
    check = correctness(device) | {"machine": name, "torch": torch.__version__}
    (out / "gpu-correctness.json").write_text(json.dumps(check, indent=1))

    if args.smoke:  # the same commands at tiny dimensions, seconds each
        model = ["--dims", "tiny", "--layers", "4", "--device", "cpu", "--threads", "1"]
        grid = ["--batch", "1,2", "--text-tokens", "8", "--decode-steps", "2", "--repeats", "1"]
        budget = ["--memory-budget", "0.8", "--max-batch", "6", "--prefill-batch-size", "2"]
    else:
        model = ["--dims", "11b", "--layers", "40", "--vocab", "128256", "--device", "cuda", "--dtype", "bfloat16"]
        grid = ["--batch", "1,2,4,8,16,32,64,128", "--text-tokens", "128", "--decode-steps", "16", "--repeats", "3"]
        budget = ["--memory-budget", f"{args.budget:g}", "--max-batch", "1024", "--prefill-batch-size", "8"]
    common = [*model, "--keep-ratios", "0.5,0.25,0.1", "--out", str(out)]
    print("2/3 bench, latency grid", flush=True)
    bench([*common, *grid, "--k-ratio", "0.25", "--tag", "gpu-11b-L40"], out / "gpu-11b-L40.log", 240)
    print("3/3 bench, memory budget (micro-batched prefill, full vision encoder)", flush=True)
    small = ["--batch", "1", "--text-tokens", "8" if args.smoke else "128", "--decode-steps", "8", "--repeats", "1"]
    vision = [] if args.smoke else ["--real-vision"]
    tag = ["--tag", "gpu-11b-L40-budget"]
    bench([*common, *small, *budget, *vision, "--k-ratio", "0.25", *tag], out / "gpu-11b-L40-budget.log", 270)
    verdict = "ok" if check["ok"] else "FAILED"
    print(f"done in {time.monotonic() - started:.0f} s; files in {out}; correctness {verdict}")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
