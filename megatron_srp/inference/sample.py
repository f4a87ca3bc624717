"""Load a trained checkpoint in one process and sample text from it.

This is the simple sampler: every new token recomputes the whole (causal) sequence, with no KV
cache. It is slow for long outputs but has no state to get wrong, which makes it the reference
that faster generation (KV cache, beam search, SafeBeam) is checked against. Those slot in
behind the same :class:`GenerationConfig` and :func:`generate` signature.

    model, tokenizer, cfg = load_for_inference("runs/tiny-cpu-demo")
    texts = generate(model, tokenizer, ["ROMEO:"], GenerationConfig(max_new_tokens=32))

A checkpoint of any TP/PP/VPP layout loads here as TP=1, PP=1 (the checkpoint format reshards),
into a single-process group that is created on first use (or the torchrun job's, if any).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_srp import compat
from megatron_srp.config import ExperimentConfig
from megatron_srp.tokenizer import SRPTokenizer
from megatron_srp.training import checkpoint as ckpt
from megatron_srp.training.checkpoint import CheckpointError

TOKENIZER_SUBDIR = "tokenizer"

# True when this module created the process group (and so may tear it down in shutdown()).
_OWNS_PROCESS_GROUP = False


@dataclass
class GenerationConfig:
    """How to continue each prompt.

    ``temperature`` 0 means greedy decoding (``top_k``, ``top_p`` and ``seed`` are then unused);
    ``top_k`` 0 and ``top_p`` 1.0 switch those filters off. With ``stop_at_eod`` a sequence
    ends at the end-of-document token, which is not part of the returned text.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 10
    top_p: float = 1.0
    seed: int = 0
    stop_at_eod: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


# --------------------------------------------------------------------------------------------
# Loading


def inference_config(run_config: dict) -> ExperimentConfig:
    """A run's saved config, laid out for one process: TP=1, PP=1, no virtual stages.

    Precision follows the device (fp32 on CPU; on a GPU bf16 unless the run was fp32; the
    checkpoint's tensors are cast on load), the layer spec is the local one (its attention
    handles the padding and KV-cache masks generation needs, and it saves and loads under
    Transformer Engine's key names, so TE-trained checkpoints load), and activation
    recomputation is off.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), run_config)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise CheckpointError(f"cannot rebuild the run's config from {ckpt.RUN_FILE}: "
                              f"{str(exc).splitlines()[0]}") from exc
    assert isinstance(cfg, ExperimentConfig)
    p = cfg.parallel
    p.tensor_model_parallel_size = 1
    p.pipeline_model_parallel_size = 1
    p.virtual_pipeline_model_parallel_size = None
    p.sequence_parallel = False
    has_cuda = compat.has_cuda()
    cfg.train.precision = "bf16" if has_cuda and cfg.train.precision != "fp32" else "fp32"
    cfg.model.layer_spec = "local"
    cfg.model.recompute = "none"
    return cfg


def _ensure_process_groups(cfg: ExperimentConfig) -> None:
    """A TP=1, PP=1 Megatron layout: in the torchrun job if there is one, else a job of one."""
    global _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state as mpu

    from megatron_srp.training import parallel

    if mpu.model_parallel_is_initialized():
        tp = mpu.get_tensor_model_parallel_world_size()
        pp = mpu.get_pipeline_model_parallel_world_size()
        if tp != 1 or pp != 1:
            raise RuntimeError(f"Megatron's parallel state is already initialised with TP={tp}, "
                               f"PP={pp}; inference needs TP=1, PP=1 (call "
                               f"megatron_srp.training.parallel.destroy() first)")
        return
    _OWNS_PROCESS_GROUP = not dist.is_initialized()
    parallel.initialize(cfg)


def shutdown() -> None:
    """Tear down the process group that loading created (no-op under torchrun)."""
    global _OWNS_PROCESS_GROUP
    if _OWNS_PROCESS_GROUP:
        from megatron_srp.training import parallel
        parallel.destroy()
        _OWNS_PROCESS_GROUP = False


def _build(cfg: ExperimentConfig, vocab_size: int):
    from megatron_srp.model.provider import build_model_chunks

    _ensure_process_groups(cfg)
    chunks = build_model_chunks(cfg, vocab_size, cfg.train.precision, compat.has_cuda())
    assert len(chunks) == 1, "TP=1, PP=1 builds one model chunk"
    return chunks[0].to(compat.device())


def fresh_model(cfg: ExperimentConfig, vocab_size: int):
    """The model a run with ``cfg`` starts from (its step-0 weights), in eval mode."""
    from megatron_srp.model.init import layout_invariant_init

    model = _build(cfg, vocab_size)
    shape = cfg.model.shape()
    layout_invariant_init([model], cfg.train.seed, shape.init_method_std, shape.num_layers,
                          compat.device())
    return model.eval()


def load_for_inference(checkpoint: str | os.PathLike):
    """``(model, tokenizer, cfg)`` for a run directory (its latest complete checkpoint) or one
    ``iter_N`` checkpoint. ``model`` is a Megatron ``GPTModel`` in eval mode holding the whole
    network; ``cfg`` is the run's config as laid out here (see :func:`inference_config`)."""
    path = ckpt.resolve_checkpoint(checkpoint)
    run = ckpt.read_run(path)
    if "config" not in run:
        raise CheckpointError(f"{path / ckpt.RUN_FILE} has no 'config' entry")
    tok_dir = path.parent / TOKENIZER_SUBDIR
    if not tok_dir.is_dir():
        raise CheckpointError(f"no tokenizer beside checkpoint {path}: expected {tok_dir}")
    tokenizer = SRPTokenizer.from_dir(tok_dir)
    recorded = (run.get("tokenizer") or {}).get("fingerprint")
    if recorded is not None and recorded != tokenizer.fingerprint:
        raise CheckpointError(f"tokenizer {tok_dir} (fingerprint {tokenizer.fingerprint}) is not "
                              f"the one checkpoint {path} was trained with ({recorded})")
    cfg = inference_config(run["config"])
    model = _build(cfg, tokenizer.vocab_size)
    ckpt.load_model_only(path, [model], cfg, tokenizer.vocab_size)
    return model.eval(), tokenizer, cfg


