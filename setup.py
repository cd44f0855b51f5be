"""Arena preference models: train and serve 3-class (A / B / tie) classifiers for Chatbot Arena battles.

The base install is what the offline Kaggle inference kernel needs; training, GPU kernels and tests are extras.
"""
from setuptools import find_packages, setup

# Versions checked on the CPU machines (see README "Versions"); the Dockerfile pins the same ones (tested).
BASE = [
    "torch>=2.4",
    "transformers>=5.0,<6",
    "peft>=0.13",
    "pandas>=2.0",
    "numpy>=1.26",
    "tqdm>=4.66",
    "safetensors>=0.4",
    "pyyaml>=6.0",
]
EXTRAS = {
    "train": ["deepspeed>=0.15", "accelerate>=1.0", "datasets>=3.0", "wandb>=0.18", "tokenizers>=0.20", "matplotlib>=3.8"],
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
