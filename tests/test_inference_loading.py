"""Model loading for serving: 8-bit / 4-bit bitsandbytes on the CPU, out-of-memory halving, Gemma2, LoRA adapter
exports with a relocated base, and a weighted ensemble run through the workers."""
from __future__ import annotations

import numpy as np
import pytest

from data.reading import read_battles
from data.template import FormatConfig, Formatter
from inference.loading import LoadSpec, ModelError, load_model, resolve_base_model
from inference.submission import softmax
from inference.worker import Runner
from tests.conftest import tiny_classifier


@pytest.fixture(scope="module")
def sample_seqs(sample_dir, tiny_tokenizer):
    """Rendered test rows of different lengths (so batches are padded)."""
    fmt = Formatter(tiny_tokenizer, FormatConfig(max_length=256))
    battles = read_battles(sample_dir / "test.csv")[:8]
    return [np.asarray(ids, dtype=np.int32) for ids in fmt.encode(battles)]


def one_by_one(runner: Runner, seqs, pad_id: int) -> np.ndarray:
    return np.concatenate([runner.forward([s], pad_id) for s in seqs])


@pytest.mark.parametrize("quantize,tol", [("8bit", 0.02), ("4bit", 0.05)])
def test_quantized_loading_on_cpu_is_close_to_fp32(tiny_export_dir, sample_seqs, quantize, tol):
    import bitsandbytes as bnb

    ref_model, _ = load_model(LoadSpec(str(tiny_export_dir), None), "cpu")
    model, _ = load_model(LoadSpec(str(tiny_export_dir), None, quantize=quantize), "cpu")
    kind = bnb.nn.Linear8bitLt if quantize == "8bit" else bnb.nn.Linear4bit
    assert any(isinstance(m, kind) for m in model.modules())
    logits = Runner(model, "cpu").run(sample_seqs, 0)
    ref = Runner(ref_model, "cpu").run(sample_seqs, 0)
    assert np.all(np.isfinite(logits))
    diff = np.abs(softmax(logits) - softmax(ref)).max()
    assert 0 < diff < tol  # quantized (not the same weights) but close


def test_runner_halves_batch_on_out_of_memory(tiny_export_dir, sample_seqs):
    model, _ = load_model(LoadSpec(str(tiny_export_dir), None), "cpu")
    full = Runner(model, "cpu").run(sample_seqs, 0)
    tight = Runner(model, "cpu", oom_above=600)  # only batches of <= 2 rows of 256 tokens fit
    out = tight.run(sample_seqs, 0)
    assert tight.ooms >= 3
    assert np.abs(out - full).max() < 1e-5
    assert np.abs(out - one_by_one(tight, sample_seqs, 0)).max() < 1e-5  # padding changes nothing
    single = Runner(model, "cpu", oom_above=10).run(sample_seqs[:2], 0)
    assert np.all(np.isnan(single))  # a row that never fits is reported, not crashed on


def test_gemma2_export_loads_eager_and_pads_correctly(tiny_tokenizer, sample_seqs, tmp_path):
    from inference.modeling import save_pretrained

    save_pretrained(tiny_classifier("gemma2"), tiny_tokenizer, tmp_path, FormatConfig(max_length=256).to_dict())
    model, _ = load_model(LoadSpec(str(tmp_path), None), "cpu")
    assert model.backbone.config._attn_implementation == "eager"  # sdpa cannot soft-cap
    runner = Runner(model, "cpu")
    assert np.abs(runner.run(sample_seqs, 0) - one_by_one(runner, sample_seqs, 0)).max() < 1e-5


def make_adapter_export(tokenizer, out_dir, base_dir, temperature: float):
    """A LoRA export as training writes it: adapter/ + head + arena.json naming a base that is not there."""
    from peft import LoraConfig, get_peft_model

    from inference.modeling import ArenaClassifier, meta_for, save_head, save_meta, save_pretrained

    fmt = FormatConfig(max_length=256).to_dict()
    base = tiny_classifier("llama", seed=1)
    save_pretrained(base, tokenizer, base_dir, fmt)  # the base model directory (backbone config + weights)
    lora = get_peft_model(base.backbone, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))  # non-zero: the adapter matters
    model = ArenaClassifier(lora)
    model.reset_head()
    out_dir.mkdir(parents=True)
    lora.save_pretrained(str(out_dir / "adapter"))
    save_head(model, out_dir)
    tokenizer.save_pretrained(str(out_dir))
    save_meta(out_dir, meta_for(model, fmt, adapter=True, base_model="/training/machine/llama-base",
                                temperature=temperature, prior=[0.3, 0.3, 0.4]))
    return out_dir


def test_adapter_export_needs_and_finds_its_base(tiny_tokenizer, tmp_path, sample_seqs):
    from inference.modeling import read_meta

    adapter = make_adapter_export(tiny_tokenizer, tmp_path / "lora", tmp_path / "base", 1.0)
    meta = read_meta(adapter)
    with pytest.raises(ModelError, match="--base-model"):
        resolve_base_model(adapter, meta)
    assert resolve_base_model(adapter, meta, str(tmp_path / "base")) == str(tmp_path / "base")
    merged, _ = load_model(LoadSpec(str(adapter), str(tmp_path / "base")), "cpu")
    assert not any("lora" in n for n, _ in merged.named_parameters())  # merged for speed
    base_only, _ = load_model(LoadSpec(str(tmp_path / "base"), None), "cpu")
    a, b = Runner(merged, "cpu").run(sample_seqs[:2], 0), Runner(base_only, "cpu").run(sample_seqs[:2], 0)
    assert np.abs(a - b).max() > 1e-4  # the adapter changed the model


@pytest.mark.distributed
def test_weighted_ensemble_with_adapter_through_two_workers(tiny_export_dir, tiny_tokenizer, sample_dir, tmp_path):
    from inference.predict import EXIT_OK, PredictConfig, predict
    from tests.test_predict import read_sub, reference_probs

    base = tmp_path / "base"
    adapter = make_adapter_export(tiny_tokenizer, tmp_path / "lora", base, temperature=1.7)
    out, test = tmp_path / "sub.csv", tmp_path / "test.csv"
    lines = (sample_dir / "test.csv").read_text().splitlines(keepends=True)
    test.write_text("".join(lines[:25]))  # 24 rows (the synthetic sample has no multi-line cells)
    result = predict(PredictConfig(models=(str(tiny_export_dir), str(adapter)), weights=(0.6, 0.4),
                                   base_models=(str(base),), test=str(test), out=str(out), devices="cpu:2",
                                   time_budget=None, tta=False))
    assert result.exit_code == EXIT_OK, result.messages
    probs = read_sub(out)[1]
    assert len(probs) == 24
    p1 = reference_probs(tiny_export_dir, test, tta=False)
    p2 = reference_probs(adapter, test, tta=False, base_model=str(base))  # temperature 1.7 applied
    assert np.abs(probs - (0.6 * p1 + 0.4 * p2)).max() < 1e-5
    assert np.abs(probs - p1).max() > 1e-4
