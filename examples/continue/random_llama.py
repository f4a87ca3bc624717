"""A randomly initialised Llama directory with a published shape, as a stand-in for a
downloaded model (no network needed): config.json, bfloat16 safetensors (1 GB shards) and a
tokenizer.json. docs/import.md uses it to try the import and to measure its memory.

    python examples/continue/random_llama.py --shape smollm2-1.7b --out models/random-1.7b
    python examples/continue/random_llama.py --shape tiny --tokenizer megatron_srp/assets/tokenizer \
        --out models/random-tiny

--tokenizer DIR copies DIR/tokenizer.json without the project's special tokens (as an outside
model's tokenizer is; the import adds them back); without it, a word-level tokenizer with one
id per embedding row is written (enough for shapes and memory, not for real text).
"""
import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {  # SmolLM2's published config.json values; "tiny" is the project's tiny preset
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                 vocab_size=8187, max_position_embeddings=1024),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, rope_theta=100000.0,
                         vocab_size=49152, max_position_embeddings=8192),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, rope_theta=130000.0,
                         vocab_size=49152, max_position_embeddings=8192),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", help="a directory whose tokenizer.json to copy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    shape = dict(SHAPES[args.shape])
    if args.tokenizer:
        data = json.loads((Path(args.tokenizer) / "tokenizer.json").read_text())
        data["added_tokens"] = []
        tokenizer = Tokenizer.from_str(json.dumps(data))
        shape["vocab_size"] = tokenizer.get_vocab_size(with_added_tokens=True)
    else:
        vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, shape["vocab_size"])}}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.bfloat16)
    config = LlamaConfig(rms_norm_eps=1e-5, tie_word_embeddings=True, **shape)
    LlamaForCausalLM(config).save_pretrained(out, max_shard_size="1GB")
    tokenizer.save(str(out / "tokenizer.json"))
    print(f"wrote {out}: {args.shape}, vocabulary {shape['vocab_size']}")


if __name__ == "__main__":
    main()
