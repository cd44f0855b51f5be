"""Shared fixtures: synthetic competition files, a tokenizer trained on them, tiny model configs, ../shared paths."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ARENA_SHARED", ROOT.parent / "shared"))
REAL_TRAIN = SHARED / "data" / "arena-sample" / "train.csv"
REAL_TEST = SHARED / "data" / "arena-sample" / "test.csv"
LLAMA3_TOKENIZER = SHARED / "tokenizers" / "llama3" / "tokenizer.model"

needs_shared = pytest.mark.skipif(not REAL_TRAIN.exists(), reason=f"real sample not found under {SHARED}")
needs_llama3 = pytest.mark.skipif(not LLAMA3_TOKENIZER.exists(), reason=f"Llama 3 tokenizer not found under {SHARED}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; the CPU twin of this test runs instead")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep tokenizer/dataset caches of the test run out of the user's ~/.cache (but share them across tests)."""
    os.environ.setdefault("ARENA_CACHE", str(tmp_path_factory.mktemp("arena-cache")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """Synthetic train.csv / test.csv / sample_submission.csv (400 train rows)."""
    from data.synthetic import write_sample

    out = tmp_path_factory.mktemp("sample")
    write_sample(out, rows=400, seed=0, test_rows=60)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(sample_dir, tmp_path_factory) -> Path:
    """A 1k-token byte-level BPE trained on the synthetic sample (no hub)."""
    from data.reading import read_battles
    from data.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tok")
    texts = [t for b in read_battles(sample_dir / "train.csv") for t in (*b.prompt, *b.response_a, *b.response_b)]
    train_bpe_tokenizer(texts, out, vocab_size=1024)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from data.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


def tiny_llama_config(vocab_size: int = 1024):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_gemma2_config(vocab_size: int = 1024):
    from transformers import Gemma2Config

    # query_pre_attn_scalar = head_dim for tiny configs (PLATFORM.md); a short sliding window so that it matters.
    return Gemma2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=16, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_classifier(family: str = "llama", seed: int = 0, vocab_size: int = 1024):
    """A randomly initialised tiny ArenaClassifier (fp32, eval mode)."""
    from transformers import AutoModel

    from inference.modeling import ArenaClassifier

    torch.manual_seed(seed)
    cfg = tiny_llama_config(vocab_size) if family == "llama" else tiny_gemma2_config(vocab_size)
    attn = "eager" if family == "gemma2" else "sdpa"
    model = ArenaClassifier(AutoModel.from_config(cfg, attn_implementation=attn))
    model.reset_head()
    return model.eval()


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """An exported tiny Llama classifier directory (random weights), as training would write it."""
    from data.template import FormatConfig
    from inference.modeling import save_pretrained

    out = tmp_path_factory.mktemp("export")
    save_pretrained(tiny_classifier("llama"), tiny_tokenizer, out, FormatConfig(max_length=256).to_dict(),
                    prior=[0.35, 0.35, 0.30])
    return out
