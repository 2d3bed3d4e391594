"""`pagedserve serve --num-scheduler-steps 4` (decode windows) over real HTTP with the openai
client: the same greedy text as the offline engine at one step a schedule, streamed in chunks
of up to 4 tokens, stop strings and stop tokens ending requests inside a window, while other
streams run beside it."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from pagedserve import SamplingParams
from tests.server.conftest import serving

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "My favourite colour is"]


@pytest.fixture(scope="module")
def window_server(tmp_path_factory):
    yield from serving(tmp_path_factory, "window_server", "--dtype", "float32", "--num-scheduler-steps", "4")


def test_windowed_server_streams_the_offline_tokens(window_server, offline_llm) -> None:
    client = openai.OpenAI(base_url=f"{window_server.base_url}/v1", api_key="unused", timeout=60, max_retries=0)
    expected = [o.outputs[0] for o in offline_llm.generate(
        PROMPTS, SamplingParams(max_tokens=22, temperature=0.0, ignore_eos=True), use_tqdm=False)]
    stop_text = offline_llm.get_tokenizer().decode(expected[0].token_ids[9:11])

    def stream(prompt: str) -> list:
        return list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=22, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True}))

    with ThreadPoolExecutor(len(PROMPTS)) as pool:   # four streams at once: windows of 4 rows
        streams = list(pool.map(stream, PROMPTS))
        stopped = pool.submit(client.completions.create, model=MODEL, prompt=PROMPTS[0], max_tokens=22,
                              temperature=0, stop=[stop_text]).result()
    for chunks, out in zip(streams, expected):
        assert "".join(c.choices[0].text for c in chunks) == out.text
        assert chunks[-1].choices[0].finish_reason == "length"
        assert len(chunks) < len(out.token_ids)   # some chunks carry a window's several tokens
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == offline_llm.get_tokenizer().decode(expected[0].token_ids[:9])
