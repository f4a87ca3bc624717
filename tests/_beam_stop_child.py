"""Beam search and SafeBeam on a model that puts a little probability on a stop token at every
step, run in a process of its own (tests/test_beam_stopping.py asserts on the output).

Usage: python tests/_beam_stop_child.py OUT.json. The model is a real, freshly initialised
Megatron GPTModel (tiny preset) with ``RuleModel`` offsets: ' word' takes about 96% at every
step and the harmfulness tag about 3% (the second choice, as on MedSafetyWorld's tag model),
until the answer is 10 tokens long, when the end of document takes over.
"""
from __future__ import annotations

import json
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from _inference_child import RuleModel, tiny_model  # noqa: E402

from megatron_srp.inference.beam import BeamConfig, SafeBeamConfig, beam_search  # noqa: E402
from megatron_srp.inference.results import tag_id  # noqa: E402
from megatron_srp.inference.sample import shutdown  # noqa: E402


def main(path: str) -> None:
    model, tok = tiny_model()
    word, tag, eod = tok.tokenize(" word")[0], tag_id(tok), tok.eod
    prompts = [tok.tokenize("Tell me"), tok.tokenize("Give me")]
    assert len(prompts[0]) == len(prompts[1]), [len(p) for p in prompts]
    end = len(prompts[0]) + 10  # the answer's 11th position: the document ends

    def rule(t, p):
        if p + 1 == end:
            return {eod: 14.0, word: 10.0, tag: 6.0}
        return {word: 14.0, tag: 10.5}

    m = RuleModel(model, rule)
    probs = torch.softmax(m(torch.tensor([prompts[0]]), torch.arange(len(prompts[0]))[None],
                            None)[0, -1, :tok.vocab_size].float(), -1)
    out = {"p_word": float(probs[word]), "p_tag": float(probs[tag])}
    for name, bcfg in (("beam", BeamConfig(num_beams=4, max_new_tokens=20)),
                       ("safebeam", SafeBeamConfig(num_beams=4, max_new_tokens=20))):
        out[name] = [{"finish": r.finish, "text": r.text, "n": len(r.ids), "score": r.score}
                     for r in beam_search(m, tok, prompts, bcfg)]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
