# syntax=docker/dockerfile:1.7
# neurotwin stimulus synthesizer (and closed-loop service): torch on an NVIDIA GPU.
# Build from the repository root:
#   docker build -f deploy/docker/synthesizer.Dockerfile -t neurotwin/synthesizer:0.1.0-cuda .
# The CUDA runtime, cuDNN and cuBLAS come inside PyTorch's CUDA wheels, so the base is plain Python
# and the node only has to provide the driver (NVIDIA container toolkit / GPU operator).
# A CPU-only image from the same file:
#   docker build ... --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#     -t neurotwin/synthesizer:0.1.0-cpu .
# The model store is mounted at /models, or baked in with --build-arg MODEL_STORE=model_store.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG MODEL_STORE=deploy/docker/empty-model-store

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/neurotwin
ENV PATH=/opt/neurotwin/bin:${PATH}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.9"
COPY pyproject.toml README.md LICENSE /src/
COPY services /src/services
# ONNX Runtime (CPU) is there for the ONNX-side checks of stored twins; synthesis itself runs in torch.
RUN pip install "/src[cpu]" && python -c "import torch, neurotwin.cli"

FROM scratch AS model-store
ARG MODEL_STORE
COPY ${MODEL_STORE} /

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 neurotwin \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin neurotwin
COPY --from=build /opt/neurotwin /opt/neurotwin
COPY --from=model-store --chown=10001:10001 / /models
ENV PATH=/opt/neurotwin/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    NEUROTWIN_MODEL_STORE=/models \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /tmp
EXPOSE 8001 8002 8003
ENTRYPOINT ["neurotwin", "serve"]
CMD ["synthesizer", "--host", "0.0.0.0", "--port", "8001", "--metrics-port", "8002", \
     "--metrics-host", "0.0.0.0", "--model-store", "/models"]
