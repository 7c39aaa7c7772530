"""How many concurrent 4-tile image requests vLLM holds in one KV pool: full vs crosstrim keep ratios.

A random-weight Mllama at Llama-3.2-11B-Vision's text-layer dimensions (hidden 4096, 32 heads, 8 KV heads,
head 128, 560 px tiles of 1601 tokens, 4 tiles) but 5 layers deep (4 self + 1 cross, 11B's 32:8 ratio), so
per request it holds 1/8 of 11B's KV. Each setting runs in a fresh process at the same
``VLLM_CPU_KVCACHE_SPACE``; the script submits more requests than fit and steps the engine, recording the
most requests running at once, next to what vLLM reports (its KV blocks and "maximum concurrency") and
what crosstrim's memory model predicts for the same pool. Prints a table and writes JSON.

    .venv-vllm/bin/python benchmarks/vllm_capacity.py --kv-gib 1 --out runs/vllm_capacity.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "<|image|> what is in the image ?"
# For chat requests (vllm_serve_load.py): image content becomes <|image|>, as in Llama-3.2-Vision's template.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|> {% else %}{{ part['text'] }} {% endif %}{% endfor %}{% endfor %}"
)
NEW_TOKENS = 48


def build_checkpoint(path: Path) -> None:
    import torch

    from crosstrim import tiny

    torch.set_default_dtype(torch.bfloat16)
    config = dict(
        image_size=560, patch_size=14, max_num_tiles=4, vision_hidden=64, vision_layers=1, vision_global_layers=1,
        text_hidden=4096, text_layers=5, cross_attention_layers=(3,), heads=32, kv_heads=8,
    )  # fmt: skip
    model, processor = tiny.random_model(seed=0, gate=0.5, **config)
    processor.tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(path)
    processor.save_pretrained(path)


def measure(checkpoint: str, ratio: float, requests: int) -> dict:
    """In this (fresh) process: vLLM's pool and reported concurrency, then the most requests running at once."""
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    overrides = None if ratio == 1.0 else {"crosstrim": {"keep_ratio": ratio}}
    llm = LLM(
        model=checkpoint, dtype="bfloat16", enforce_eager=True, max_model_len=256, max_num_seqs=requests,
        max_num_batched_tokens=8192, hf_overrides=overrides, seed=0,
    )  # fmt: skip
    core = llm.llm_engine.engine_core.engine_core
    kv_config = core.scheduler.kv_cache_config
    reported = get_max_concurrency_for_kv_cache_config(llm.llm_engine.vllm_config, kv_config)
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    pictures = [Image.fromarray(rng.integers(0, 255, (1120, 1120, 3), dtype=np.uint8)) for _ in range(8)]  # 2x2 tiles
    for i in range(requests):
        prompt = {"prompt": PROMPT, "multi_modal_data": {"image": pictures[i % len(pictures)]}}
        llm.llm_engine.add_request(str(i), prompt, params)
    # Step until every request was admitted or the pool stopped admitting (two steps without a new one while
    # requests wait), or one finished: the most running at once is what the pool holds.
    held, steps, stalled, start = 0, 0, 0, time.perf_counter()
    while core.scheduler.waiting and stalled < 2:
        outputs = llm.llm_engine.step()
        steps += 1
        running = len(core.scheduler.running)
        stalled = stalled + 1 if running <= held else 0
        held = max(held, running)
        if any(o.finished for o in outputs):
            break
    groups = [
        {
            "layers": len(g.layer_names),
            "spec": type(g.kv_cache_spec).__name__,
            "block_size": g.kv_cache_spec.block_size,
            "page_bytes": g.kv_cache_spec.page_size_bytes,
        }
        for g in kv_config.kv_cache_groups
    ]
    return {
        "keep_ratio": ratio,
        "num_blocks": kv_config.num_blocks,
        "groups": groups,
        "vllm_reported_max_concurrency": reported,
        "held_at_once": held,
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "still_waiting": len(core.scheduler.waiting),
    }


def predict(checkpoint: str, ratio: float, pool_bytes: int, text_tokens: int) -> dict:
    """crosstrim's memory model for the same pool: KV bytes of one request, and how many fit."""
    from transformers import AutoConfig

    from crosstrim.engine.memory import MemoryModel

    model = MemoryModel.from_config(AutoConfig.from_pretrained(checkpoint))
    kv = model.kv_bytes("bf16", text_tokens=text_tokens, r=ratio, tiles=4, trim_first_layer_cache=True)
    return {"request_kv_bytes": kv.total, "predicted": pool_bytes // kv.total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    parser.add_argument("--ratios", default="1,0.5,0.25,0.1")
    parser.add_argument("--requests", type=int, default=0, help="requests submitted (default: 12 more than fit)")
    parser.add_argument("--out", type=Path, default=Path("runs/vllm_capacity.json"))
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print("RESULT " + json.dumps(measure(args.checkpoint, args.worker, args.requests)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(Path(tmp) / "mllama-11b-dims-5-layers")
        build_checkpoint(Path(checkpoint))
        from transformers import AutoProcessor

        prompt_tokens = len(AutoProcessor.from_pretrained(checkpoint).tokenizer(PROMPT)["input_ids"])
        pool = args.kv_gib << 30
        rows = []
        for ratio in [float(r) for r in args.ratios.split(",")]:
            prediction = predict(checkpoint, ratio, pool, prompt_tokens + NEW_TOKENS)
            # The same token counts in vLLM's whole blocks: every layer allocates block_size tokens at a time
            # from one pool of pool / page_bytes blocks (page: 128 tokens x 8 KV heads x 128 x K,V x bf16).
            block, page = 128, 128 * 8 * 128 * 2 * 2
            slots = -(-4 * 1601 * round(ratio * 1000) // 1000)  # ceil(r x valid tokens), 4 tiles of 1601
            per_request = -(-slots // block) + 4 * -(-(prompt_tokens + NEW_TOKENS) // block)
            prediction["predicted_in_blocks"] = (pool // page) // per_request
            # A few more requests than fit, so the pool's limit shows (each holds its pixels until it ends).
            requests = args.requests or prediction["predicted_in_blocks"] + 12
            env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.kv_gib), VLLM_ENABLE_V1_MULTIPROCESSING="0")
            command = [sys.executable, __file__, "--checkpoint", checkpoint, "--worker", str(ratio)]
            command += ["--requests", str(requests)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                sys.exit(f"keep_ratio={ratio} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
            row = {**json.loads(lines[-1][7:]), **prediction, "submitted": requests}
            rows.append(row)
            print(json.dumps(row), flush=True)
    full = rows[0]["held_at_once"]
    print(f"\nKV pool {args.kv_gib} GiB (VLLM_CPU_KVCACHE_SPACE), 4-tile image + {prompt_tokens} prompt tokens + "
          f"{NEW_TOKENS} new tokens per request; 11B text dims, 5 layers (4 self + 1 cross)")  # fmt: skip
    print("| keep_ratio | request KV (MB, model) | predicted | predicted in vLLM blocks | vLLM reports |", end="")
    print(" held at once | vs full |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['keep_ratio']:g} | {row['request_kv_bytes'] / 1e6:.1f} | {row['predicted']} | "
            f"{row['predicted_in_blocks']} | {row['vllm_reported_max_concurrency']:.1f} | {row['held_at_once']} | "
            f"{row['held_at_once'] / full:.2f}x |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"kv_gib": args.kv_gib, "rows": rows, "uptime": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
