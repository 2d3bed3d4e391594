"""AsyncEngine's failure model on a scripted stand-in for LLMEngine (no model): a failing
request fails alone, a dead loop fails everyone (and /health answers 503 over real HTTP),
validation errors reach the caller, an idle loop does not step (and trims the C heap once
after a burst)."""
from __future__ import annotations

import asyncio
import threading
import time
import pytest
import requests

from pagedserve.core.outputs import EngineStats
from pagedserve.errors import EngineDeadError, RequestFailedError, ValidationError
from pagedserve.frontend.async_engine import AsyncEngine
from pagedserve.frontend.structured_output import GrammarCompiler
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams
from tests.server.conftest import free_port


class ScriptedEngine:
    """LLMEngine's surface as AsyncEngine uses it. Prompt "bad" fails in the engine,
    "invalid" fails validation, "die" makes step() raise; others finish after one step."""

    max_model_len = 128
    max_num_seqs = 8
    tokenizer = None
    engine_process = False
    step_spans: list = []   # no core steps to time
    grammar_compiler = GrammarCompiler(None, 0, ())   # no tokenizer: no grammars

    def __init__(self) -> None:
        self.pending: dict[str, str] = {}
        self.num_steps = 0

    def add_finish_listener(self, listener) -> None:
        pass

    def add_first_token_listener(self, listener) -> None:
        pass

    def has_work(self) -> bool:
        return bool(self.pending)

    def stats(self) -> EngineStats:
        return EngineStats()

    def add_request(self, request_id, prompt, params, output_kind, strict_length, add_special_tokens) -> None:
        self.add_processed(self.process_request(request_id, prompt, params, output_kind, strict_length,
                                                add_special_tokens))

    def process_request(self, request_id, prompt, params, output_kind, strict_length, add_special_tokens, priority=0,
                        lora_request=None, grammar=None):
        if prompt == "invalid":
            raise ValidationError("prompt is invalid", "prompt")
        return request_id, prompt

    def add_processed(self, processed) -> None:
        request_id, prompt = processed
        self.pending[request_id] = prompt

    def is_alive(self) -> bool:
        return True

    def step_with_stats(self) -> tuple[list[RequestOutput], EngineStats]:
        self.num_steps += 1
        if "die" in self.pending.values():
            raise RuntimeError("device lost")
        outputs = []
        for request_id, prompt in self.pending.items():
            reason = "abort" if prompt == "bad" else "length"
            outputs.append(RequestOutput(request_id, prompt, [1, 2], [CompletionOutput(0, "ok", [3], None, None,
                                                                                       reason)], True,
                                         error="RuntimeError: bad row" if prompt == "bad" else None))
        self.pending.clear()
        return outputs, EngineStats()

    def abort_request(self, request_id: str) -> None:
        self.pending.pop(request_id, None)

    def shutdown(self) -> None:
        pass


async def _collect(engine: AsyncEngine, prompt: str) -> list[RequestOutput]:
    return [output async for output in engine.generate(prompt, SamplingParams(), request_id=prompt)]


def test_failing_request_fails_alone() -> None:
    engine = AsyncEngine(ScriptedEngine())

    async def main():
        return await asyncio.wait_for(asyncio.gather(_collect(engine, "good"), _collect(engine, "bad"),
                                                     return_exceptions=True), timeout=10)

    good, bad = asyncio.run(main())
    assert isinstance(bad, RequestFailedError) and "RuntimeError: bad row" in str(bad)
    assert good[-1].finished and good[-1].outputs[0].text == "ok"
    assert engine.is_healthy
    engine.shutdown()


def test_validation_error_reaches_caller() -> None:
    engine = AsyncEngine(ScriptedEngine())
    with pytest.raises(ValidationError) as info:
        asyncio.run(asyncio.wait_for(_collect(engine, "invalid"), timeout=10))
    assert info.value.param == "prompt" and engine.is_healthy
    engine.shutdown()


def test_dead_loop_fails_everyone() -> None:
    engine = AsyncEngine(ScriptedEngine())

    async def main():
        return await asyncio.wait_for(asyncio.gather(_collect(engine, "die"), _collect(engine, "other"),
                                                     return_exceptions=True), timeout=10)

    results = asyncio.run(main())
    assert all(isinstance(r, EngineDeadError) for r in results), results
    assert not engine.is_healthy
    with pytest.raises(EngineDeadError):   # later requests fail at once instead of hanging
        asyncio.run(asyncio.wait_for(_collect(engine, "later"), timeout=5))


def test_idle_loop_sleeps() -> None:
    scripted = ScriptedEngine()
    engine = AsyncEngine(scripted)
    asyncio.run(asyncio.wait_for(_collect(engine, "good"), timeout=10))
    steps = scripted.num_steps
    time.sleep(0.3)
    assert scripted.num_steps == steps == 1
    engine.shutdown()


def test_idle_loop_trims_the_heap_once_after_a_burst(monkeypatch) -> None:
    """IDLE_TRIM_S after its last step the engine thread calls release_free_heap once (not
    before the first step, not again while idle); the next burst arms it again."""
    from pagedserve.frontend import async_engine
    trims: list[int] = []
    monkeypatch.setattr(async_engine, "IDLE_TRIM_S", 0.1)
    monkeypatch.setattr(async_engine, "release_free_heap", lambda: trims.append(scripted.num_steps) or True)
    scripted = ScriptedEngine()
    engine = AsyncEngine(scripted)
    time.sleep(0.3)
    assert trims == []
    asyncio.run(asyncio.wait_for(_collect(engine, "good"), timeout=10))
    _wait_until(lambda: trims)   # (a busy machine may run the thread late: wait for it, bounded)
    time.sleep(0.3)   # idle for three more trim intervals: no second trim
    assert trims == [1] and scripted.num_steps == 1
    asyncio.run(asyncio.wait_for(_collect(engine, "again"), timeout=10))
    _wait_until(lambda: len(trims) > 1)
    time.sleep(0.3)
    assert trims == [1, 2]
    engine.shutdown()


def _wait_until(done, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_dead_engine_over_http_is_503() -> None:
    import uvicorn

    from pagedserve.server.app import build_app
    from pagedserve.server.context import ServerSettings

    engine = AsyncEngine(ScriptedEngine())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(engine, ServerSettings("scripted")), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert requests.get(f"{base}/health", timeout=5).status_code == 200
        for prompt in ("die", "after death"):
            response = requests.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=10)
            assert response.status_code == 503
            assert response.json()["error"]["type"] == "EngineDeadError"
        health = requests.get(f"{base}/health", timeout=5)
        assert health.status_code == 503 and health.json()["error"]["code"] == 503
    finally:
        server.should_exit = True
        thread.join(timeout=10)
