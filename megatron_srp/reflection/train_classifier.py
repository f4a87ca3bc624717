"""Train, evaluate and write the shipped ``embedded`` safety classifier.

Everything is deterministic for a given ``seed``: data assembly (fixed samples of the safe
corpora), a document-level, stratified 80/20 train/held-out split, and full-batch L-BFGS.

Data (all under ``shared/data``, see its SOURCES.md). The harmful-prompt *benchmarks*
(AdvBench, HarmBench, JailbreakBench) are evaluation data and are never read here.

=========================================  ======  ============================================
source                                     label   category
=========================================  ======  ============================================
toxigen/toxigen_statements.jsonl           unsafe  S10 (ToxiGen "hate" statements)
toxigen/toxigen_statements.jsonl           safe    None (ToxiGen "neutral" statements)
do_not_answer/do_not_answer_prompts.jsonl  unsafe  :data:`DNA_CATEGORY_MAP` (some types dropped)
do_not_answer/do_not_answer_responses.jsonl unsafe :data:`DNA_CATEGORY_MAP` (human harmful=1)
do_not_answer/do_not_answer_responses.jsonl safe   None; ``DNA_SAFE_RESPONSES_PER_PROMPT`` sampled
xstest/xstest_prompts.jsonl                both    :data:`XSTEST_CATEGORY_MAP` (else None)
tinyshakespeare, wikitext2/valid, gsm8k    safe    None (sampled, see :data:`SAFE_SAMPLES`)
questions, alpaca instructions + seeds
=========================================  ======  ============================================

An unsafe example whose category is None trains the unsafe head only, not the category head.
A "document" for the split is one text, except that a Do-Not-Answer prompt and all its model
responses form one document (grouped by ``id``), so no question straddles train and held-out.
"""
from __future__ import annotations

import json
import random
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from megatron_srp.reflection.classifiers import (
    ASSET_DIR, CONFIG_FILE, FORMAT_VERSION, TOKENIZER_SUBDIR, WEIGHTS_FILE, EmbeddedClassifier,
)
from megatron_srp.reflection.features import TokenNgramFeaturizer
from megatron_srp.taxonomy import DEFAULT_TAXONOMY

DEFAULT_SEED = 1234
HELD_OUT_FRACTION = 0.2

#: Do-Not-Answer ``types_of_harm`` (and, where a type mixes hazards, the part of
#: ``specific_harms`` before the colon) -> Llama Guard 3 code. ``None`` = no S1-S14 hazard:
#: those prompts (and their unsafe responses) are dropped; their safe responses are kept.
DNA_CATEGORY_MAP: dict[str, Any] = {
    "Adult Content": {"Explicit Sexual Content": "S12", "Graphic Violence": "S1"},
    "Social stereotypes and unfair discrimination": "S10",
    "Toxic language (hate speech)": "S10",
    "Mental Health or Overreliance Crisis": {
        "Self-Harm": "S11", "Depression and Anxiety": "S11", "*": "S6"},
    "Treat Chatbot as a Human": None,  # "are you my friend?", "what is your birthday?"
    "Compromise privacy by leaking or inferring private information (person/individual)": "S7",
    "Risks from leaking or inferring sensitive information (organization/gov)": "S7",
    "Assisting illegal activities": {
        "Threats and Intimidation": "S1", "Violence and Physical Harm": "S1",
        "Terrorist Activities": "S1", "Animal Abuse/Cruelty/Poaching": "S1",
        "Sexual Exploitation and Pornography": "S3", "Copyright Infringement": "S8",
        "*": "S2"},  # financial crimes, illegal digital activities, drugs, trade, surveillance
    "Nudging or advising users to perform unethical or unsafe actions": {
        "Defamatory Content": "S5", "Endorsement of Unsafe Health Practices": "S6",
        "Trolling or Flame baiting": "S10",
        "*": "S2"},  # risky pranks / substance misuse, cyberbullying and harassment
    "Reducing the cost of disinformation campaigns": {
        "Disinformation": "S5", "Malinformation": "S7", "Spam Content": "S2"},
    "Causing material harm by disseminating misinformation e.g. in medicine or law": "S6",
    "Disseminating false or misleading information": {
        "Rumors": "S5", "Hazardous Activities": "S2",
        "*": None},  # propaganda, false news, misinterpretation: no S1-S14 hazard
}

#: XSTest ``type`` -> code for its unsafe contrast prompts; unlisted unsafe types get None
#: (unsafe head only). Safe XSTest prompts are safe whatever their type.
XSTEST_CATEGORY_MAP: dict[str, str] = {"contrast_discr": "S10", "contrast_privacy": "S7"}

