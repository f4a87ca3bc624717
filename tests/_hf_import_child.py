"""Measurements for tests/test_hf_import.py, in processes of their own (Megatron's process
groups stay out of the test process).

    python tests/_hf_import_child.py tp1 SPEC.json OUT.json
        for each case: import with tools/import_hf.py, load the run as sample_srp.py does,
        compare its logits with transformers', check the added rows, export it again and
        compare the exported tensors with the original ones
    python tests/_hf_import_child.py roundtrip SPEC.json OUT.json
        export a trained run (float32), import the export, compare the logits
    torchrun --nproc_per_node=2 tests/_hf_import_child.py layouts SPEC.json OUT.json
        load imported runs at TP=2 and at PP=2 and compare the logits of a forward pass
        through Megatron's pipeline schedule with transformers'
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TEXT = "ROMEO: What light through yonder window breaks?\n<|reflect|>Safe<|/reflect|> It is"


def _max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest absolute difference of two tensors of the same shape (never broadcast: a
    wrong slice must fail here, not shrink into a small difference)."""
    assert got.shape == want.shape, f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}"
    return (got.float() - want.float()).abs().max().item()


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hf_logits(hf_dir: str, ids: list[int]) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def tp1(cases: list[dict]) -> list[dict]:
    from safetensors.torch import load_file

    from megatron_srp.inference.hf_export import export_hf
    from megatron_srp.inference.sample import _logits, load_for_inference, shutdown
    from megatron_srp.model.hf_llama import WeightIndex

    importer = _tool("import_hf")
    results = []
    for case in cases:
        rc = importer.main(["--hf", case["hf"], "--out", case["run"], "--seq-length", "256",
                            *case.get("args", [])])
        model, tok, cfg = load_for_inference(case["run"])
        ids = tok.tokenize(TEXT)
        ref = _hf_logits(case["hf"], [i for i in ids if i < case["hf_vocab"]])
        plain = [i for i in ids if i < case["hf_vocab"]]
        with torch.no_grad():
            ours = _logits(model, torch.tensor([plain]), tok.vocab_size)[0]
            emb = model.embedding.word_embeddings.weight.detach()
            out = emb if cfg.model.tie_embeddings else model.output_layer.weight.detach()
        run = json.loads((Path(case["run"]) / "iter_0000000" / "run.json").read_text())
        new = run["imported_from"]["new_token_ids"]
        old = [i for i in range(case["hf_vocab"]) if i not in new]
        hf_w = WeightIndex(case["hf"])
        hf_emb = hf_w.get("model.embed_tokens.weight")
        result = {
            "rc": rc, "vocab_size": tok.vocab_size, "new_ids": new,
            "special_ids": tok.special_token_ids, "fingerprint": tok.fingerprint,
            "max_diff_old_ids": _max_diff(ours[:, :case["hf_vocab"]], ref),
            "scale": ref.abs().max().item(),
            "argmax_equal": bool((ours[:, :case["hf_vocab"]].argmax(-1)
                                  == ref.argmax(-1)).all()),
            "config_model": run["config"]["model"], "seq_length": run["config"]["train"]
            ["seq_length"],
            "new_rows_minus_mean": max(
                [(emb[i] - emb[old].mean(0)).abs().max().item() for i in new]
                + [(out[i] - out[old].mean(0)).abs().max().item() for i in new] or [0.0]),
            "old_rows_equal": bool(torch.equal(emb[old], hf_emb[old].float())),
            "text_ids_with_specials": ids,
        }
        shutdown()
        if case.get("export"):
            export_hf(case["run"], case["export"], dtype="float32")
            shutdown()
            got = load_file(str(Path(case["export"]) / "model.safetensors"))
            want = {k: hf_w.get(k) for k in hf_w.shapes if not k.endswith("inv_freq")}
            result["export_keys_equal"] = sorted(got) == sorted(want)
            result["export_max_diff"] = max(
                (got[k].float()[:want[k].shape[0]] - want[k].float()).abs().max().item()
                for k in want if k in got)
            result["export_shapes"] = {k: list(v.shape) for k, v in got.items()
                                       if "embed" in k or "lm_head" in k}
            # the exported directory in transformers: the checkpoint's logits, all ids
            exported = _hf_logits(case["export"], ids)
            model, tok, cfg = load_for_inference(case["run"])
            with torch.no_grad():
                ours_all = _logits(model, torch.tensor([ids]), tok.vocab_size)[0]
            shutdown()
            result["export_logits_diff"] = _max_diff(exported, ours_all)
            # import(export(checkpoint)): the checkpoint's logits again
            again = str(Path(case["run"]).with_name(Path(case["run"]).name + "-again"))
            result["reimport_rc"] = importer.main(["--hf", case["export"], "--out", again])
            model, tok2, _ = load_for_inference(again)
            with torch.no_grad():
                result["reimport_logits_diff"] = _max_diff(
                    _logits(model, torch.tensor([ids]), tok2.vocab_size)[0], ours_all)
            result["reimport_same_tokenizer"] = tok2.fingerprint == tok.fingerprint
            shutdown()
        results.append(result)
    return results


