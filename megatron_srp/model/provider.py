"""Build Megatron-Core GPTModel chunks for this rank from a config.

Model code only: which parallel layout the chunks live in is decided by
``megatron_srp.training.parallel`` (process groups) before this is called.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state as mpu
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_srp import compat
from megatron_srp.config import ExperimentConfig
from megatron_srp.model.specs import block_spec, choose_backend
from megatron_srp.presets import padded_vocab_size


def transformer_config(cfg: ExperimentConfig, precision: str) -> TransformerConfig:
    shape, par = cfg.model.shape(), cfg.parallel
    bf16 = precision in ("bf16", "fp8")
    recompute = cfg.model.recompute
    extra = {}
    if precision == "fp8":
        extra.update(fp8="hybrid", fp8_recipe=cfg.train.fp8_recipe,
                     first_last_layers_bf16=cfg.train.fp8_first_last_bf16)
    if recompute == "full":
        extra.update(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1)
    elif recompute == "selective":
        extra.update(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=shape.init_method_std,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        autocast_dtype=torch.bfloat16 if bf16 else torch.float32,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        sequence_parallel=par.sequence_parallel,
        # Weights are redrawn afterwards by model.init.layout_invariant_init, but Megatron's own
        # init must still run: it is also what marks each weight as tensor-parallel, and
        # unmarked weights are counted once instead of per shard in the gradient norm.
        use_cpu_initialization=False,
        perform_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **compat.transformer_config_overrides(),
        **extra,
    )


def build_model_chunks(cfg: ExperimentConfig, vocab_size: int, precision: str,
                       has_cuda: bool) -> list[GPTModel]:
    """One GPTModel per virtual pipeline stage held by this rank (usually one)."""
    shape = cfg.model.shape()
    tconf = transformer_config(cfg, precision)
    backend = choose_backend(cfg.model.layer_spec, has_cuda)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        kw = {"vp_stage": vp_stage} if vpp > 1 else {}
        pre = mpu.is_pipeline_first_stage(ignore_virtual=vpp == 1, **kw)
        post = mpu.is_pipeline_last_stage(ignore_virtual=vpp == 1, **kw)
        chunks.append(GPTModel(
            config=tconf,
            transformer_layer_spec=block_spec(backend, tconf, vp_stage if vpp > 1 else None),
            vocab_size=padded_vocab_size(vocab_size, cfg.parallel.tensor_model_parallel_size),
            max_sequence_length=cfg.train.seq_length,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=shape.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(shape.rotary_base),
            rope_scaling=shape.rope_scaling_factor is not None,
            rope_scaling_factor=shape.rope_scaling_factor or 8.0,
            **kw,
        ))
    return chunks
