"""LLM() collects once and freezes start-up's objects (no full collection walks them during
generate) and gives the freeze back at shutdown, whether shutdown() is called or the LLM is
dropped; an application's own freeze is left alone."""
from __future__ import annotations

import gc
import weakref

from pagedserve import LLM, SamplingParams


def _llm(tiny_checkpoints) -> LLM:
    return LLM(model=tiny_checkpoints["llama"], device="cpu", dtype="float32", max_model_len=64,
               skip_tokenizer_init=True, num_kv_blocks=32)


def _generate(llm: LLM) -> list[int]:
    (out,) = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, temperature=0.0,
                                                                           ignore_eos=True), use_tqdm=False)
    return list(out.outputs[0].token_ids)


def test_startup_objects_frozen_until_shutdown(tiny_checkpoints):
    gc.unfreeze()   # another test's LLM may own a freeze: it only unfreezes again at its shutdown
    llm = _llm(tiny_checkpoints)
    frozen = gc.get_freeze_count()
    assert frozen > 1000   # the engine's objects (and everything alive before it)
    assert len(_generate(llm)) == 3
    assert gc.get_freeze_count() <= frozen   # generate froze nothing more (frozen objects may die)
    llm.shutdown()
    assert gc.get_freeze_count() == 0
    llm.shutdown()   # idempotent: nothing unfrozen twice
    assert gc.get_freeze_count() == 0


def test_a_dropped_llm_unfreezes_and_its_engine_is_collected(tiny_checkpoints):
    gc.unfreeze()
    llm = _llm(tiny_checkpoints)
    assert gc.get_freeze_count() > 0
    engine = weakref.ref(llm.engine)
    _generate(llm)
    del llm
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert engine() is None


def test_an_application_freeze_is_left_alone(tiny_checkpoints):
    gc.unfreeze()
    gc.freeze()   # the application's own, before the LLM
    try:
        before = gc.get_freeze_count()
        assert before > 0
        llm = _llm(tiny_checkpoints)
        assert gc.get_freeze_count() <= before   # not ours to extend
        _generate(llm)
        llm.shutdown()
        assert 0 < gc.get_freeze_count() <= before   # nor to undo
    finally:
        gc.unfreeze()