# --------------------------------------------------------------------------------------------
# Forward passes


def _context_length(model) -> int:
    return int(model.max_sequence_length)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 logits [b, s, vocab_size] for tokens [b, s] (positions 0..s-1, causal)."""
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    out = model(tokens, position_ids, None)
    # The output layer is padded to a multiple of 128 ids; those ids are not real tokens.
    return out[..., :vocab_size].float()


@torch.no_grad()
def perplexity(model, tokenizer: SRPTokenizer, text: str, max_tokens: Optional[int] = None,
               batch_size: int = 8) -> float:
    """exp(mean next-token loss) over ``text`` (its first ``max_tokens`` tokens), scored in
    windows of the model's sequence length that overlap by one token, so every token after the
    first is predicted exactly once."""
    ids = tokenizer.tokenize(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("perplexity needs a text of at least two tokens")
    window = _context_length(model)
    dev = _device_of(model)
    pieces = [ids[i:i + window + 1] for i in range(0, len(ids) - 1, window)]
    pieces = [p for p in pieces if len(p) >= 2]
    total, count = 0.0, 0
    full = [p for p in pieces if len(p) == window + 1]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[p] for p in pieces if len(p) != window + 1]
    for group in groups:
        batch = torch.tensor(group, dtype=torch.long, device=dev)
        logits = _logits(model, batch[:, :-1], tokenizer.vocab_size)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                              reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count)


# --------------------------------------------------------------------------------------------
# Sampling


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (rows of [b, v]).

    The most likely token always survives; ``top_k`` 0 and ``top_p`` 1.0 keep everything.
    """
    out = logits.clone()
    if top_k and top_k < out.size(-1):
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out[drop] = float("-inf")
    return out


def _row_generator(seed: int, row: int, device: torch.device) -> torch.Generator:
    # One stream per prompt: a prompt's sample does not depend on how many others share the batch.
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + row) % (2**63))


