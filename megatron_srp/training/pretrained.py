"""Starting a run from another run's weights: continued pretraining and finetuning.

``checkpoint.pretrained`` (pretraining) and ``finetune.pretrained`` name a run directory or one
``iter_N`` checkpoint, e.g. an imported Hugging Face model (docs/import.md). The new run takes
the model shape from it (so a recipe states only what it changes), starts from its weights with
a fresh optimizer and an LR schedule from step 0 (warmup again), and saves to its own
``checkpoint.save``: once that holds a checkpoint, a restarted run resumes it, not the weights
it started from. The run's tokenizer (the one its data was preprocessed with) must be the
checkpoint's; otherwise the run is refused before any work, with both fingerprints named.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from megatron_srp.config import ConfigError, ExperimentConfig, load_config
from megatron_srp.tokenizer import SRPTokenizer
from megatron_srp.training import checkpoint as ckpt

TOKENIZER_SUBDIR = "tokenizer"


def read_pretrained(pretrained: str, key: str) -> tuple[Path, dict]:
    """The checkpoint ``pretrained`` resolves to and its run.json; errors name ``key``."""
    try:
        found = ckpt.resolve_checkpoint(pretrained)
        run = ckpt.read_run(found)
    except ckpt.CheckpointError as exc:
        raise ConfigError(key, str(exc)) from exc
    if "config" not in run:
        raise ConfigError(key, f"{found / ckpt.RUN_FILE} has no 'config'")
    return found, run


def load_pretrain_config(path: Optional[str | os.PathLike],
                         overrides: Sequence[str]) -> ExperimentConfig:
    """The pretraining config; with ``checkpoint.pretrained``, the recipe and overrides sit on
    top of the pretrained run's model section (a recipe that sets another shape is refused when
    the weights load, with the differing fields named)."""
    first = load_config(path, list(overrides))
    if not first.checkpoint.pretrained:
        return first
    _, run = read_pretrained(first.checkpoint.pretrained, "checkpoint.pretrained")
    return load_config(path, list(overrides), inherited={"model": run["config"].get("model", {})})


def check_tokenizer(checkpoint: Path, run: dict, tokenizer: SRPTokenizer, key: str) -> None:
    """Refuse a run whose tokenizer is not the one ``checkpoint`` was trained with."""
    recorded = (run.get("tokenizer") or {}).get("fingerprint")
    if recorded is not None and recorded != tokenizer.fingerprint:
        raise ConfigError(key, f"checkpoint {checkpoint} was trained with tokenizer {recorded} "
                               f"({checkpoint.parent / TOKENIZER_SUBDIR}), but the run's data uses "
                               f"tokenizer {tokenizer.fingerprint} ({tokenizer.name}): preprocess "
                               f"the data with --tokenizer {checkpoint.parent / TOKENIZER_SUBDIR}")


def pretrained_start(cfg: ExperimentConfig, tokenizer: SRPTokenizer) -> Optional[Path]:
    """The checkpoint whose weights a continued-pretraining run starts from (None without
    ``checkpoint.pretrained``), its tokenizer checked against the run's."""
    if not cfg.checkpoint.pretrained:
        return None
    found, run = read_pretrained(cfg.checkpoint.pretrained, "checkpoint.pretrained")
    check_tokenizer(found, run, tokenizer, "checkpoint.pretrained")
    return found
