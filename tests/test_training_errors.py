"""arena-train reports bad input with a message naming the file / key, exit status 2, no traceback."""
import os
import subprocess
import sys

from tests.conftest import ROOT


def _train(*args):
    return subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nmodel: [1,\n")
    r = _train("--config", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad}: not valid YAML (line 3" in r.stderr


def test_malformed_override_names_the_override():
    r = _train("--config", "configs/tiny/llama_cpu.yaml", "train.lr=[1,")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "override 'train.lr=[1,'" in r.stderr


def test_broken_train_csv_names_file_and_column(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("id,prompt\n1,2\n")
    r = _train("--config", "configs/tiny/llama_cpu.yaml", f"data.train_csv={csv}", f"output_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{csv}: column response_a: missing column" in r.stderr


def test_empty_validation_fold_is_refused_before_the_first_step(tmp_path):
    from data.synthetic import write_sample

    csv = write_sample(tmp_path / "data", rows=8, seed=0, test_rows=1)["train"]
    out = tmp_path / "run"
    r = _train("--config", "configs/tiny/llama_cpu.yaml", f"data.train_csv={csv}", f"output_dir={out}",
               "data.num_folds=40", "data.valid_fold=39", "deepspeed.config=configs/deepspeed/zero2.json",
               "deepspeed.param_persistence_threshold=null")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "data.valid_fold=39: fold 39 of data.num_folds=40 holds no rows" in r.stderr
    assert not (out / "metrics.jsonl").exists()


def test_hub_id_offline_and_not_cached_is_one_clear_line(sample_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "training", "--config", "configs/tiny/llama_cpu.yaml", "model.tiny=null",
                        "model.name_or_path=google/gemma-2-9b", "data.tokenizer=null", f"output_dir={tmp_path / 'run'}",
                        f"data.train_csv={sample_dir / 'train.csv'}"],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                            "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("arena-train:")]
    assert len(lines) == 1 and "model.name_or_path=google/gemma-2-9b" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_a_hub_id_in_the_hf_cache_trains_offline(tiny_export_dir, sample_dir, tmp_path):
    """A hub id resolved from the Hugging Face cache (its on-disk layout: models--ORG--NAME/snapshots/REV + refs)."""
    import shutil

    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--arena-test--tiny-llama"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_export_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "training", "--config", "configs/tiny/llama_cpu.yaml", "model.tiny=null",
                        "model.name_or_path=arena-test/tiny-llama", "data.tokenizer=null",
                        f"data.train_csv={sample_dir / 'train.csv'}", f"output_dir={out}",
                        "deepspeed.config=configs/deepspeed/zero2.json", "deepspeed.param_persistence_threshold=null",
                        "train.max_steps=2", "train.eval_every=0", "train.save_every=0", "train.export=last"],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                            "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(hub)})
    assert r.returncode == 0, r.stderr[-4000:]
    assert (out / "final" / "model.safetensors").exists()
