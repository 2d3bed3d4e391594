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


def test_generate_runs_without_a_gen0_collection_each_step_and_restores_the_threshold(tiny_checkpoints):
    """frontend/gc_policy.py: generate adds its requests and runs its loop at HOT_GEN0_THRESHOLD;
    the application's thresholds come back after (also when a step raises), and a higher one of
    its own stays."""
    from pagedserve.frontend.gc_policy import HOT_GEN0_THRESHOLD, hot_loop_collector
    before = gc.get_threshold()
    llm = _llm(tiny_checkpoints)
    seen, added = [], []
    step, add_request = llm.engine.step, llm.engine.add_request

    def recording_step():
        seen.append(gc.get_threshold())
        return step()

    def recording_add(*args, **kwargs):
        added.append(gc.get_threshold())
        return add_request(*args, **kwargs)

    llm.engine.step, llm.engine.add_request = recording_step, recording_add
    try:
        assert len(_generate(llm)) == 3
        assert seen and all(t == (HOT_GEN0_THRESHOLD, *before[1:]) for t in seen), seen
        assert added == [(HOT_GEN0_THRESHOLD, *before[1:])], added   # its one request
        assert gc.get_threshold() == before

        def failing_step():
            raise RuntimeError("step failed")

        llm.engine.step = failing_step
        try:
            _generate(llm)
        except RuntimeError:
            pass
        assert gc.get_threshold() == before
        gc.set_threshold(100_000, *before[1:])   # the application's own, higher: left alone
        with hot_loop_collector():
            assert gc.get_threshold()[0] == 100_000
        gc.set_threshold(0, *before[1:])   # collection off by threshold: stays off
        with hot_loop_collector():
            assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)
        llm.shutdown()


def test_generate_waits_for_its_own_requests_only(tiny_checkpoints):
    """A request added to llm.engine directly, finishing during generate, is neither counted as
    one of generate's nor returned (they counted before: a KeyError once enough had finished)."""
    llm = _llm(tiny_checkpoints)
    try:
        for other in ("a", "b"):   # as many as generate's, done first: the loop used to stop on them
            llm.engine.add_request(other, {"prompt_token_ids": [9, 8]}, SamplingParams(max_tokens=1, ignore_eos=True))
        outs = llm.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [1, 2]}],
                            SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]
        assert [o.prompt_token_ids for o in outs] == [[5, 6, 7], [1, 2]]
    finally:
        llm.shutdown()
