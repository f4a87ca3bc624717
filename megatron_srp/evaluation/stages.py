"""The attack-suite pipeline: models at each stage, evaluated the same way, in one command.

    python tools/attack_srp.py --config examples/attack/stages.yaml

A config lists **stages**: the first names an existing checkpoint (the pretrained base); each
later one finetunes an earlier stage (tools/finetune_srp.py, run as a torchrun job) with a
recipe and chat data -- instruction tuning, the benign GSM8K finetune, the harmful attack.
Every stage is then measured by **units**: ASR per benchmark and decoding method, over-refusal
on benign prompts, and GCG (suffixes optimised against that stage's model, then evaluated with
every decoding method beside the same behaviours without a suffix).

Resumable at every level, by the stamps of megatron_srp/units.py (docs/resumption.md): a
finetune's stamp covers its recipe file, overrides, chat data (source, limit, file contents)
and the stamp of the model it starts from; a finished finetune of the same stamp is reused, a
killed one resumes, one of another stamp is moved aside and trained again. A unit's answers
(``<out_dir>/answers/<stage>/<unit>.json``) are stamped with the model's stamp and the decoding
settings and saved before the judge runs; its result (``<out_dir>/units/<stage>/<unit>.json``)
with the answers' stamp, the judge and the judges' version. The report (stage_report.py) is
rebuilt every time from the units the config names; leftovers are listed as stale.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf

from megatron_srp.evaluation.stage_config import (  # noqa: F401  (the suite's config, re-exported)
    AttackSuiteConfig, BenchmarkSpec, FinetuneStep, GCGSpec, JudgeSpec, OverRefusalSpec,
    StageSpec, load_suite_config, validate_suite)
from megatron_srp.units import Units, file_stamp, run_stamp, stamp, unit_stamp, write_atomic


def _checkpoint_stamp(run: Path) -> str:
    """A checkpoint stage's model: which checkpoint, at which step, and the stamp of the step
    that trained it when one did."""
    from megatron_srp.training import checkpoint as ckpt

    path = ckpt.resolve_checkpoint(run)
    return stamp({"checkpoint": str(path.resolve()),
                  "iteration": ckpt.read_run(path)["progress"]["iteration"],
                  "run": run_stamp(run) or run_stamp(path.parent)})


def _chat_data(cfg: AttackSuiteConfig, st: StageSpec, log: Callable[[str], None]
               ) -> tuple[list[str], list[str]]:
    """A finetune's chat files and their stamps; a ``source`` set is written (again) whenever
    its stamp (source, limit) differs from the one it was written under."""
    from megatron_srp.data.chat_sources import write_chat_source
    from megatron_srp.evaluation.benchmarks import SHARED

    f = st.finetune
    assert f is not None
    if not f.source:
        return list(f.data), [file_stamp(p) for p in f.data]
    data = Units(Path(cfg.out_dir) / "data")
    out = Path(cfg.out_dir) / "data" / f"{st.name}.jsonl"
    want = unit_stamp({"source": f.source, "limit": f.limit, "seed": 0})
    saved = data.get(st.name, want)
    if saved is None or not out.is_file() or file_stamp(out) != saved["result"]["file"]:
        n = write_chat_source(f.source, SHARED, out, f.limit)
        data.put(st.name, want, {"records": n, "file": file_stamp(out)}, source=f.source,
                 limit=f.limit)
        log(f"stage {st.name}: {n} {f.source} records -> {out}")
    return [str(out)], [want]


def stage_model(cfg: AttackSuiteConfig, st: StageSpec, models: dict[str, tuple[Path, str]],
                log: Callable[[str], None]) -> tuple[Path, str]:
    """A stage's run directory and model stamp; a finetune stage is trained, resumed or (when
    its stamp changed: recipe file, overrides, data, the model it starts from) trained again
    here, the old run kept aside (megatron_srp/units.py)."""
    if st.checkpoint is not None:
        return Path(st.checkpoint), _checkpoint_stamp(Path(st.checkpoint))
    from megatron_srp.training.launch import FINETUNE, run_job

    f = st.finetune
    assert f is not None
    run_dir = Path(cfg.out_dir) / "models" / st.name
    data, data_stamps = _chat_data(cfg, st, log)
    start_dir, start_stamp = models[f.start]
    settings = {"recipe": f.recipe, "recipe_content": file_stamp(f.recipe),
                "overrides": list(f.overrides), "source": f.source, "limit": f.limit,
                "start": f.start}
    want = unit_stamp(settings, [start_stamp, *data_stamps])
    args = ["--config", f.recipe, f"finetune.pretrained={start_dir}",
            f"finetune.data=[{','.join(data)}]", f"checkpoint.save={run_dir}",
            "logging.progress_bar=false", f"name={st.name}", *f.overrides]
    log(f"stage {st.name}: finetune of {f.start} with {f.recipe} on {', '.join(data)}")
    ran = run_job(f.nproc, args, run_dir, Path(cfg.out_dir) / "logs" / f"finetune-{st.name}.log",
                  script=FINETUNE, what=f"stage {st.name}: the finetune", stamp=want,
                  settings={**settings, "reads": [start_stamp, *data_stamps]}, log=log)
    if not ran:
        log(f"stage {st.name}: finetune finished before, reusing {run_dir}")
    return run_dir, want


# --------------------------------------------------------------------------------------------
# The run


def run_suite(cfg: AttackSuiteConfig, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train what is missing or stale, answer what is missing, judge what is not judged,
    rebuild the report from the units the config names; returns the results."""
    from megatron_srp.evaluation import stage_units as su
    from megatron_srp.evaluation.judges import JUDGE_VERSION
    from megatron_srp.evaluation.stage_report import write_stage_report
    from megatron_srp.inference.sample import load_for_inference, shutdown
    from megatron_srp.training import checkpoint as ckpt

    out = Path(cfg.out_dir)
    write_atomic(out / "suite.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    units, answers = Units(out / "units"), Units(out / "answers")
    models: dict[str, tuple[Path, str]] = {}
    wanted: dict[str, str] = {}
    done = reused = generated = 0
    for st in cfg.stages:
        models[st.name] = stage_model(cfg, st, models, log)
        path = ckpt.resolve_checkpoint(models[st.name][0])
        loaded = None
        for unit in su.unit_names(cfg, st):
            name = f"{st.name}/{unit}"
            said = unit_stamp(su.answer_settings(cfg, st, unit), [models[st.name][1]])
            want = unit_stamp(su.judge_settings(cfg, unit), [said], JUDGE_VERSION)
            wanted[name] = want
            if units.done(name, want):
                reused += 1
                continue
            meta = {"checkpoint": str(path), "stage": st.name, "unit": unit}
            stored = answers.get(name, said)
            if stored is None:
                if loaded is None:
                    loaded = load_for_inference(path)
                    if st.window is not None:  # every decoder reads the window from here
                        loaded[0].max_sequence_length = st.window
                log(f"stage {st.name}: {unit}")
                stored = answers.put(name, said, su.generate(unit, loaded[0], loaded[1], cfg,
                                                             st, progress), **meta)
                generated += 1
            else:
                log(f"stage {st.name}: {unit}, judged from its stored answers")
            units.put(name, want, su.score(unit, stored["result"], cfg), **meta)
            done += 1
        loaded = None
    shutdown()
    log(f"computed {done} unit(s), reused {reused} finished before")
    log(f"generated answers for {generated} unit(s), judged {done - generated} from stored "
        f"answers")
    return write_stage_report(cfg, wanted)
