# Training image for arena-pref: CUDA 12.8 + PyTorch 2.8.0 (from the base image), the pinned training stack
# (DeepSpeed, flash-attn, transformers, peft, ...) and this project, run as a non-root user.
#
# Build (flash-attn compiles from source when no prebuilt wheel matches: up to ~1 h with MAX_JOBS=4, needs
# ~4 GB RAM per job; raise MAX_JOBS on a big build machine):
#   docker build -t arena-pref --build-arg MAX_JOBS=4 .
#
# Train (DATA is a host directory holding train.csv; point the config's data paths and output directory
# under /data, directly or with key=value overrides after the config file, so the run outlives the container):
#   docker run --gpus all -v DATA:/data IMAGE launch/train.sh configs/gemma2/9b_full.yaml
# Multi-GPU runs need more shared memory than Docker's 64 MB default for NCCL: add --ipc=host (or --shm-size=16g).
# Hub downloads are cached in the container's home; keep them across runs with -e HF_HOME=/data/hf-cache.
# The container runs as uid 1000: a DATA directory owned by another uid needs --user "$(id -u):$(id -g)".
#
# Every pip package below is pinned (==) and the pins must satisfy setup.py: tests/test_dockerfile.py checks it.

FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel

ARG MAX_JOBS=4
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive

# git: flash-attn's setup.py shells out to it. The torch of the base image is frozen through a constraints file
# so that no later install can swap it for another build (a different CUDA or a CPU wheel).
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && python -c "import sys; assert sys.version_info >= (3, 11), 'pandas 3 / numpy 2.4 need Python >= 3.11'" \
    && python -c "import torch; print(f'torch=={torch.__version__}')" > /etc/pip-constraints.txt \
    && python -c "import torch; assert torch.__version__.startswith('2.8.0') and torch.version.cuda.startswith('12.8'), torch.__version__"
ENV PIP_CONSTRAINT=/etc/pip-constraints.txt

# Build tools for the two packages compiled against the image's torch (--no-build-isolation below).
RUN pip install \
    ninja==1.13.2 \
    packaging==26.3 \
    psutil==7.2.2 \
    wheel==0.48.0 \
    einops==0.8.2

# The project's runtime (setup.py BASE) and the `train` extra, at the versions tested on the CPU machines.
RUN pip install \
    transformers==5.23.0 \
    accelerate==1.15.0 \
    peft==0.21.2 \
    datasets==5.2.0 \
    tokenizers==0.23.3 \
    safetensors==0.8.0 \
    wandb==0.31.0 \
    pandas==3.1.1 \
    numpy==2.4.6 \
    tqdm==4.70.1 \
    pyyaml==6.0.3 \
    matplotlib==3.11.2

# DeepSpeed sees the image's CUDA torch at install time (its ops are compiled just in time on first use, into
# TORCH_EXTENSIONS_DIR below); flash-attn compiles its kernels against that same torch.
RUN pip install --no-build-isolation deepspeed==0.19.8 \
    && MAX_JOBS=${MAX_JOBS} pip install --no-build-isolation flash-attn==2.8.3 \
    && pip install bitsandbytes==0.50.2

# Fail the build, not the first training run, if the stack does not import together.
RUN python -c "import torch, transformers, peft, accelerate, datasets, deepspeed, flash_attn, bitsandbytes, wandb, matplotlib; print('torch', torch.__version__, 'flash_attn', flash_attn.__version__, 'deepspeed', deepspeed.__version__)"

RUN useradd --create-home --uid 1000 --shell /bin/bash arena \
    && mkdir -p /data /workspace/arena \
    && chown arena:arena /data /workspace/arena
ENV HOME=/home/arena \
    HF_HOME=/home/arena/.cache/huggingface \
    TORCH_EXTENSIONS_DIR=/home/arena/.cache/torch_extensions \
    TRITON_CACHE_DIR=/home/arena/.cache/triton

WORKDIR /workspace/arena
COPY --chown=arena:arena . .
# --no-deps: every dependency is already pinned above; the project's own console scripts get installed.
RUN pip install --no-deps . \
    && find launch -name '*.sh' -exec chmod 755 {} + \
    && python -c "import data, training, inference"

USER arena
CMD ["bash"]
