"""Load tokenizers from local paths only (no hub), and train a small BPE tokenizer for the tiny CPU presets."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                   "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                   "<|eot_id|>", "<|python_tag|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]


def cache_root() -> Path:
    return Path(os.environ.get("ARENA_CACHE", Path.home() / ".cache" / "arena-pref"))


def file_digest(path: str | Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def _is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline().split()
    return len(first) == 2 and first[1].isdigit()


def load_tokenizer(path: str | Path):
    """A fast tokenizer from a local directory, a `tokenizer.json`, or a tiktoken BPE file (Llama 3 `tokenizer.model`).

    A tiktoken file is converted once (slow: it rebuilds the merges) and cached under $ARENA_CACHE by content hash.
    Padding falls back to EOS (decoder classifiers pool the last real token, so the pad id is never attended).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path} (give a local directory or file; the hub is not used)")
    if path.is_dir():
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    elif path.suffix == ".json":
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    elif _is_tiktoken_file(path):
        tok = _load_tiktoken(path)
    else:
        raise ValueError(f"{path}: not a tokenizer directory, tokenizer.json or tiktoken BPE file")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_tiktoken(path: Path):
    from transformers import PreTrainedTokenizerFast

    out = cache_root() / "tokenizers" / file_digest(path)
    target = out / "tokenizer.json"
    if not target.exists():
        from transformers.convert_slow_tokenizer import TikTokenConverter

        tk = TikTokenConverter(vocab_file=str(path), pattern=LLAMA3_PATTERN, extra_special_tokens=LLAMA3_SPECIALS).converted()
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f"tokenizer.json.{os.getpid()}.tmp"
        tk.save(str(tmp))
        os.replace(tmp, target)  # atomic: concurrent workers never read half a file
    return PreTrainedTokenizerFast(
        tokenizer_file=str(target), bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>",
    )


TEMPLATE_MARKERS = ("<|prompt|>", "<|response_a|>", "<|response_b|>", "<|verdict|>")


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer on the data itself, saved as an HF tokenizer directory.

    The tiny CPU presets use it so that nothing is downloaded; it has <bos>, <eos>, <pad> special tokens, and the
    template's markers as single tokens (a small vocabulary would otherwise spend ~10 tokens on each header).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    tk.add_tokens(list(TEMPLATE_MARKERS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast
