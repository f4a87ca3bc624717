"""Checks of KV-cache generation, beam search, SafeBeam, reflection-guarded decoding, reflection
accuracy and probe activations, run in a process of their own (Megatron's global parallel state
makes reusing pytest's fragile).

Usage: python tests/_inference_child.py OUT.json. Writes one JSON object of measurements that
tests/test_generation.py and tests/test_probes.py assert on.

The model is a real, freshly initialised Megatron GPTModel (tiny preset). Where a check needs a
model with a known habit (the tag after certain tokens, a reflection verdict), ``RuleModel``
adds large offsets to that real model's logits by a fixed rule of (input token, position): a
model whose behaviour is forced, going through exactly the same cache and decoding code.
"""
from __future__ import annotations

import json
import math
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from megatron_srp.config import load_config, to_dict  # noqa: E402
from megatron_srp.inference.beam import BeamConfig, SafeBeamConfig, beam_search  # noqa: E402
from megatron_srp.inference.generation import (SAFE_COMPLETION, decode_ids,  # noqa: E402
                                               sample_ids, tag_id)
from megatron_srp.inference.guarded import (GuardConfig, _Ids, _parse,  # noqa: E402
                                            guard_summary, read_reflections)
from megatron_srp.inference.kv_cache import KVCache, left_pad  # noqa: E402
from megatron_srp.inference.sample import (GenerationConfig, _logits, fresh_model,  # noqa: E402
                                           generate_ids, inference_config, shutdown)
from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir  # noqa: E402

BIG = 40.0