def _next_tokens(logits: torch.Tensor, gen: GenerationConfig,
                 generators: Sequence[torch.Generator], active: torch.Tensor) -> torch.Tensor:
    """One token id per row of fp32 logits [b, v]. Only ``active`` rows draw from their
    generator, so a row's samples do not depend on how long the other prompts are."""
    with compat.device_clean():
        greedy = torch.argmax(logits, dim=-1)
        if gen.temperature == 0:
            return greedy
        rows = torch.nonzero(active).flatten()
        if rows.numel() == 0:
            return greedy
        probs = torch.softmax(filter_logits(logits[rows] / gen.temperature, gen.top_k,
                                            gen.top_p), dim=-1)
        # Inverse-CDF sampling: one uniform number per row from the row's own stream, then
        # one batched search (a multinomial call per row costs far more).
        u = torch.stack([torch.rand((), generator=generators[i], device=logits.device)
                         for i in rows.tolist()])
        cdf = probs.cumsum(dim=-1)
        target = (u.clamp_min(1e-12) * cdf[:, -1]).unsqueeze(1)
        drawn = torch.searchsorted(cdf, target).squeeze(1).clamp(max=probs.size(-1) - 1)
        out = greedy.clone()
        out[rows] = drawn
        return out


def _decode_continuation(tokenizer: SRPTokenizer, prompt_ids: list[int],
                         new_ids: list[int]) -> str:
    """The text the new tokens add; decoded together with the prompt so that a character
    split across the boundary (byte-level BPE) comes out whole."""
    if not new_ids:
        return ""
    prefix = tokenizer.detokenize(prompt_ids)
    whole = tokenizer.detokenize(prompt_ids + new_ids)
    if prompt_ids and whole.startswith(prefix):
        return whole[len(prefix):]
    return tokenizer.detokenize(new_ids)


@torch.no_grad()
def generate(model, tokenizer: SRPTokenizer, prompts: list[str],
             gen: GenerationConfig) -> list[str]:
    """The continuation of each prompt (without the prompt), at most ``gen.max_new_tokens``
    tokens each; see :func:`generate_ids`."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    prompt_ids = tokenizer.tokenize_batch(list(prompts)) if prompts else []
    new_ids = generate_ids(model, tokenizer, prompt_ids, gen)
    return [_decode_continuation(tokenizer, p, n) for p, n in zip(prompt_ids, new_ids)]


@torch.no_grad()
def generate_ids(model, tokenizer: SRPTokenizer, prompt_ids: list[list[int]],
                 gen: GenerationConfig) -> list[list[int]]:
    """The new token ids for each prompt (the end-of-document token that stops a sequence is
    not included).

    Prompts of different lengths share one right-padded batch: at step ``t`` every row is real
    up to position ``t`` (prompt or generated tokens) and causal attention never looks past it,
    so padding cannot change a result. Only the last ``seq_length`` tokens are fed to the model.
    An empty prompt starts from the end-of-document token, i.e. at the start of a document.
    Row ``i`` samples from its own generator (seeded by ``gen.seed`` and ``i``).
    """
    if not prompt_ids:
        return []
    was_training = model.training
    model.eval()
    dev = _device_of(model)
    window = _context_length(model)
    eod = tokenizer.eod
    stop_ids = torch.tensor(sorted(tokenizer.stop_ids), device=dev)
    contexts = [list(ids) if len(ids) else [eod] for ids in prompt_ids]
    lengths = [len(c) for c in contexts]
    b, total = len(contexts), max(lengths) + gen.max_new_tokens
    tokens = torch.full((b, total), tokenizer.pad, dtype=torch.long, device=dev)
    for i, c in enumerate(contexts):
        tokens[i, :len(c)] = torch.tensor(c, dtype=torch.long)
    prompt_len = torch.tensor(lengths, device=dev)
    end = prompt_len + gen.max_new_tokens  # exclusive end of each row's output
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    eod_at = torch.full((b,), -1, dtype=torch.long, device=dev)
    generators = [_row_generator(gen.seed, i, dev) for i in range(b)]
    try:
        for t in range(min(lengths), total):
            active = (t >= prompt_len) & (t < end) & ~done
            if not bool(active.any()):
                if bool(((t >= end) | done).all()):
                    break
                continue  # every unfinished row is still inside its prompt
            start = max(0, t - window)
            logits = _logits(model, tokens[:, start:t], tokenizer.vocab_size)[:, -1, :]
            nxt = _next_tokens(logits, gen, generators, active)
            tokens[:, t] = torch.where(active, nxt, tokens[:, t])
            if gen.stop_at_eod:
                hit = active & torch.isin(nxt, stop_ids)
                eod_at = torch.where(hit, torch.full_like(eod_at, t), eod_at)
                done |= hit
    finally:
        model.train(was_training)
    stops = [int(e) if int(e) >= 0 else int(x) for e, x in zip(eod_at, end)]
    return [tokens[i, lengths[i]:stops[i]].tolist() for i in range(b)]
