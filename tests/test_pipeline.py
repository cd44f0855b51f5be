"""--parallel pipeline: the layer split, stage-by-stage forward == one-device forward, and end to end on cpu:2."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from inference.pipeline import layer_of, split_layers, stage_bytes
from tests.conftest import tiny_classifier


# -- the split ----------------------------------------------------------------------------------------------------
def test_split_balances_bytes_with_embeddings_on_the_first_stage():
    # 8 equal layers, embeddings worth 2 layers: stage 0 takes fewer layers
    assert split_layers([10] * 8, 2, first_extra=20) == [(0, 3), (3, 8)]
    assert split_layers([10] * 8, 2, last_extra=20) == [(0, 5), (5, 8)]
    assert split_layers([10] * 8, 2) == [(0, 4), (4, 8)]
    assert split_layers([1, 1, 1, 9], 2) == [(0, 3), (3, 4)]


def test_split_is_optimal_and_covers_every_layer():
    rng = np.random.default_rng(0)
    for _ in range(30):
        w = rng.integers(1, 100, size=int(rng.integers(3, 12))).tolist()
        k = int(rng.integers(2, min(4, len(w)) + 1))
        bounds = split_layers(w, k, 7, 5)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(w)
        assert all(a < b for a, b in bounds) and all(bounds[i][1] == bounds[i + 1][0] for i in range(k - 1))
        loads = [sum(w[a:b]) + (7 if s == 0 else 0) + (5 if s == k - 1 else 0) for s, (a, b) in enumerate(bounds)]
        # brute force over all cut points: nothing beats it
        import itertools

        best = min(max(sum(w[a:b]) + (7 if s == 0 else 0) + (5 if s == k - 1 else 0)
                       for s, (a, b) in enumerate(zip((0, *c), (*c, len(w)))))
                   for c in itertools.combinations(range(1, len(w)), k - 1))
        assert max(loads) == best


def test_split_refuses_more_stages_than_layers():
    with pytest.raises(ValueError, match="2 layers cannot be split over 3 stages"):
        split_layers([1, 1], 3)


def test_stage_bytes_groups_tensors_by_layer():
    sizes = {"embed_tokens.weight": 100, "layers.0.mlp.up_proj.weight": 10, "layers.1.self_attn.q_proj.weight": 7,
             "layers.1.input_layernorm.weight": 1, "norm.weight": 3}
    assert stage_bytes(sizes, 2) == ([10, 8], 100, 3)
    assert layer_of("model.layers.12.mlp.weight") == 12 and layer_of("norm.weight") is None
    from inference.pipeline import _stage_key

    assert _stage_key("model.layers.12.mlp.up_proj.weight", 10) == "layers.2.mlp.up_proj.weight"
    assert _stage_key("layers.3.input_layernorm.weight", 4) == "layers.-1.input_layernorm.weight"  # not this stage's
    assert _stage_key("embed_tokens.weight", 4) == "embed_tokens.weight"


# -- stage-by-stage forward ---------------------------------------------------------------------------------------
def right_padded(lengths, vocab=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_stages_in_sequence_equal_the_whole_model(family):
    from transformers import AutoModel

    from inference.modeling import ArenaClassifier
    from inference.pipeline import split_model
    from tests.conftest import tiny_gemma2_config, tiny_llama_config

    torch.manual_seed(0)
    cfg = (tiny_llama_config if family == "llama" else tiny_gemma2_config)()
    cfg.num_hidden_layers = 4
    if family == "gemma2":
        cfg.layer_types = ["sliding_attention", "full_attention"] * 2
    model = ArenaClassifier(AutoModel.from_config(cfg, attn_implementation="eager")).eval()
    model.reset_head()
    ids, mask = right_padded([40, 23, 7, 40, 1])  # sequences longer than Gemma2's sliding window of 16
    with torch.no_grad():
        whole = model(ids, attention_mask=mask)
        for bounds in ([(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]):
            h = ids
            for stage in split_model(model, bounds):
                h = stage(h, mask)
            assert h.shape == (5, 3)
            assert (h - whole).abs().max().item() < 1e-5, bounds
    # the sliding window matters for these lengths: a model with a long window gives other logits
    if family == "gemma2":
        model.backbone.config.sliding_window = 4096
        with torch.no_grad():
            assert (model(ids, attention_mask=mask) - whole).abs().max().item() > 1e-4


@pytest.fixture(scope="module")
def gemma2_export_dir(tiny_tokenizer, tmp_path_factory):
    from data.template import FormatConfig
    from inference.modeling import save_pretrained

    out = tmp_path_factory.mktemp("gemma2-export")
    save_pretrained(tiny_classifier("gemma2"), tiny_tokenizer, out, FormatConfig(max_length=256).to_dict(),
                    prior=[0.35, 0.35, 0.30])
    return out


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_stages_loaded_from_an_export_hold_only_their_part_and_equal_the_model(family, tiny_export_dir,
                                                                               gemma2_export_dir):
    from inference.loading import LoadSpec, load_model
    from inference.pipeline import load_stage, plan_stages

    export = tiny_export_dir if family == "llama" else gemma2_export_dir
    bounds = plan_stages(export, 2)
    assert bounds == [(0, 1), (1, 2)]
    spec = {"model_dir": str(export), "base_model": None, "quantize": "none", "dtype": "auto"}
    stages = [load_stage(spec, "cpu", bounds, s) for s in range(2)]
    model, _ = load_model(LoadSpec(str(export), None), "cpu")
    assert stages[0].embed is not None and stages[0].norm is None and stages[0].head is None
    assert stages[1].embed is None and stages[1].norm is not None and stages[1].head is not None
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(stages[0]) + n_params(stages[1]) == n_params(model)  # nothing loaded twice, nothing missing
    assert n_params(stages[0]) > n_params(stages[1])  # the embeddings live on stage 0 only
    ids, mask = right_padded([60, 33, 5, 17])  # longer than Gemma2's sliding window (16), right padding
    with torch.no_grad():
        whole = model(ids, attention_mask=mask)
        piped = stages[1](stages[0](ids, mask), mask)
    assert (piped - whole).abs().max().item() < 1e-5


def test_half_precision_overflow_in_a_stage_is_rerun_in_fp32():
    """A row whose stage output overflows fp16 is re-run through that stage in fp32 compute and carried on in fp32."""
    from inference.pipeline import StageRunner, split_model

    model = tiny_classifier("llama")
    ids, mask = right_padded([20, 12, 20])
    ids[1, 0] = 2  # a token no other row has (right_padded draws from 3..)
    with torch.no_grad():
        # row 1 starts with a one-hot embedding (normalised to 8 on unit k) and one MLP unit reads unit k with
        # weight 50 in gate and up: 8*50 squared = 160000 overflows fp16 (65504); other rows' unit k is ~N(0,1)
        k = 5
        emb = model.backbone.embed_tokens.weight
        emb[2] = 0.0
        emb[2, k] = 1.0
        mlp = model.backbone.layers[0].mlp
        mlp.gate_proj.weight[0, k] = 50.0
        mlp.up_proj.weight[0, k] = 50.0
        ref = model(ids, attention_mask=mask)
        assert torch.isfinite(ref).all()
        model.backbone.to(torch.float16)
        stages = split_model(model, [(0, 1), (1, 2)])
        runners = [StageRunner(s, "cpu") for s in stages]
        h, up, lost = runners[0].run(ids, mask, {}, set())
        assert not torch.isfinite(h[1]).all() and torch.isfinite(h[[0, 2]]).all()  # fp16 overflowed in row 1 only
        assert set(up) == {1} and up[1].dtype == torch.float32 and not lost
        logits, up2, lost = runners[1].run(h, mask, up, lost)
    assert up2 == {} and runners[0].fp32_reruns == 1 and runners[1].fp32_reruns == 0
    assert torch.isfinite(logits).all()
    assert (logits[1] - ref[1]).abs().max().item() < 1e-4  # the re-run row: fp32 compute on fp16 weights
    assert (logits[[0, 2]] - ref[[0, 2]]).abs().max().item() < 0.02  # fp16 rows: close to fp32


def test_out_of_memory_halves_the_micro_batch_in_a_stage():
    from inference.pipeline import StageRunner, split_model

    model = tiny_classifier("llama")
    ids, mask = right_padded([20, 20, 20, 20])
    stages = split_model(model, [(0, 1), (1, 2)])
    r = StageRunner(stages[0], "cpu", oom_above=45)  # 4 x 20 tokens do not "fit", 2 x 20 do
    with torch.no_grad():
        h, _, lost = r.run(ids, mask, {}, set())
        logits = stages[1](h, mask)
        ref = model(ids, attention_mask=mask)
    assert r.ooms == 1 and not lost and (logits - ref).abs().max().item() < 1e-5
    r = StageRunner(stages[0], "cpu", oom_above=10)  # not even one row fits: every row lost, NaN
    h, _, lost = r.run(ids, mask, {}, set())
    assert lost == {0, 1, 2, 3} and torch.isnan(h).all()


def test_fallback_plan_quantizes_what_fits_else_the_prior():
    from inference.pipeline import PipelinePool

    gb = 1024**3
    pool = PipelinePool(["cuda:0", "cuda:1"], model_bytes=int(18.5 * gb))  # Gemma2-9B fp16 on 2 x T4
    pool.device_bytes = [15 * gb, 15 * gb]
    assert pool.fallback_plan()[0] == "4bit"
    pool.fallback_quantize = "none"
    q, why = pool.fallback_plan()
    assert q is None and "no data-parallel copy fits" in why
    pool.fallback_quantize = "off"
    assert pool.fallback_plan()[0] is None
    cpu = PipelinePool(["cpu", "cpu"], model_bytes=int(18.5 * gb))
    assert cpu.fallback_plan()[0] == "none"  # host RAM: the same weights, unquantized


class _FakeProcess:
    def __init__(self, exitcode):
        self.exitcode = exitcode


def test_a_group_is_exited_when_any_stage_is():
    from inference.pipeline import StageGroup

    procs = [_FakeProcess(None), _FakeProcess(None)]
    group = StageGroup(procs, ["cuda:0", "cuda:1"])
    assert group.exitcode is None
    procs[1].exitcode = 3
    assert group.exitcode == 3
    procs[0].exitcode = -15  # stopped after the group was found dead: the first death is what is reported
    assert group.exitcode == 3 and group.describe_exit() == "stage 1 (cuda:1) exited with code 3"


# -- usage errors (before any process starts) ---------------------------------------------------------------------
def test_adapter_exports_are_refused_with_the_way_out(tiny_export_dir):
    from inference.pipeline import check_pipeline

    with pytest.raises(ValueError, match="lora.merge_on_export: true, or use --parallel data"):
        check_pipeline(str(tiny_export_dir), {"adapter": True}, 2, "none")
    check_pipeline(str(tiny_export_dir), {"adapter": False}, 2, "none")  # the full-weight export passes


def test_pipeline_usage_errors_exit_2(tiny_export_dir, sample_dir, tmp_path, capsys):
    from data.template import FormatConfig
    from inference.cli import main
    from inference.modeling import ArenaClassifier, save_pretrained
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    cfg = BertConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    save_pretrained(ArenaClassifier(BertModel(cfg)), None, bert, FormatConfig(max_length=128).to_dict())
    base = ["--test", str(sample_dir / "test.csv"), "--out", str(tmp_path / "sub.csv"), "--parallel", "pipeline"]
    for extra, expect in [
        (["--model", str(tiny_export_dir), "--devices", "cpu"], "needs at least 2 devices"),
        (["--model", str(tiny_export_dir), "--devices", "cpu:2", "--quantize", "8bit"], "drop --quantize"),
        (["--model", str(bert), "--devices", "cpu:2"], "supports decoder models (llama, gemma2, ...)"),
        (["--model", str(tiny_export_dir), "--devices", "cpu:3"], "2 layers cannot be split over 3 devices"),
    ]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert expect in err and "Traceback" not in err, err


# -- end to end: two stage processes on the CPU -------------------------------------------------------------------
REAL_ROWS = 60  # of the 999 real rows: tokenizing all of them twice costs minutes on 2 shared cores


@pytest.fixture(scope="module")
def real_rows(tmp_path_factory):
    """The first real rows of the shared sample, plus two odd ones (malformed JSON, empty cells)."""
    import csv

    from tests.conftest import REAL_TRAIN

    if not REAL_TRAIN.exists():
        pytest.skip(f"real sample not found: {REAL_TRAIN}")
    with open(REAL_TRAIN, newline="") as f:
        rows = [{k: r[k] for k in ("id", "prompt", "response_a", "response_b")}
                for _, r in zip(range(REAL_ROWS), csv.DictReader(f))]
    rows += [{"id": "9000001", "prompt": '["hi"', "response_a": '["hello"]', "response_b": '["hey"]'},
             {"id": "9000002", "prompt": "", "response_a": "", "response_b": ""}]
    path = tmp_path_factory.mktemp("real") / "test.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "prompt", "response_a", "response_b"])
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def data_parallel_probs(tiny_export_dir, real_rows, tmp_path_factory):
    from inference.predict import EXIT_OK, PredictConfig, predict
    from tests.test_predict import read_sub

    out = tmp_path_factory.mktemp("data") / "sub.csv"
    result = predict(PredictConfig(models=(str(tiny_export_dir),), test=str(real_rows), out=str(out), devices="cpu",
                                   time_budget=None, batch_tokens=2048))
    assert result.exit_code == EXIT_OK, result.messages
    return read_sub(out)[1]


@pytest.mark.distributed
def test_pipeline_on_two_cpu_processes_equals_data_parallel_on_real_rows(data_parallel_probs, tiny_export_dir,
                                                                          real_rows, tmp_path, capsys):
    from inference.cli import main
    from inference.submission import validate_submission
    from tests.test_predict import read_sub, test_ids

    out = tmp_path / "sub.csv"
    code = main(["--model", str(tiny_export_dir), "--test", str(real_rows), "--out", str(out), "--devices", "cpu:2",
                 "--parallel", "pipeline", "--micro-batches", "3", "--batch-tokens", "2048", "--time-budget", "none",
                 "--log-level", "WARNING"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "odd input rows predicted best-effort (ids 9000001, 9000002)" in err  # odd rows: named, still scored
    ids, probs = read_sub(out)
    assert ids == test_ids(real_rows) and validate_submission(out, ids) == []
    assert np.abs(probs - data_parallel_probs).max() < 1e-5
    assert np.abs(probs - probs.mean(axis=0)).max() > 1e-3  # rows differ: not a constant (prior) file


@pytest.mark.distributed
def test_killed_stage_hands_the_rows_to_a_data_parallel_fallback(data_parallel_probs, tiny_export_dir, real_rows,
                                                                 tmp_path, monkeypatch):
    from inference.predict import EXIT_DEGRADED, PredictConfig, predict
    from inference.submission import validate_submission
    from tests.test_predict import read_sub

    monkeypatch.setenv("ARENA_DEBUG_STAGE_EXIT_AFTER", "1:2")  # the last stage dies after 2 batches
    out = tmp_path / "sub.csv"
    result = predict(PredictConfig(models=(str(tiny_export_dir),), test=str(real_rows), out=str(out),
                                   devices="cpu:2", time_budget=None, batch_tokens=2048, parallel="pipeline"))
    assert result.exit_code == EXIT_DEGRADED
    text = "\n".join(result.messages)
    assert "worker 0 (pipeline over cpu,cpu) died (exit code 3) after 2 batches" in text, text
    assert "stage 1 (cpu) exited with code 3; pipeline group lost; the remaining rows go to a data-parallel " \
           "fallback: 1 worker(s) with unquantized copies on cpu" in text, text
    ids, probs = read_sub(out)
    assert validate_submission(out, ids) == []
    assert np.abs(probs - data_parallel_probs).max() < 1e-5  # nothing lost: the fallback scored the rest


@pytest.mark.distributed
def test_killed_stage_without_fallback_gives_the_prior_and_says_so(tiny_export_dir, sample_dir, tmp_path,
                                                                   monkeypatch, capsys):
    from inference.cli import main
    from inference.submission import validate_submission
    from tests.test_predict import read_sub, test_ids

    monkeypatch.setenv("ARENA_DEBUG_STAGE_EXIT_AFTER", "0:1")  # the first stage dies after sending 1 batch
    out = tmp_path / "sub.csv"
    code = main(["--model", str(tiny_export_dir), "--test", str(sample_dir / "test.csv"), "--out", str(out),
                 "--devices", "cpu:2", "--parallel", "pipeline", "--fallback-quantize", "off", "--batch-tokens", "2048",
                 "--time-budget", "none", "--log-level", "ERROR"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "DEGRADED: worker 0 (pipeline over cpu,cpu) died (exit code 3)" in err
    assert "no data-parallel fallback (--fallback-quantize off): the remaining rows get the prior" in err
    assert "rows got the prior" in err
    ids, probs = read_sub(out)
    assert ids == test_ids(sample_dir / "test.csv") and validate_submission(out, ids) == []
    prior = np.all(np.isclose(probs, [0.35, 0.35, 0.30]), axis=1)
    assert 0 < prior.sum() < len(ids)  # the batch that made it through stage 1 is scored, the rest is the prior


@pytest.mark.distributed
def test_slow_pipeline_finishes_within_budget(tiny_export_dir, sample_dir, tmp_path, monkeypatch):
    from inference.predict import EXIT_DEGRADED, PredictConfig, predict
    from inference.submission import validate_submission
    from tests.test_predict import test_ids

    monkeypatch.setenv("ARENA_DEBUG_SLEEP_PER_BATCH", "1.5")
    budget = 20.0
    t0 = time.monotonic()
    # 1024-token batches: 2 rows with TTA, 60 rows: 30 batches x 1.5 s in the one group > the budget
    result = predict(PredictConfig(models=(str(tiny_export_dir),), test=str(sample_dir / "test.csv"),
                                   out=str(tmp_path / "sub.csv"), devices="cpu:2", parallel="pipeline",
                                   time_budget=budget, batch_tokens=1024, checkpoint_every=2.0), t0=t0)
    elapsed = time.monotonic() - t0
    assert elapsed <= budget + 2.0, elapsed
    assert result.exit_code == EXIT_DEGRADED
    text = "\n".join(result.messages)
    # the swaps (phase 2) are dropped first and said to be; then first views are shortened or cut by the deadline
    assert "TTA: " in text and "got both views" in text, text
    assert "max_length" in text or "prior" in text or "time budget reached" in text, text
    assert validate_submission(tmp_path / "sub.csv", test_ids(sample_dir / "test.csv")) == []