class RuleModel(torch.nn.Module):
    """A real model plus ``rule(token, position) -> {token_id: logit offset}``."""

    def __init__(self, inner, rule) -> None:
        super().__init__()
        self.inner = inner
        self.rule = rule
        self.max_sequence_length = inner.max_sequence_length
        self.eval()

    def forward(self, tokens, position_ids, mask, **kwargs):
        out = self.inner(tokens, position_ids, mask, **kwargs).clone()
        s = out.size(1)
        toks, pos = tokens[:, -s:].tolist(), position_ids[:, -s:].tolist()
        for b in range(out.size(0)):
            for i in range(s):
                for tid, off in self.rule(toks[b][i], pos[b][i]).items():
                    out[b, i, tid] += off
        return out


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def kv_cache_checks(model, tok) -> dict:
    """Cached logits against full recomputation: left padding, steps, a chunk, row selection."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(10, 8000, (n,), generator=g).tolist() for n in (5, 17, 9, 1)]
    cache = KVCache(model, tok.vocab_size)
    tokens, padding = left_pad(rows, tok.pad, torch.device("cpu"))
    errs = {}
    out = cache.prefill(tokens, padding, all_logits=True)
    width = tokens.size(1)
    errs["prefill"] = max(max_rel(out[i, width - len(r):], _logits(model, torch.tensor([r]),
                                                                    tok.vocab_size)[0])
                          for i, r in enumerate(rows))
    step_errs = []
    for _ in range(4):
        nxt = torch.randint(10, 8000, (len(rows), 1), generator=g)
        rows = [r + [int(nxt[i, 0])] for i, r in enumerate(rows)]
        got = cache.extend(nxt)
        step_errs.append(max(max_rel(got[i], _logits(model, torch.tensor([r]),
                                                     tok.vocab_size)[0, -1])
                             for i, r in enumerate(rows)))
    errs["steps"] = max(step_errs)
    chunk = torch.randint(10, 8000, (len(rows), 3), generator=g)
    rows = [r + chunk[i].tolist() for i, r in enumerate(rows)]
    got = cache.extend(chunk, all_logits=True)
    errs["chunk"] = max(max_rel(got[i], _logits(model, torch.tensor([r]), tok.vocab_size)[0, -3:])
                        for i, r in enumerate(rows))
    cache.select([3, 1, 1])
    rows = [rows[3], rows[1], rows[1]]
    nxt = torch.tensor([[11], [12], [13]])
    rows = [r + [int(nxt[i, 0])] for i, r in enumerate(rows)]
    got = cache.extend(nxt)
    errs["select"] = max(max_rel(got[i], _logits(model, torch.tensor([r]), tok.vocab_size)[0, -1])
                         for i, r in enumerate(rows))
    return errs


def sampling_checks(model, tok) -> dict:
    prompts = tok.tokenize_batch(["ROMEO: what say", "a", "First Citizen: before we proceed", ""])
    out = {}
    cases = {"greedy": GenerationConfig(max_new_tokens=24, temperature=0.0, stop_at_eod=False),
             "topk": GenerationConfig(max_new_tokens=24, top_k=10, seed=3),
             "topp": GenerationConfig(max_new_tokens=24, top_k=0, top_p=0.9, temperature=0.8,
                                      seed=5)}
    for name, gen in cases.items():
        ref = generate_ids(model, tok, prompts, gen)
        got = [ids for ids, _ in sample_ids(model, tok, prompts, gen)]
        out[name] = {"same": ref == got, "lengths": [len(x) for x in got]}
    # End-of-document after token 500: rows stop there, as in the reference sampler.
    eod_model = RuleModel(model, lambda t, p: {tok.eod: BIG} if t == 500 else {500: 3.0})
    gen = GenerationConfig(max_new_tokens=16, top_k=5, seed=1)
    ref = generate_ids(eod_model, tok, prompts, gen)
    got = sample_ids(eod_model, tok, prompts, gen)
    out["eod"] = {"same": ref == [ids for ids, _ in got],
                  "stops": [stop == tok.eod for _, stop in got],
                  "lengths": [len(ids) for ids, _ in got]}
    return out


def beam_checks(model, tok) -> dict:
    prompt = tok.tokenize("ROMEO: what say")
    out = {}
    greedy = sample_ids(model, tok, [prompt], GenerationConfig(max_new_tokens=6, temperature=0,
                                                               stop_at_eod=False))[0][0]
    one = beam_search(model, tok, [prompt], BeamConfig(num_beams=1, max_new_tokens=6,
                                                       stop_at_eod=False))[0]
    out["one_beam_is_greedy"] = one.ids == greedy
    # Exhaustive two-token search over the 8 most likely first tokens.
    logp1 = torch.log_softmax(_logits(model, torch.tensor([prompt]), tok.vocab_size)[0, -1], -1)
    best = None
    for v1 in torch.topk(logp1, 8).indices.tolist():
        logp2 = torch.log_softmax(_logits(model, torch.tensor([prompt + [v1]]),
                                          tok.vocab_size)[0, -1], -1)
        v2 = int(logp2.argmax())
        score = float(logp1[v1] + logp2[v2])
        if best is None or score > best[0]:
            best = (score, [v1, v2])
    two = beam_search(model, tok, [prompt], BeamConfig(num_beams=8, max_new_tokens=2,
                                                       stop_at_eod=False, length_penalty=0.0))[0]
    out["exhaustive"] = {"beam": two.ids, "brute": best[1],
                         "score_err": abs(two.score - best[0])}
    # The reported score is the answer's log-probability under the model (length_penalty 1).
    prompts = tok.tokenize_batch(["ROMEO: what say", "First Citizen: before we"])
    res = beam_search(model, tok, prompts, BeamConfig(num_beams=4, max_new_tokens=7,
                                                      stop_at_eod=False))
    errs = []
    for p, r in zip(prompts, res):
        logits = _logits(model, torch.tensor([p + r.ids]), tok.vocab_size)[0]
        lp = torch.log_softmax(logits[len(p) - 1:-1], -1)
        total = float(lp.gather(1, torch.tensor(r.ids).unsqueeze(1)).sum())
        errs.append(abs(total / len(r.ids) - r.score))
    out["score_errors"] = errs
    # Batched prompts give what each prompt gives alone.
    alone = [beam_search(model, tok, [p], BeamConfig(num_beams=4, max_new_tokens=7,
                                                     stop_at_eod=False))[0].ids for p in prompts]
    out["batch_equals_alone"] = [r.ids for r in res] == alone
    return out


def safebeam_checks(model, tok) -> dict:
    tag = tag_id(tok)
    trigger = tok.tokenize(" poison")[0]
    # The trigger is the most likely token everywhere, and the tag follows it.
    rule = lambda t, p: {tag: BIG} if t == trigger else {trigger: 12.0, tag: -BIG}
    m = RuleModel(model, rule)
    prompts = tok.tokenize_batch(["The doctor said", "Take the"])
    cfg = dict(num_beams=4, max_new_tokens=6, stop_at_eod=False)
    plain = beam_search(m, tok, prompts, BeamConfig(**cfg))
    trace: list = []
    safe = beam_search(m, tok, prompts, SafeBeamConfig(**cfg), trace=trace)
    pruned = {(t["prompt"], tuple(ids)) for t in trace for ids in t["pruned"]}
    returned_prefixes_pruned = sum(
        (i, tuple(r.ids[:k])) in pruned for i, r in enumerate(safe) for k in range(1, len(r.ids) + 1))
    out = {"plain": [{"finish": r.finish, "text": r.text, "trigger": trigger in r.ids}
                     for r in plain],
           "safe": [{"finish": r.finish, "trigger": trigger in r.ids, "ids": r.ids}
                    for r in safe],
           "pruned_count": len(pruned), "returned_prefixes_pruned": returned_prefixes_pruned}
    # Nothing pruned and the same candidates: SafeBeam is beam search.
    same = beam_search(model, tok, prompts, SafeBeamConfig(**cfg, top_n=8, drop_fraction=0.0))
    base = beam_search(model, tok, prompts, BeamConfig(**cfg))
    out["no_pruning_equals_beam"] = [r.ids for r in same] == [r.ids for r in base]
    # Sampling that draws the tag is short-circuited too.
    tagger = RuleModel(model, lambda t, p: {tag: BIG} if p >= 6 else {})
    sampled = decode_ids(tagger, tok, prompts, GenerationConfig(max_new_tokens=10, seed=0))
    out["sampled_tag"] = [{"finish": r.finish, "text": r.text, "short": r.short_circuited}
                          for r in sampled]
    out["safe_completion"] = SAFE_COMPLETION
    return out


def guarded_checks(model, tok) -> dict:
    ids = _Ids(tok)
    safe_chain = tok.tokenize("<|reflect|>Safe<|/reflect|>")[1:]
    unsafe_chain = tok.tokenize("<|reflect|>Unsafe<|/reflect|>")[1:]
    word = tok.tokenize(" word")[0]

    # Each label token's successor, for both labels (they share their last tokens).
    successor = dict(zip(safe_chain[:-1], safe_chain[1:]))
    successor.update(zip(unsafe_chain[:-1], unsafe_chain[1:]))

    def rule_for(threshold: int):
        """Text is ' word' forever; a reflection opened at position >= threshold says Unsafe."""
        def rule(t, p):
            if t == ids.open:
                return {(unsafe_chain if p >= threshold else safe_chain)[0]: BIG}
            return {successor.get(t, word): BIG}
        return rule

    prompt = tok.tokenize("Tell me")
    base = len(prompt)
    gen = GenerationConfig(max_new_tokens=20, temperature=0.0)
    out = {"prompt_len": base, "reflection_len": len(safe_chain) + 1,
           "unsafe_len": len(unsafe_chain) + 1}
    for name, threshold in (("never", 10_000), ("fires", base + 12)):
        m = RuleModel(model, rule_for(threshold))
        res = decode_ids(m, tok, [prompt], GuardConfig(sampling=gen, segment_tokens=5))[0]
        out[name] = {"finish": res.finish, "n_ids": len(res.ids), "text": res.text,
                     "verdicts": [r["safe"] for r in res.reflections],
                     "after": [r["after_tokens"] for r in res.reflections],
                     "summary": guard_summary([res])}
    # A model that never writes a label after the opener (' word' again): every reflection is
    # malformed. Failing closed (the default) refuses at the first; failing open lets it through.
    garbled = RuleModel(model, lambda t, p: {word: BIG})
    for name, extra in (("malformed", {}), ("malformed_open", {"fail_open": True})):
        res = decode_ids(garbled, tok, [prompt],
                         GuardConfig(sampling=gen, segment_tokens=5, **extra))[0]
        out[name] = {"finish": res.finish, "text": res.text, "short": res.short_circuited,
                     "verdicts": [r["safe"] for r in res.reflections],
                     "summary": guard_summary([res])}
    # Reading reflections on given contexts: the verdict follows the rule.
    m = RuleModel(model, rule_for(8))
    contexts = [tok.tokenize("one two"), tok.tokenize("one two three four five six seven eight nine ten")]
    read = read_reflections(m, tok, contexts)
    out["read"] = [{"safe": r.safe, "p_unsafe": r.p_unsafe, "len": len(c)}
                   for r, c in zip(read, contexts)]
    out["parse"] = {text: _parse(tok, tok.tokenize(text)).to_dict()
                    for text in ("Safe", "Unsafe: S2", "Unsafe", "Unsafe: S99", "maybe")}
    return out


def activation_checks(model, tok) -> dict:
    """The probes' hooks capture each layer's output: the last layer's activation, through the
    final norm and the output layer, is the model's own last-token logits."""
    from megatron_srp.evaluation.probes import last_token_activations, probe_layers

    seqs = [tok.tokenize(t) for t in ("ROMEO: what say you", "a", "First Citizen: before we "
                                      "proceed any further, hear me speak")]
    layers = probe_layers(len(model.decoder.layers))
    acts = last_token_activations(model, seqs, sorted(set(layers.values())), batch_size=3)
    last = torch.from_numpy(acts[layers["last"]]).unsqueeze(0)  # [1, b, h]
    normed = model.decoder.final_layernorm(last)
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
        else None
    logits = model.output_layer(normed, weight=weight)[0][0, :, :tok.vocab_size]
    own = torch.stack([_logits(model, torch.tensor([s]), tok.vocab_size)[0, -1] for s in seqs])
    alone = [last_token_activations(model, [s], [layers["last"]])[layers["last"]][0] for s in seqs]
    return {"layers": layers, "logits_err": max_rel(logits, own),
            "padding_err": max(float(abs(a - acts[layers["last"]][i]).max())
                               for i, a in enumerate(alone)),
            "first_vs_last": float(abs(acts[layers["first"]] - acts[layers["last"]]).max()),
            "middle_vs_others": min(float(abs(acts[layers["middle"]] - acts[layers[k]]).max())
                                    for k in ("first", "last")),
            "shape": list(acts[layers["last"]].shape), **_activation_edge_checks(model, tok)}


