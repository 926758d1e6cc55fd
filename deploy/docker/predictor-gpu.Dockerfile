# syntax=docker/dockerfile:1.7
# neurotwin firing-rate predictor on an NVIDIA GPU (onnxruntime-gpu, CUDA execution provider).
# Build from the repository root:
#   docker build -f deploy/docker/predictor-gpu.Dockerfile -t neurotwin/predictor:0.1.0-gpu .
# The CUDA major of the base image must match the one the onnxruntime-gpu wheel was built for;
# override both together (ORT_GPU, ORT_INDEX_URL) when ONNX Runtime changes its default CUDA.
# The model store is mounted at /models, or baked in with --build-arg MODEL_STORE=model_store.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG MODEL_STORE=deploy/docker/empty-model-store

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/neurotwin
ENV PATH=/opt/neurotwin/bin:${PATH}
# The predictor runs on ONNX Runtime; torch is only a package dependency, so the CPU wheel does.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.4"
ARG ORT_GPU="onnxruntime-gpu>=1.23"
ARG ORT_INDEX_URL=""
COPY pyproject.toml README.md LICENSE /src/
COPY services /src/services
RUN pip install ${ORT_INDEX_URL:+--extra-index-url "${ORT_INDEX_URL}"} "/src" "${ORT_GPU}" \
 && python -c "import onnxruntime as ort; assert 'CUDAExecutionProvider' in ort.get_available_providers()"

FROM scratch AS model-store
ARG MODEL_STORE
COPY ${MODEL_STORE} /

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# The venv links to this interpreter, so the runtime stage installs the same python3.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 neurotwin \
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
    NEUROTWIN_MODEL_STORE=/models \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /tmp
# HTTP/REST (Open Inference Protocol, Triton's port), gRPC, Prometheus metrics, plaintext health.
EXPOSE 8000 8001 8002 8003
ENTRYPOINT ["neurotwin", "serve"]
CMD ["predictor", "--host", "0.0.0.0", "--port", "8001", "--http-port", "8000", "--metrics-port", "8002", \
     "--metrics-host", "0.0.0.0", "--model-store", "/models"]
