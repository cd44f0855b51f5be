"""Synthetic competition files with the real data's quirks and a planted, learnable preference signal.

Quirks: multi-turn battles, JSON null turns, emoji / accents / CJK, lone surrogate escapes, long-tailed lengths,
repeated prompts (so fold splitting must group them). Signal: every turn of a "good" response opens with a helpful
phrase and is longer; "bad" ones open with a hedge. The better response wins, equal quality is a tie, and 10% of labels
(`label_noise`) are redrawn at random, so a small model can learn it but never reach zero loss.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

MODELS = ["gpt-4-1106-preview", "gpt-4-0613", "claude-2.1", "claude-instant-1", "llama-2-70b-chat", "mixtral-8x7b-instruct-v0.1",
          "gemini-pro", "vicuna-13b", "mistral-medium", "gpt-3.5-turbo-0613", "zephyr-7b-beta", "qwen-14b-chat"]
TOPICS = ["pizza", "quantum computing", "the French revolution", "sorting algorithms", "climate policy", "a haiku about rain",
          "Python decorators", "marathon training", "tax brackets", "black holes", "sourdough bread", "the stock market",
          "Rust lifetimes", "café culture in Paris", "東京の天気", "emoji 😀 etiquette", "Dvořák's symphonies", "chess openings"]
ASKS = ["Explain {t} to me.", "What do you think about {t}?", "Write a short poem about {t}.", "Give me three facts about {t}.",
        "How would you summarise {t} for a child?", "Is {t} overrated? Be honest."]
GOOD_OPEN = ["Certainly! Here is a clear answer about {t}.", "Great question! Let me explain {t} step by step."]
BAD_OPEN = ["I'm not sure, maybe {t} is something.", "Sorry, I cannot really help with {t}."]
FILLER = ["It has a long history and many interesting details.", "Experts often disagree on the finer points.",
          "One key idea is to start simple and build up.", "**Note:** context matters a great deal here.",
          "For example, consider the most common case first.", "In summary, there are trade-offs to weigh.",
          "Many people find this surprising at first — c'est la vie.", "数据 shows a clear trend over time.",
          "- point one\n- point two\n- point three", "Let's be careful with the numbers: 3.14, 2.71, 42."]


def _response(rng: random.Random, topic: str, good: bool) -> str:
    opener = rng.choice(GOOD_OPEN if good else BAD_OPEN).format(t=topic)
    # long tail: most answers are short, a few are very long (lognormal sentence count)
    n = max(1, int(rng.lognormvariate(2.3 if good else 1.6, 0.9)))
    return " ".join([opener] + [rng.choice(FILLER) for _ in range(min(n, 400))])


def make_rows(n: int, seed: int = 0, labels: bool = True, label_noise: float = 0.10) -> list[dict]:
    rng = random.Random(seed)
    prompts_pool: list[list[str]] = []
    rows = []
    for i in range(n):
        if prompts_pool and rng.random() < 0.08:  # repeated prompt, as in the real data
            prompt = list(rng.choice(prompts_pool))
        else:
            n_turns = rng.choices([1, 2, 3, 5], weights=[75, 15, 7, 3])[0]
            prompt = [rng.choice(ASKS).format(t=rng.choice(TOPICS)) for _ in range(n_turns)]
            prompts_pool.append(prompt)
        truth = rng.choices([0, 1, 2], weights=[35, 35, 30])[0]  # the real label balance
        qa, qb = {0: (True, False), 1: (False, True)}.get(truth, (rng.random() < 0.5,) * 2)
        topics = [next((t for t in TOPICS if t in p), "it") for p in prompt]
        ra = [_response(rng, t, qa) for t in topics]
        rb = [_response(rng, t, qb) for t in topics]
        for turns in (ra, rb):
            if rng.random() < 0.03:
                turns[rng.randrange(len(turns))] = None  # JSON null turn
        label = truth
        if rng.random() < label_noise:  # redrawn uniformly: 2/3 of these become a wrong label
            label = rng.randrange(3)
        ascii_json = rng.random() < 0.5
        dump = lambda x: json.dumps(x, ensure_ascii=ascii_json)  # noqa: E731
        pa = dump(prompt)
        if rng.random() < 0.01:
            pa = pa[:-2] + ' \\ud83d"]'  # lone high surrogate, as in real cells
        ma, mb = rng.sample(MODELS, 2)
        row = {"id": 1000 + i * 7 + rng.randrange(7), "model_a": ma, "model_b": mb, "prompt": pa,
               "response_a": dump(ra), "response_b": dump(rb)}
        if labels:
            row.update(winner_model_a=int(label == 0), winner_model_b=int(label == 1), winner_tie=int(label == 2))
        rows.append(row)
    return rows


def write_sample(out_dir: str | Path, rows: int = 2000, seed: int = 0, test_rows: int | None = None,
                 label_noise: float = 0.10) -> dict[str, Path]:
    """Write train.csv, test.csv and sample_submission.csv in the exact Kaggle format. Returns their paths.

    label_noise: share of train.csv labels redrawn at random (0: clean labels, e.g. for a validation file)."""
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"--label-noise must be in [0, 1], got {label_noise}")
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_rows = max(3, rows // 4) if test_rows is None else test_rows
    train = pd.DataFrame(make_rows(rows, seed, label_noise=label_noise))
    test = pd.DataFrame(make_rows(test_rows, seed + 1_000_003, labels=False))
    test["id"] = test["id"] + 10_000_000  # never collide with train ids
    test = test[["id", "prompt", "response_a", "response_b"]]
    sub = pd.DataFrame({"id": test["id"], "winner_model_a": 1 / 3, "winner_model_b": 1 / 3, "winner_tie": 1 / 3})
    paths = {"train": out / "train.csv", "test": out / "test.csv", "sample_submission": out / "sample_submission.csv"}
    train.to_csv(paths["train"], index=False)
    test.to_csv(paths["test"], index=False)
    sub.to_csv(paths["sample_submission"], index=False)
    return paths
