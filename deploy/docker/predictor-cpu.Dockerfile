# syntax=docker/dockerfile:1.7
# neurotwin firing-rate predictor on CPU (ONNX Runtime). Build from the repository root:
#   docker build -f deploy/docker/predictor-cpu.Dockerfile -t neurotwin/predictor:0.1.0-cpu .
# The model store is mounted at /models; to bake one in instead:
#   docker build ... --build-arg MODEL_STORE=model_store .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG MODEL_STORE=deploy/docker/empty-model-store

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/neurotwin
ENV PATH=/opt/neurotwin/bin:${PATH}
# neurotwin depends on torch (training, synthesis); taking it from the CPU index first keeps the
# several GB of CUDA wheels that PyPI's default build pulls out of a CPU image.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.4"
COPY pyproject.toml README.md LICENSE /src/
COPY services /src/services
RUN pip install "/src[cpu]" && python -c "import onnxruntime, neurotwin.cli"

# A stage of its own so that COPY can take the store from a build argument.
FROM scratch AS model-store
ARG MODEL_STORE
COPY ${MODEL_STORE} /

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 neurotwin \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin neurotwin
COPY --from=build /opt/neurotwin /opt/neurotwin
COPY --from=model-store --chown=10001:10001 / /models
# HOME and caches point at /tmp, the only writable path when the root filesystem is read-only.
ENV PATH=/opt/neurotwin/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    NEUROTWIN_MODEL_STORE=/models
USER 10001:10001
WORKDIR /tmp
# HTTP/REST (Open Inference Protocol, Triton's port), gRPC, Prometheus metrics, plaintext health
# (for kubelet probes, which cannot speak TLS).
EXPOSE 8000 8001 8002 8003
ENTRYPOINT ["neurotwin", "serve"]
CMD ["predictor", "--host", "0.0.0.0", "--port", "8001", "--http-port", "8000", "--metrics-port", "8002", \
     "--metrics-host", "0.0.0.0", "--model-store", "/models"]
