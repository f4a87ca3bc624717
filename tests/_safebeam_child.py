"""SafeBeam's drop rules on a real Megatron model, run in a process of their own (Megatron's
global parallel state makes reusing pytest's fragile).

Usage: python tests/_safebeam_child.py OUT.json. Writes one JSON object of measurements that
tests/test_safebeam.py asserts on.

The model is a freshly initialised Megatron GPTModel (tiny preset, as in
tests/_inference_child.py): it never learned the harmfulness tag, whose next-token probability
is about one over the vocabulary everywhere. For a model that puts the tag after some contexts
and not others, the tag's row of the (shared) output weight is set to a multiple of a random
direction: the tag's logit then follows each context's final hidden state along it, high
after some candidates and low after others.
"""
from __future__ import annotations

import json
import math
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from _inference_child import tiny_model  # noqa: E402

from megatron_srp.inference.beam import BeamConfig, SafeBeamConfig, beam_search  # noqa: E402
from megatron_srp.inference.results import tag_id  # noqa: E402
from megatron_srp.inference.sample import _logits, shutdown  # noqa: E402

PROMPTS = ["The doctor said", "ROMEO: what say", "How do I", "First Citizen: before we"]


def _answers(results) -> list[dict]:
    return [{"ids": r.ids, "score": r.score, "finish": r.finish} for r in results]


def _trace(trace: list) -> list[dict]:
    return [{k: t[k] for k in ("prompt", "step", "rule", "tag_probs", "logps", "pruned_ranks",
                               "kept_over")} | {"n": len(t["candidates"])} for t in trace]


def untagged_checks(model, tok) -> dict:
    """A model without a learned tag: plain beam search, SafeBeam by threshold and by fraction
    on the same candidates (``top_n = 2 num_beams``: every beam proposes what beam search
    considers), and at the default ``top_n`` against SafeBeam that drops nothing."""
    prompts = tok.tokenize_batch(PROMPTS)
    base = dict(num_beams=4, max_new_tokens=8)
    wide = dict(base, top_n=2 * base["num_beams"])
    out = {"beam": _answers(beam_search(model, tok, prompts, BeamConfig(**base)))}
    for name, cfg in (("threshold", SafeBeamConfig(**wide)),
                      ("fraction", SafeBeamConfig(**wide, rule="fraction")),
                      ("default", SafeBeamConfig(**base)),
                      ("no_drop", SafeBeamConfig(**base, rule="fraction", drop_fraction=0.0)),
                      ("relative", SafeBeamConfig(**wide, tag_threshold=None,
                                                  tag_relative=1e-3))):
        trace: list = []
        out[name] = {"answers": _answers(beam_search(model, tok, prompts, cfg, trace=trace)),
                     "trace": _trace(trace)}
    # Every candidate over the threshold: the num_beams least tagged go on.
    trace = []
    beam_search(model, tok, prompts[:2], SafeBeamConfig(num_beams=3, max_new_tokens=4,
                                                        tag_threshold=0.0), trace=trace)
    out["all_over"] = {"trace": _trace(trace), "num_beams": 3}
    return out


def _reference(model, tok, prompt: list[int], candidates: list[list[int]]) -> tuple:
    """Each candidate's summed log-probability and look-ahead tag probability, recomputed
    without the cache (candidates of one step have one length: one forward pass)."""
    rows = torch.tensor([prompt + c for c in candidates])
    logp = torch.log_softmax(_logits(model, rows, tok.vocab_size).double(), -1)
    n = len(candidates[0])
    new = rows[:, len(prompt):]
    logps = logp[:, len(prompt) - 1:-1].gather(2, new.unsqueeze(2)).squeeze(2).sum(1)
    return logps.tolist(), logp[:, -1, tag_id(tok)].exp().tolist(), n


def _bias_tag(model, tok, alpha: float) -> torch.Tensor:
    """Set the tag's row of the output weight to ``alpha`` times a fixed random unit vector;
    return the old row. The tag's logit after a token is then ``alpha`` times the final hidden
    state's component along that vector: large after some tokens, small after most."""
    weight = model.shared_embedding_or_output_weight()
    direction = torch.randn(weight.size(1), generator=torch.Generator().manual_seed(0))
    old = weight.data[tag_id(tok)].clone()
    weight.data[tag_id(tok)] = alpha * direction / direction.norm()
    return old


def tagged_checks(model, tok) -> dict:
    """A model whose tag is likely after some candidates: each rule's trace, next to every
    candidate's log-probability and tag probability recomputed without the cache."""
    prompts = tok.tokenize_batch(PROMPTS)
    old = _bias_tag(model, tok, alpha=6.0)
    out = {}
    try:
        base = dict(num_beams=3, top_n=3, max_new_tokens=6)
        cfgs = {"threshold": SafeBeamConfig(**base),
                "low": SafeBeamConfig(**base, tag_threshold=0.02),
                "relative": SafeBeamConfig(**base, tag_threshold=None, tag_relative=1e-3)}
        for name, cfg in cfgs.items():
            trace: list = []
            results = beam_search(model, tok, prompts, cfg, trace=trace)
            steps = []
            for t in trace:
                ref_logps, ref_tag, _ = _reference(model, tok, prompts[t["prompt"]],
                                                   t["candidates"])
                steps.append({**_trace([t])[0], "ref_logps": ref_logps, "ref_tag": ref_tag,
                              "ends": [c[-1] in (tag_id(tok), tok.eod)
                                       for c in t["candidates"]],
                              "pruned_ids": t["pruned"]})
            out[name] = {"steps": steps, "answers": _answers(results),
                         "threshold": cfg.tag_threshold, "relative": cfg.tag_relative}
    finally:
        model.shared_embedding_or_output_weight().data[tag_id(tok)] = old
    return out


def main(path: str) -> None:
    model, tok = tiny_model()
    model.eval()
    results = {"untagged": untagged_checks(model, tok), "tagged": tagged_checks(model, tok)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, default=lambda x: None if isinstance(x, float) and math.isnan(x)
                  else str(x))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
