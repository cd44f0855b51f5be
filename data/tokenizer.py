"""Load tokenizers (a local directory or file, or a Hugging Face hub id: downloaded or from the HF cache), resolve
pretrained model sources the same way, and train a small BPE tokenizer for the tiny CPU presets."""
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


class PretrainedNotFound(FileNotFoundError):
    """A model / tokenizer source that is neither a local path nor reachable as a hub id (one line, for the CLI)."""


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def cached_pretrained_file(name: str | Path | None, filename: str) -> Path | None:
    """`filename` of a pretrained model: in its local directory, or for a hub id in the HF cache; None when it is
    not on this machine (nothing is downloaded)."""
    if not name:
        return None
    local = Path(name) / filename
    if local.exists():
        return local
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError

    try:
        cached = try_to_load_from_cache(str(name), filename)
    except HFValidationError:  # a path, not a hub id
        return None
    return Path(cached) if isinstance(cached, str) else None


def resolve_pretrained(name: str | Path, what: str = "model.name_or_path") -> str:
    """What from_pretrained accepts: a local directory, a hub id already in the HF cache, or (online) a hub id to
    download. Offline with nothing cached, or a path that does not exist, fails with one line naming it."""
    name = str(name)
    if Path(name).exists():
        return name
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise PretrainedNotFound(f"{what}={name}: no such local directory (and not a valid hub id)") from None
    if any(cached_pretrained_file(name, f) for f in ("config.json", "tokenizer_config.json")):
        return name
    if _hub_offline():
        from huggingface_hub import constants

        raise PretrainedNotFound(
            f"{what}={name}: not a local directory and not in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
            f"and HF_HUB_OFFLINE=1 forbids downloading it: run `huggingface-cli download {name}` where there is "
            "internet (same HF_HOME), or give a local directory")
    return name  # from_pretrained downloads it


def load_tokenizer(path: str | Path):
    """A fast tokenizer from a local directory, a `tokenizer.json`, a tiktoken BPE file (Llama 3 `tokenizer.model`),
    or a hub id (see resolve_pretrained).

    A tiktoken file is converted once (slow: it rebuilds the merges) and cached under $ARENA_CACHE by content hash.
    Padding falls back to EOS (decoder classifiers pool the last real token, so the pad id is never attended).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if not path.exists():  # a hub id (from the HF cache, or downloaded when online)
        tok = AutoTokenizer.from_pretrained(resolve_pretrained(str(path), "tokenizer"))
    elif path.is_dir():
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