#: How many texts of each safe corpus are sampled (seeded).
SAFE_SAMPLES = {"tinyshakespeare": 1000, "wikitext2": 800, "gsm8k": 800, "alpaca": 800}
DNA_SAFE_RESPONSES_PER_PROMPT = 2
WIKITEXT_MAX_CHARS = 800

#: Training hyper-parameters (fixed a priori, not tuned on the held-out split).
TRAIN_DEFAULTS = {"l2_unsafe": 1e-4, "l2_category": 1e-4, "max_iter": 150}


@dataclass(frozen=True)
class Example:
    text: str
    safe: bool
    category: Optional[str]
    source: str
    group: str  # document id for the split


def dna_category(types_of_harm: str, specific_harms: str) -> Optional[str]:
    """The S-code of a Do-Not-Answer row per :data:`DNA_CATEGORY_MAP` (None = dropped)."""
    entry = DNA_CATEGORY_MAP[types_of_harm]
    if isinstance(entry, dict):
        key = specific_harms.split(":")[0].strip()
        entry = entry.get(key, entry.get("*"))
        if entry is None and key not in DNA_CATEGORY_MAP[types_of_harm] \
                and "*" not in DNA_CATEGORY_MAP[types_of_harm]:
            raise KeyError(f"no mapping for Do-Not-Answer {types_of_harm!r} / {key!r}")
    return entry


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_examples(data_dir: str | Path, seed: int = DEFAULT_SEED) -> list[Example]:
    """All training/evaluation examples, in a fixed order for a given seed."""
    data_dir = Path(data_dir)
    rng = random.Random(seed)
    out: list[Example] = []

    # ToxiGen human-written statements; the same text can occur in several group files.
    seen: set[str] = set()
    for row in _jsonl(data_dir / "toxigen" / "toxigen_statements.jsonl"):
        text = row["text"].strip()
        if not text or text in seen:
            continue
        seen.add(text)
        unsafe = row["label"] == "unsafe"
        out.append(Example(text, not unsafe, "S10" if unsafe else None, "toxigen", f"tg:{text}"))

    # Do-Not-Answer: prompts (all unsafe) and model responses, grouped by question id.
    for row in _jsonl(data_dir / "do_not_answer" / "do_not_answer_prompts.jsonl"):
        code = dna_category(row["category"], row["specific_harms"])
        if code is not None:
            out.append(Example(row["text"].strip(), False, code, "dna_prompt", f"dna:{row['id']}"))
    safe_by_id: dict[int, list[dict]] = defaultdict(list)
    for row in _jsonl(data_dir / "do_not_answer" / "do_not_answer_responses.jsonl"):
        text = row["text"].strip()
        if not text:
            continue
        if row["label"] == "unsafe":
            code = dna_category(row["category"], row["specific_harms"])
            if code is not None:
                out.append(Example(text, False, code, "dna_response", f"dna:{row['id']}"))
        else:
            safe_by_id[row["id"]].append(row)
    for qid in sorted(safe_by_id):
        rows = safe_by_id[qid]
        for row in rng.sample(rows, min(DNA_SAFE_RESPONSES_PER_PROMPT, len(rows))):
            out.append(Example(row["text"].strip(), True, None, "dna_response", f"dna:{qid}"))

    # XSTest: safe prompts that sound unsafe, and their unsafe contrasts.
    for row in _jsonl(data_dir / "xstest" / "xstest_prompts.jsonl"):
        unsafe = row["label"] == "unsafe"
        code = XSTEST_CATEGORY_MAP.get(row["category"]) if unsafe else None
        out.append(Example(row["text"].strip(), not unsafe, code, "xstest", f"xs:{row['id']}"))

    # Safe corpora.
    speeches = [s.strip() for s in (data_dir / "tinyshakespeare" / "input.txt")
                .read_text(encoding="utf-8").split("\n\n")]
    speeches = [s for s in speeches if len(s) >= 60]
    for i in sorted(rng.sample(range(len(speeches)), SAFE_SAMPLES["tinyshakespeare"])):
        out.append(Example(speeches[i], True, None, "tinyshakespeare", f"ts:{i}"))

    paragraphs = [ln.strip() for ln in (data_dir / "wikitext2" / "valid.txt")
                  .read_text(encoding="utf-8").splitlines()]
    paragraphs = [p for p in paragraphs if len(p) >= 100 and not p.startswith("=")]
    for i in sorted(rng.sample(range(len(paragraphs)), SAFE_SAMPLES["wikitext2"])):
        text = paragraphs[i]
        if len(text) > WIKITEXT_MAX_CHARS:
            text = text[:WIKITEXT_MAX_CHARS].rsplit(" ", 1)[0]
        out.append(Example(text, True, None, "wikitext2", f"wt:{i}"))

    questions = [r["question"].strip() for r in _jsonl(data_dir / "gsm8k" / "train_sample2000.jsonl")]
    for i in sorted(rng.sample(range(len(questions)), SAFE_SAMPLES["gsm8k"])):
        out.append(Example(questions[i], True, None, "gsm8k", f"gsm:{i}"))

    alpaca = json.loads((data_dir / "alpaca" / "alpaca_instructions_noinput_sample2000.json")
                        .read_text(encoding="utf-8"))
    for i in sorted(rng.sample(range(len(alpaca)), SAFE_SAMPLES["alpaca"])):
        out.append(Example(alpaca[i]["instruction"].strip(), True, None, "alpaca", f"al:{i}"))
    for row in _jsonl(data_dir / "alpaca" / "seed_tasks.jsonl"):
        out.append(Example(row["instruction"].strip(), True, None, "alpaca_seed", f"as:{row['id']}"))
    return out


def split_examples(examples: Sequence[Example], seed: int = DEFAULT_SEED,
                   held_out_fraction: float = HELD_OUT_FRACTION
                   ) -> tuple[list[Example], list[Example]]:
    """Document-level split, stratified by (source, document has an unsafe text)."""
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex.group].append(ex)
    strata: dict[str, list[str]] = defaultdict(list)
    for gid, members in groups.items():
        unsafe = any(not m.safe for m in members)
        strata[f"{members[0].source}:{'unsafe' if unsafe else 'safe'}"].append(gid)
    rng = random.Random(seed)
    held: set[str] = set()
    for key in sorted(strata):
        gids = sorted(strata[key])
        rng.shuffle(gids)
        held.update(gids[: int(round(held_out_fraction * len(gids)))])
    train = [ex for ex in examples if ex.group not in held]
    held_out = [ex for ex in examples if ex.group in held]
    return train, held_out


# ----------------------------------------------------------------------------- training

def fit_linear(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, dim: int,
               targets: np.ndarray, n_outputs: int, sample_weight: np.ndarray, l2: float,
               max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch L-BFGS for a logistic (``n_outputs == 1``, 0/1 targets) or softmax linear model.

    Minimises ``sum_i w_i * loss_i / sum_i w_i + l2/2 * ||W||^2``. Returns ``(W [dim, k], b [k])``.
    """
    import torch

    n = len(indptr) - 1
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        # Rows come from TokenNgramFeaturizer: sorted, unique column indices per row.
        x = torch.sparse_csr_tensor(torch.as_tensor(indptr), torch.as_tensor(indices),
                                    torch.as_tensor(values, dtype=torch.float32), (n, dim))
    w = torch.zeros(dim, n_outputs, dtype=torch.float32, requires_grad=True)
    b = torch.zeros(n_outputs, dtype=torch.float32, requires_grad=True)
    sw = torch.as_tensor(sample_weight, dtype=torch.float32)
    sw = sw / sw.sum()
    if n_outputs == 1:
        y = torch.as_tensor(targets, dtype=torch.float32)
    else:
        y = torch.as_tensor(targets, dtype=torch.long)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = torch.sparse.mm(x, w) + b
        if n_outputs == 1:
            losses = torch.nn.functional.binary_cross_entropy_with_logits(
                logits[:, 0], y, reduction="none")
        else:
            losses = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        loss = (losses * sw).sum() + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy().copy(), b.detach().numpy().copy()


def _balanced_weights(labels: Sequence) -> np.ndarray:
    counts = Counter(labels)
    return np.array([len(labels) / (len(counts) * counts[l]) for l in labels], dtype=np.float64)


def default_featurizer() -> TokenNgramFeaturizer:
    """Features over the package's shipped tokenizer, the one datasets are built with by
    default (so preprocessing can hand the classifier its ids)."""
    from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

    return TokenNgramFeaturizer(SRPTokenizer.from_dir(default_tokenizer_dir()))


def train(examples: Sequence[Example], featurizer: Optional[TokenNgramFeaturizer] = None,
          l2_unsafe: float = TRAIN_DEFAULTS["l2_unsafe"],
          l2_category: float = TRAIN_DEFAULTS["l2_category"],
          max_iter: int = TRAIN_DEFAULTS["max_iter"]) -> dict[str, Any]:
    """Fit both heads; returns the arrays and config that :func:`write_asset` stores."""
    import torch

    featurizer = featurizer or default_featurizer()
    torch.manual_seed(0)
    with _torch_threads(1):  # one thread: the same float reductions on every machine
        texts = [ex.text for ex in examples]
        indptr, indices, values = featurizer.transform(texts)
        unsafe = np.array([0.0 if ex.safe else 1.0 for ex in examples])
        unsafe_w, unsafe_b = fit_linear(indptr, indices, values, featurizer.dim, unsafe, 1,
                                        _balanced_weights(list(unsafe)), l2_unsafe, max_iter)

        cat_rows = [i for i, ex in enumerate(examples) if not ex.safe and ex.category]
        categories = sorted({examples[i].category for i in cat_rows},
                            key=lambda c: DEFAULT_TAXONOMY.codes.index(c))
        targets = np.array([categories.index(examples[i].category) for i in cat_rows])
        sub = featurizer.transform([texts[i] for i in cat_rows])
        cat_w, cat_b = fit_linear(*sub, featurizer.dim, targets, len(categories),
                                  _balanced_weights(list(targets)), l2_category, max_iter)
    return {"unsafe_w": unsafe_w[:, 0], "unsafe_b": unsafe_b, "category_w": cat_w,
            "category_b": cat_b, "categories": categories, "features": featurizer.config(),
            "tokenizer": featurizer.tokenizer,
            "hyperparameters": {"l2_unsafe": l2_unsafe, "l2_category": l2_category,
                                "max_iter": max_iter}}


class _torch_threads:
    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        import torch
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch
        torch.set_num_threads(self.old)


def write_asset(model: dict[str, Any], out_dir: str | Path,
                trained: Optional[dict[str, Any]] = None) -> Path:
    """Write ``config.json``, ``weights.npz`` (float16 weights) and a copy of the tokenizer
    (``tokenizer/``) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = model["tokenizer"]
    tokenizer.save(out_dir / TOKENIZER_SUBDIR)
    config = {"format_version": FORMAT_VERSION, "kind": "token-ngram-logistic",
              "categories": list(model["categories"]), "features": model["features"],
              "tokenizer_fingerprint": tokenizer.fingerprint,
              "hyperparameters": model["hyperparameters"], "trained": trained or {}}
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
    # The zip entries carry a timestamp, so reproducibility is checked on predictions.
    np.savez_compressed(out_dir / WEIGHTS_FILE,
                        unsafe_w=model["unsafe_w"].astype(np.float16),
                        unsafe_b=model["unsafe_b"].astype(np.float32),
                        category_w=model["category_w"].astype(np.float16),
                        category_b=model["category_b"].astype(np.float32))
    return out_dir


# ----------------------------------------------------------------------------- evaluation

def evaluate(classifier, examples: Sequence[Example]) -> dict[str, Any]:
    """Accuracy, per-class and per-category P/R/F1, confusion matrices, per-source accuracy."""
    from megatron_srp.reflection.scores import Verdict, classification_report

    labels = classifier.classify([ex.text for ex in examples])
    report = classification_report([Verdict(ex.safe, ex.category) for ex in examples],
                                   [Verdict(lab.safe, lab.category) for lab in labels])
    by_source: dict[str, list[bool]] = defaultdict(list)
    for ex, lab in zip(examples, labels):
        by_source[f"{ex.source}:{'safe' if ex.safe else 'unsafe'}"].append(ex.safe == lab.safe)
    report["accuracy_by_source"] = {k: {"n": len(v), "accuracy": round(sum(v) / len(v), 4)}
                                    for k, v in sorted(by_source.items())}
    return report


def dataset_summary(examples: Sequence[Example]) -> dict[str, Any]:
    by = Counter(f"{ex.source}:{'safe' if ex.safe else 'unsafe'}" for ex in examples)
    cats = Counter(ex.category for ex in examples if not ex.safe)
    return {"n": len(examples), "by_source": dict(sorted(by.items())),
            "unsafe_categories": {str(k): v for k, v in sorted(cats.items(), key=str)}}


def train_and_write(data_dir: str | Path, out_dir: str | Path = ASSET_DIR,
                    seed: int = DEFAULT_SEED, **train_options: Any) -> dict[str, Any]:
    """The whole pipeline: assemble, split, train, write the asset, evaluate on held-out."""
    examples = load_examples(data_dir, seed)
    train_set, held_out = split_examples(examples, seed)
    start = time.perf_counter()
    model = train(train_set, **train_options)
    train_seconds = time.perf_counter() - start
    trained = {"seed": seed, "n_train": len(train_set), "n_held_out": len(held_out),
               "held_out_fraction": HELD_OUT_FRACTION}
    write_asset(model, out_dir, trained)
    classifier = EmbeddedClassifier(out_dir)
    report = {"seed": seed, "train_seconds": round(train_seconds, 2),
              "train": dataset_summary(train_set), "held_out": dataset_summary(held_out),
              "held_out_metrics": evaluate(classifier, held_out)}
    return report
