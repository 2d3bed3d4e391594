"""`pagedserve run-batch` (vLLM's): an OpenAI batch file through the server's routes in one process:
results in the input's order with their custom_id; a completion equals the offline engine's; a
bad body is its route's 400 naming the field; lines that are not requests get an error."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pagedserve import LLM, SamplingParams

PROMPT = "The capital of France is"
ARGS = ["--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "128"]


def test_run_batch_file(tmp_path) -> None:
    lines = [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}],
                  "max_tokens": 5, "temperature": 0}},
        {"custom_id": "completion", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}},
        {"custom_id": "bad", "method": "POST", "url": "/v1/completions", "body": {"prompt": PROMPT, "max_tokens": -1}},
        {"custom_id": "stream", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "stream": True}},
        {"custom_id": "nowhere", "method": "POST", "url": "/v1/nothing", "body": {}},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n")
    result = subprocess.run([sys.executable, "-m", "pagedserve.cli", "run-batch", "-i", str(source), "-o",
                             str(tmp_path / "out.jsonl"), *ARGS], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["chat", "completion", "bad", "stream", "nowhere", None]
    chat, completion, bad, stream, nowhere, broken = out
    assert chat["response"]["status_code"] == 200 and chat["error"] is None
    assert chat["response"]["body"]["object"] == "chat.completion"
    llm = LLM(dtype="float32", max_model_len=512, num_kv_blocks=128)
    try:
        want = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0].outputs[0].text
    finally:
        llm.shutdown()
    assert completion["response"]["body"]["choices"][0]["text"] == want
    assert bad["response"]["status_code"] == 400 and bad["response"]["body"]["error"]["param"] == "max_tokens"
    assert stream["response"] is None and "stream" in stream["error"]["message"]
    assert nowhere["response"]["status_code"] == 404
    assert broken["response"] is None and broken["error"]["code"] == "invalid_request"
