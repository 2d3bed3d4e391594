"""32 concurrent streaming clients: all complete, each with exactly the offline engine's
greedy output for its prompt."""
from __future__ import annotations

import asyncio

import openai

from pagedserve import SamplingParams

NUM_CLIENTS = 32
MAX_TOKENS = 10
PROMPTS = [f"Fact number {i}: the most interesting thing about the number {i * 7 + 3} is" for i in range(NUM_CLIENTS)]


async def _stream_one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None]:
    stream = await client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=MAX_TOKENS,
                                             temperature=0, stream=True)
    text, finish_reason = [], None
    async for chunk in stream:
        text.append(chunk.choices[0].text)
        finish_reason = chunk.choices[0].finish_reason or finish_reason
    return "".join(text), finish_reason


async def _all(base_url: str) -> list[tuple[str, str | None]]:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=120, max_retries=0)
    try:
        return await asyncio.wait_for(asyncio.gather(*(_stream_one(client, p) for p in PROMPTS)), timeout=180)
    finally:
        await client.close()


def test_32_concurrent_streams_match_offline_greedy(server, offline_llm) -> None:
    results = asyncio.run(_all(server.base_url))
    reference = offline_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert len(results) == NUM_CLIENTS
    for (text, finish_reason), expected in zip(results, reference):
        assert finish_reason == expected.outputs[0].finish_reason
        assert text == expected.outputs[0].text