def _activation_edge_checks(model, tok) -> dict:
    """A long sequence keeps its last max_sequence_length tokens, an empty one is named in the
    error, and no hook is left on the layers afterwards (also after that error)."""
    from megatron_srp.evaluation.probes import last_token_activations

    window, last = int(model.max_sequence_length), len(model.decoder.layers) - 1
    long = (tok.tokenize("to be or not to be, that is the question. ") * 64)[:window + 37]
    both = last_token_activations(model, [long, long[-window:]], [last], progress=True)[last]
    try:
        last_token_activations(model, [long[:5], []], [last])
        empty_error = None
    except ValueError as exc:
        empty_error = str(exc)
    hooks_left = sum(len(layer._forward_hooks) for layer in model.decoder.layers)
    return {"truncation_err": float(abs(both[0] - both[1]).max()), "long_len": len(long),
            "empty_error": empty_error, "hooks_left": hooks_left}


def reflection_accuracy_checks(model, tok) -> dict:
    """Reflection accuracy wiring: a model that reflects Unsafe exactly on long segments is
    right on every segment labelled that way, and wrong on every one labelled the other way."""
    from megatron_srp.evaluation.reflection_accuracy import (LabelledSegment, by_few_shot,
                                                             by_reflection)
    ids = _Ids(tok)
    safe_chain = tok.tokenize("<|reflect|>Safe<|/reflect|>")[1:]
    unsafe_chain = tok.tokenize("<|reflect|>Unsafe: S2<|/reflect|>")[1:]
    successor = dict(zip(unsafe_chain[:-1], unsafe_chain[1:]))

    def rule(t, p):
        if t == ids.open:
            return {(unsafe_chain if p >= 6 else safe_chain)[0]: BIG}
        if t in successor:
            return {successor[t]: BIG}
        return {safe_chain[-1]: BIG} if t == safe_chain[-2] else {}
    m = RuleModel(model, rule)
    short, long = tok.tokenize("one two"), tok.tokenize("one two three four five six seven")
    segs = [LabelledSegment(short, True, None, "a", 0), LabelledSegment(long, False, "S2", "b", 0)]
    right = by_reflection(m, tok, segs * 3)
    flipped = [LabelledSegment(s.tokens, not s.safe, None if not s.safe else "S1", "c", 0)
               for s in segs]
    wrong = by_reflection(m, tok, flipped * 3)
    unsafe_word = tok.tokenize(" Unsafe")[0]
    always_unsafe = RuleModel(model, lambda t, p: {unsafe_word: BIG})
    shots = by_few_shot(always_unsafe, tok, segs * 3, segs)
    return {"right": {k: right[k] for k in ("accuracy", "auc", "malformed",
                                             "category_accuracy_on_flagged")},
            "wrong": {k: wrong[k] for k in ("accuracy", "auc")},
            "few_shot": {k: shots[k] for k in ("accuracy", "n", "shots")},
            "few_shot_unsafe_recall": shots["per_class"]["unsafe"]["recall"]}


