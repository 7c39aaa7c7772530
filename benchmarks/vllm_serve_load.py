"""A bounded load test of vLLM's OpenAI server on 127.0.0.1: N concurrent image chats, full vs trimmed.

Same random-weight checkpoint as ``vllm_capacity.py`` (Llama-3.2-11B-Vision text-layer dimensions, 5 layers,
560 px tiles, 4-tile images). For each setting, one server at the same ``VLLM_CPU_KVCACHE_SPACE`` gets one
warm-up request, then N chat requests at once (base64 PNG, ``max_tokens`` new tokens each, EOS ignored).
Records the most requests the server runs at once (its ``vllm:num_requests_running`` gauge, polled), the
wall time from the first request to the last answer, and generated tokens per second. Every request has a
timeout, the server is killed at the end, and only loopback addresses are used.

    .venv-vllm/bin/python benchmarks/vllm_serve_load.py --requests 64 --out runs/vllm_serve_load.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_capacity import build_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def running(base: str) -> int:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("vllm:num_requests_running"):
                return int(float(line.rsplit(" ", 1)[1]))
    return 0


def image_urls(count: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    urls = []
    for _ in range(count):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (1120, 1120, 3), dtype=np.uint8)).save(png, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(png.getvalue()).decode())
    return urls


def run_setting(checkpoint: str, ratio: float, urls: list[str], args) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--enforce-eager",
        "--max-model-len", "256", "--max-num-seqs", str(len(urls)), "--max-num-batched-tokens", "32768",
    ]  # fmt: skip
    if ratio != 1.0:
        command += ["--hf-overrides", json.dumps({"crosstrim": {"keep_ratio": ratio}})]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.kv_gib))
    log = open(args.log_dir / f"serve_{ratio:g}.log", "w")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server for keep_ratio={ratio} did not come up; see {log.name}")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except OSError:
                time.sleep(2)

        def chat(url: str) -> int:
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is in it ?"}]
            body = {
                "model": checkpoint,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            return post(f"{base}/v1/chat/completions", body, timeout=args.timeout)["usage"]["completion_tokens"]

        chat(urls[0])  # warm-up
        held, stop = [0], threading.Event()

        def poll() -> None:
            while not stop.is_set():
                held[0] = max(held[0], running(base))
                time.sleep(0.5)

        poller = threading.Thread(target=poll)
        poller.start()
        start = time.perf_counter()
        with ThreadPoolExecutor(len(urls)) as pool:
            tokens = sum(pool.map(chat, urls))
        seconds = time.perf_counter() - start
        stop.set()
        poller.join()
        return {
            "keep_ratio": ratio,
            "requests": len(urls),
            "held_at_once": held[0],
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
        }
    finally:
        for signal, wait in ((15, 30), (9, 10)):
            try:
                os.killpg(server.pid, signal)
                server.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--ratios", default="1,0.25")
    parser.add_argument("--kv-gib", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds one request may take")
    parser.add_argument("--out", type=Path, default=Path("runs/vllm_serve_load.json"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.log_dir = args.out.parent
    urls = image_urls(args.requests)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(Path(tmp) / "mllama-11b-dims-5-layers")
        build_checkpoint(Path(checkpoint))
        for ratio in [float(r) for r in args.ratios.split(",")]:
            rows.append(run_setting(checkpoint, ratio, urls, args))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.requests} concurrent 4-tile chats, {args.max_tokens} new tokens each, KV pool {args.kv_gib} GiB")
    print("| keep_ratio | held at once | wall s | tokens/s | vs full |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['keep_ratio']:g} | {row['held_at_once']} | {row['seconds']:.0f} | {row['tokens_per_s']:.1f} | "
            f"{row['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x |"
        )
    args.out.write_text(json.dumps({"rows": rows, "loadavg": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
