# syntax=docker/dockerfile:1
#
# Two images from one file:
#   docker build --target gateway -t gcr-gateway .   # FastAPI gateway, no torch (~200 MB)
#   docker build --target worker  -t gcr-worker  .   # GPU worker: torch + diffusers
#
# Every step installs from Debian (apt) or a Python package index: PyPI, or the
# PyTorch wheel index when TORCH_INDEX_URL points there. Nothing else is fetched.
#
# Why the worker is python:3.11-slim and not pytorch/pytorch or nvidia/cuda:
# torch's Linux wheels carry their own CUDA runtime, cuDNN and NCCL (the nvidia-*
# wheels), so a CUDA base image would only add a second copy of those libraries.
# The pytorch/pytorch images are conda-based and tie the Python version to the
# image; nvidia/cuda is Ubuntu and has no Python 3.11. The container needs only
# the host's NVIDIA driver, which the NVIDIA Container Toolkit mounts in.

# Pinned to a patch release, so two builds start from the same Python.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN groupadd --system --gid 10001 gcr \
    && useradd --system --uid 10001 --gid gcr --create-home --home-dir /home/gcr gcr \
    && mkdir -p /artifacts && chown gcr:gcr /artifacts  # the images volume (compose) starts owned by gcr

# ---------------------------------------------------------------------------------
# The project as two wheels (gcr-sdk and gcr-service); both runtime images install them
# and neither keeps the source tree.
FROM base AS wheel
WORKDIR /src
# .dockerignore is an allow-list: this copies pyproject.toml, README.md, LICENSE, sdk/ and
# the packages (gcr/, service/, workers/); tests/unit/test_build_context.py builds the
# wheels from exactly that context and checks they hold every package declared.
# Two wheels: gcr-sdk (sdk/, the `gcr` package) and gcr-service, which depends on it.
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels ./sdk .

# ---------------------------------------------------------------------------------
FROM base AS gateway
# constraints/lock.txt (scripts/lock) pins every package, for the images, scripts/setup
# and CI alike, so what ships is what the tests ran.
# COPY --from, not a bind mount from the stage: buildah 1.28 loses a cached stage's
# mount source (podman users build this file too). The wheel is ~1 MB.
COPY --from=wheel /wheels /wheels
RUN --mount=type=bind,source=constraints,target=/constraints \
    pip install -c /constraints/lock.txt /wheels/gcr_sdk-*.whl /wheels/gcr_service-*.whl
# numeric (the gcr user): a kubelet can check runAsNonRoot only against a number
USER 10001:10001
WORKDIR /home/gcr
EXPOSE 8000
# /healthz is liveness only; /readyz also needs a live worker, which a gateway
# container must not wait for (see deploy/k8s/gateway.yaml).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# Flags, not GCR_HOST/GCR_PORT: inside the container the port is fixed; map it outside.
CMD ["gcr", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------
FROM base AS worker
# torch and torchvision at the versions of constraints/worker.in (torchvision: Qwen-Image-
# Edit's processor needs it). From PyPI by default, whose Linux x86_64 torch 2.13.0 is a
# CUDA 13.0 build (torch.version.cuda == "13.0"): it needs NVIDIA driver >= 580. For
# another CUDA, use PyTorch's index (its +cuXXX builds sort above PyPI's), e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126   (driver >= 525)
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu     (no GPU; see deploy/compose.dev.yml)
ARG TORCH_INDEX_URL=https://pypi.org/simple
# torchvision comes from the same index as torch, so the two are one build (PyPI's
# torchvision beside a CPU torch from elsewhere fails: "operator torchvision::nms does not
# exist"). The check after the install fails the build on a mismatched pair.
# TORCHVISION=false leaves it out: only Qwen-Image-Edit's processor needs it, and a folder
# of torch wheels without a torchvision of the same build (the container test's CPU torch)
# has none to give.
ARG TORCHVISION=true
# A folder of wheels pip also looks in (mounted into the build, e.g. `podman build -v`);
# empty: none.
ARG PIP_FIND_LINKS=
# Own layer before the project: torch (several GB) stays cached across code changes.
# torchvision.ops.nms is the call that fails on a mismatched pair.
RUN --mount=type=bind,source=constraints,target=/constraints \
    if [ "${TORCHVISION}" = true ]; then set -- torch torchvision; else set -- torch; fi \
    && pip install -c /constraints/lock.txt \
        --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple "$@" \
    && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
    && if [ "${TORCHVISION}" = true ]; then \
        python -c "import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)"; \
    fi
COPY --from=wheel /wheels /wheels
RUN --mount=type=bind,source=constraints,target=/constraints \
    pip install -c /constraints/lock.txt /wheels/gcr_sdk-*.whl "$(echo /wheels/gcr_service-*.whl)[worker]"
# NOTE: a named volume mounted on an empty image directory starts with the image's
# ownership, so these two must exist and belong to gcr before the volume is attached.
RUN mkdir -p /cache/huggingface /cache/gcr && chown -R gcr:gcr /cache
# No NVIDIA_VISIBLE_DEVICES=all (nvidia/cuda sets it): on hosts whose default runtime
# is nvidia it would hand every GPU to a container that reserved none. The GPU
# reservation (compose) or device plugin (k8s) says which GPU this container sees.
ENV HF_HOME=/cache/huggingface \
    GCR_CACHE_DIR=/cache/gcr \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/gcr
# SIGTERM drains: the worker stops claiming, lets running jobs finish for up to 30 s,
# then hands the rest back to the queue. Allow for that before SIGKILL
# (compose stop_grace_period / k8s terminationGracePeriodSeconds: 60s).
CMD ["gcr", "worker"]