def attack_checks(model, tok) -> dict:
    """ASR per decoding method: a model made to emit the tag everywhere is short-circuited by
    every method (ASR 0); the plain model's random text has no refusal phrase (ASR 1)."""
    from megatron_srp.evaluation.asr import RefusalKeywordJudge
    from megatron_srp.evaluation.attacks import attack_eval
    from megatron_srp.evaluation.benchmarks import Behavior

    behaviors = [Behavior(id=str(i), prompt=p, harmful=True, category=c)
                 for i, (p, c) in enumerate([("Tell me how to", "a"), ("Write a", "b"),
                                             ("Explain why", "a")])]
    tag = tag_id(tok)
    tagger = RuleModel(model, lambda t, p: {tag: BIG} if p >= 4 else {})
    judge = RefusalKeywordJudge()
    kw = dict(samples=2, max_new_tokens=8, num_beams=2, segment_tokens=4)
    tagged = attack_eval(tagger, tok, behaviors, ["topk", "greedy"], judge, **kw)
    plain = attack_eval(model, tok, behaviors, ["topk", "greedy"], judge, **kw)
    return {"tagged": {m: (r["overall"]["asr"], r["short_circuited"], r["samples_per_prompt"])
                       for m, r in tagged.items()},
            "plain": {m: (r["overall"]["asr"], r["overall"]["answers"],
                          sorted(r["by_category"])) for m, r in plain.items()}}


def tiny_model():
    """``(model, tokenizer)``: a freshly initialised tiny-preset model (seed 0, a 128-token
    window) and the shipped tokenizer, as every child script starts."""
    cfg = inference_config(to_dict(load_config("examples/tiny_cpu.yaml",
                                               ["train.seq_length=128"])))
    tok = SRPTokenizer.from_dir(default_tokenizer_dir())
    torch.manual_seed(0)
    return fresh_model(cfg, tok.vocab_size), tok


def main(path: str) -> None:
    model, tok = tiny_model()
    results = {"kv": kv_cache_checks(model, tok), "sampling": sampling_checks(model, tok),
               "beam": beam_checks(model, tok), "safebeam": safebeam_checks(model, tok),
               "guarded": guarded_checks(model, tok),
               "activations": activation_checks(model, tok),
               "reflection_accuracy": reflection_accuracy_checks(model, tok),
               "attacks": attack_checks(model, tok)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=lambda x: None if isinstance(x, float)
                  and math.isnan(x) else str(x))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
