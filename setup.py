"""Arena preference models: train and serve 3-class (A / B / tie) classifiers for Chatbot Arena battles.

The base install is what the offline Kaggle inference kernel needs; training, GPU kernels and tests are extras.
"""
from setuptools import find_packages, setup

# Ranges of what the code supports; constraints.txt locks the exact versions the CPU tests run with (CI and the
# quickstart install through it; refresh with launch/lock.sh). Lower bounds of the ML stack are the versions tested
# (the code uses transformers 5 / peft APIs that older releases lack); the Dockerfile pins the same (tested).
BASE = [
    "torch>=2.4",  # Kaggle's image brings its own CUDA torch
    "transformers>=5.23,<6",
    "peft>=0.21",
    "pandas>=2.0",
    "numpy>=1.26",
    "tqdm>=4.66",
    "safetensors>=0.4",
    "pyyaml>=6.0",
]
EXTRAS = {
    # deepspeed>=0.19.8: LoRA + ZeRO-3 + non-reentrant gradient checkpointing crashes in backward before it
    # (CheckpointError: Recomputed values ... shape [1024] vs [0], transformers issue 47254)
    "train": ["deepspeed>=0.19.8", "accelerate>=1.15", "datasets>=5.0", "wandb>=0.18", "tokenizers>=0.23",
              "matplotlib>=3.8"],
    "gpu": ["flash-attn>=2.6", "bitsandbytes>=0.45"],
    "test": ["pytest>=8", "hypothesis>=6.100", "scikit-learn>=1.4", "tiktoken>=0.7", "bitsandbytes>=0.45"],
}

setup(
    name="arena-pref",
    version="0.1.0",
    description="Preference models for Chatbot Arena battles (Kaggle LLM Classification Finetuning)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["data", "data.*", "training", "training.*", "inference", "inference.*"]),
    install_requires=BASE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "arena-data=data.cli:main",
            "arena-train=training.cli:main",
            "arena-predict=inference.cli:main",
        ]
    },
)
