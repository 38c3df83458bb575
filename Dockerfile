# The dgserve serving image: CUDA 12.8, a CUDA build of torch 2.13.0, dgserve (Ray Serve, the gateway, the
# client) and nccl-tests (for the Helm chart's fabric check). KubeRay runs `ray start` in it; the chart's pods run
# `dgserve drain-pod` as their preStop hook and `dgserve-client health` as the gateway's TLS readiness probe.
#
#   docker build -t REGISTRY/dgserve:0.1.0 .
#   docker push REGISTRY/dgserve:0.1.0      # then: helm install ... --set image.repository=REGISTRY/dgserve
#
# Not built in this project's CI: its machines have no Docker engine and no CUDA (see docs/deploy.md).
ARG CUDA_VERSION=12.8.1
ARG UBUNTU=ubuntu24.04

# nccl-tests, built against the NCCL of NVIDIA's CUDA repository (alltoall_perf and friends, no MPI: one process
# drives all of a pod's GPUs, which is what the fabric check runs inside each pod).
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS nccl-tests
ARG NCCL_TESTS_REF=v2.16.4
RUN apt-get update && apt-get install -y --no-install-recommends git libnccl2 libnccl-dev \
    && rm -rf /var/lib/apt/lists/*
RUN git clone --depth 1 --branch ${NCCL_TESTS_REF} https://github.com/NVIDIA/nccl-tests /opt/nccl-tests \
    && make -C /opt/nccl-tests -j"$(nproc)" NCCL_HOME=/usr CUDA_HOME=/usr/local/cuda

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/dgserve PATH=/opt/dgserve/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv libnccl2 wget \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/dgserve
# torch first, from PyTorch's CUDA 12.8 index and pinned as in pyproject (the PyPI default would be a CPU build
# on some platforms); dgserve's own install then keeps it.
RUN pip install --upgrade pip && pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client ./client
COPY model ./model
COPY cluster ./cluster
COPY kernels ./kernels
COPY protos ./protos
RUN pip install ./client . && python -c "import torch, dgserve.cluster.app; assert torch.version.cuda"
COPY --from=nccl-tests /opt/nccl-tests/build /opt/nccl-tests/build
# Ray's processes run as this user; the chart mounts the model cache at /models (HF_HOME=/models/huggingface).
RUN useradd --create-home --uid 1000 ray && mkdir -p /models && chown ray /models
USER ray
WORKDIR /home/ray
