# GPU image: NGC PyTorch ships CUDA torch, transformer-engine and apex; we add megatron-core and the
# project. Build:  docker build -t megatron-rspo .
# Run:            docker run --gpus all --ipc=host -it -v $PWD/runs:/workspace/megatron-rspo/runs megatron-rspo
# Pick an NGC release whose Python is 3.11 or 3.12 and whose torch/TE megatron-core 0.16.1 supports.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/megatron-rspo
# NGC images pin their own packages through PIP_CONSTRAINT, which refuses megatron-core's and our
# requirements; Megatron's install guide clears it the same way.
ENV PIP_CONSTRAINT=
COPY pyproject.toml README.md ./
COPY megatron_rspo ./megatron_rspo
# --no-deps for torch/TE/apex: keep the image's CUDA builds; install everything else.
RUN pip install --no-cache-dir "megatron-core==0.16.1" && \
    pip install --no-cache-dir -e ".[hf,plot]" && \
    python -c "import transformer_engine, megatron.core, megatron_rspo; print('TE', transformer_engine.__version__)"
COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY docs ./docs
COPY tests ./tests
ENV PYTHONUNBUFFERED=1
