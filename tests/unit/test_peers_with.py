"""benchmarks/peers_with.py: the engine arguments it adds reach every LLM() a peers script makes
(over the script's own), and each RESULT line names them, so an A/B of a default is what it says."""
import builtins
import importlib.util
import json
import pathlib

import pytest

import pagedserve
import pagedserve.llm

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("peers_with", ROOT / "benchmarks" / "peers_with.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Recorded:
    built = []

    def __init__(self, args, offline=False):
        self.built.append(args)

    def shutdown(self):
        pass


def test_parse_kwargs_reads_literals_and_names_bad_items() -> None:
    peers_with = _load()
    assert peers_with.parse_kwargs(["max_num_batched_tokens=16384", "enforce_eager=True", "dtype=float16",
                                    "gpu_memory_utilization=0.5"]) == dict(
        max_num_batched_tokens=16384, enforce_eager=True, dtype="float16", gpu_memory_utilization=0.5)
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        peers_with.parse_kwargs(["16384"])


def test_a_script_run_through_it_gets_the_arguments(monkeypatch, tmp_path, capsys) -> None:
    peers_with = _load()
    monkeypatch.setattr(pagedserve.LLM, "__init__", pagedserve.LLM.__init__)   # restored after the test
    monkeypatch.setattr(builtins, "print", builtins.print)
    monkeypatch.setattr(pagedserve.llm, "LLMEngine", _Recorded)
    _Recorded.built = []
    script = tmp_path / "peer.py"
    script.write_text("import json, sys\n"
                      "from pagedserve import LLM\n"
                      "LLM(model='m', max_num_batched_tokens=8192, max_model_len=64)\n"
                      "print('RESULT ' + json.dumps(dict(workload='x', argv=sys.argv[1:])))\n"
                      "print('not a result')\n")
    peers_with.main(["max_num_batched_tokens=16384", "--", str(script), "pagedserve", "llama-8b"])
    (args,) = _Recorded.built
    assert (args.model, args.max_num_batched_tokens, args.max_model_len) == ("m", 16384, 64)
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[0][len("RESULT "):]) == dict(workload="x", argv=["pagedserve", "llama-8b"],
                                                         engine_kwargs=dict(max_num_batched_tokens=16384))
    assert lines[1] == "not a result"