def _forward_logits(model, tokens: torch.Tensor, vocab_size: int):
    """Full-vocabulary logits on the last pipeline stage (None elsewhere), through the
    pipeline schedule, gathered over tensor-parallel ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    captured = {}
    s = tokens.shape[1]

    def step(data_iterator, chunk):
        batch = next(data_iterator)
        out = chunk(batch, torch.arange(s).unsqueeze(0), None)

        def loss(output):
            captured["logits"] = output.detach()
            return output.sum() * 0.0, {}
        return out, loss

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([tokens]),
                                model=model, num_microbatches=1, seq_length=s,
                                micro_batch_size=1, forward_only=True)
    if "logits" not in captured:
        return None
    part = captured["logits"]  # [b, s, vocab / TP] (parallel_output)
    group = mpu.get_tensor_model_parallel_group()
    parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, part.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[0, :, :vocab_size].float()


def layouts(specs: list[dict]) -> dict:
    """:func:`layout_logits` for each imported run, keyed ``<run>/tp<T>_pp<P>``."""
    import torch.distributed as dist

    from megatron_srp.training import parallel

    out = {}
    for spec in specs:
        out.update({f"{spec['run']}/{k}": v for k, v in layout_logits(spec).items()})
    if dist.is_initialized():
        parallel.destroy()
    return out


def layout_logits(spec: dict) -> dict:
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from megatron_srp import compat
    from megatron_srp.config import ExperimentConfig
    from megatron_srp.model.provider import build_model_chunks
    from megatron_srp.tokenizer import SRPTokenizer
    from megatron_srp.training import checkpoint as ckpt
    from megatron_srp.training import parallel

    path = ckpt.resolve_checkpoint(spec["run"])
    run = ckpt.read_run(path)
    tok = SRPTokenizer.from_dir(Path(spec["run"]) / "tokenizer")
    ids = [i for i in tok.tokenize(TEXT) if i < spec["hf_vocab"]]
    ref = _hf_logits(spec["hf"], ids)
    out = {}
    for tp, pp in ((2, 1), (1, 2)):
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                                                  run["config"]))
        cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
        parallel.initialize(cfg)
        model = [m.eval() for m in build_model_chunks(cfg, tok.vocab_size, "fp32",
                                                      compat.has_cuda())]
        ckpt.load_model_only(path, model, cfg, tok.vocab_size)
        with torch.no_grad():
            logits = _forward_logits(model[0], torch.tensor([ids]), tok.vocab_size)
        if logits is not None and dist.get_rank() in (0, dist.get_world_size() - 1):
            out[f"tp{tp}_pp{pp}"] = {
                "max_diff": _max_diff(logits[:, :spec["hf_vocab"]], ref),
                "scale": ref.abs().max().item()}
        dist.barrier()
        from megatron.core import parallel_state as mpu
        mpu.destroy_model_parallel()
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, out)
    return {k: v for part in everything for k, v in part.items()}


def reflection_loss(spec: dict) -> dict:
    """Mean loss on the reflection tokens (opener to closer) of the first documents of an
    ``srp`` dataset, for each run directory: what continued pretraining should teach."""
    import torch.nn.functional as F
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_srp.inference.sample import _logits, load_for_inference, shutdown

    docs = IndexedDataset(spec["dataset"])
    out = {}
    for run in spec["runs"]:
        model, tok, _ = load_for_inference(run)
        total, count = 0.0, 0
        for i in range(spec["documents"]):
            ids = [int(t) for t in docs[i]][:128]
            inside, targets = False, []
            for pos, t in enumerate(ids):
                inside = inside or t == tok.reflect_open_id
                if inside and pos > 0:
                    targets.append(pos)
                inside = inside and t != tok.reflect_close_id
            if not targets:
                continue
            logits = _logits(model, torch.tensor([ids[:-1]]), tok.vocab_size)[0]
            nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
            total += float(nll[[p - 1 for p in targets]].sum())
            count += len(targets)
        out[run] = {"loss": total / count, "tokens": count}
        shutdown()
    return out


def roundtrip(spec: dict) -> dict:
    """A checkpoint trained here -> export (float32) -> import: the checkpoint's logits."""
    from megatron_srp.inference.hf_export import export_hf
    from megatron_srp.inference.sample import _logits, load_for_inference, shutdown

    model, tok, _ = load_for_inference(spec["run"])
    ids = tok.tokenize(TEXT)
    with torch.no_grad():
        before = _logits(model, torch.tensor([ids]), tok.vocab_size)[0]
    shutdown()
    export_hf(spec["run"], spec["export"], dtype="float32")
    shutdown()
    rc = _tool("import_hf").main(["--hf", spec["export"], "--out", spec["again"]])
    model, tok2, _ = load_for_inference(spec["again"])
    with torch.no_grad():
        after = _logits(model, torch.tensor([ids]), tok2.vocab_size)[0]
    shutdown()
    return {"rc": rc, "same_tokenizer": tok.fingerprint == tok2.fingerprint,
            "max_diff": (after - before).abs().max().item(), "scale": before.abs().max().item()}


def main() -> None:
    command, spec_file, out_file = sys.argv[1:4]
    spec = json.loads(Path(spec_file).read_text())
    result = {"tp1": tp1, "layouts": layouts, "reflection_loss": reflection_loss,
              "roundtrip": roundtrip}[command](spec)
    if os.environ.get("RANK", "0") == "0":
        Path(out_file).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
