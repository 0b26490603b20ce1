# syntax=docker/dockerfile:1
#
# The membrane image. Every control-plane service runs from it as `membrane run SERVICE`
# (see k8s/, whose manifests reference it as ghcr.io/membrane-project/membrane):
#
#   docker build -t ghcr.io/membrane-project/membrane:0.1.0 .
#   docker run --rm ghcr.io/membrane-project/membrane:0.1.0 run identity --help
#
# The agent DaemonSet (k8s/agent.yaml) runs the same image: it carries Debian's bcc
# (python3-bpfcc + libbpfcc: the BCC Python bindings are not on PyPI), iproute2, the compiled
# CNI plugin, and membrane-kernel-headers (scripts/kernel-headers.sh), which the agent's init
# container runs to make the node's kernel headers findable by bcc (docs/kubernetes.md says
# what a node must provide). Not built on the machine this was written on (no Docker engine
# there): tests/unit/test_dockerfile.py checks what can be checked without building it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- compiled parts: the CNI plugin, a static binary the node's runtime executes (no Python on
# the host), and the Maglev fill loop the agents load with ctypes (shared/maglev.py) ----------
FROM ${PYTHON_IMAGE} AS cni
RUN apt-get update \
    && apt-get install --yes --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY cni/membrane-cni.c shared/maglev_fill.c /src/
RUN gcc -O2 -static -Wall -Wextra -Werror -o /membrane-cni /src/membrane-cni.c \
    && gcc -O2 -shared -fPIC -Wall -Wextra -Werror -o /_maglev_fill.so /src/maglev_fill.c

# --- build: a virtualenv with the pinned dependencies, then the project -----------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/membrane
ENV PATH=/opt/membrane/bin:$PATH

WORKDIR /src
# the dependencies first, in their own layer: it is rebuilt only when the lock changes.
# requirements.lock pins the runtime dependencies only (requirements-dev.lock adds the tools).
COPY requirements.lock ./
RUN pip install --requirement requirements.lock

COPY pyproject.toml ./
COPY shared ./shared
COPY --from=cni /_maglev_fill.so ./shared/
COPY services ./services
COPY membrane ./membrane
# --no-deps: everything it needs is pinned above; pip check fails the build if the lock misses one
RUN pip install --no-deps . \
    && pip check

# --- runtime: the virtualenv alone, run by an unprivileged user --------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="membrane" \
      org.opencontainers.image.description="Container networking with identity-based security" \
      org.opencontainers.image.licenses="Apache-2.0"

# numeric, so that Kubernetes' runAsNonRoot can verify it (k8s/ runs it as 10001:10001)
RUN groupadd --system --gid 10001 membrane \
    && useradd --system --uid 10001 --gid membrane --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin membrane

# the agent's needs: bcc compiles the BPF programs against the node's kernel headers (mounted
# from the host at run time); iproute2 so that `kubectl exec` into the agent can inspect the
# node (ip, tc, ss: the agent itself speaks netlink through pyroute2). The control-plane
# services do not use them; one image keeps one thing to build, scan and pin.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3-bpfcc libbpfcc iproute2 \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/membrane /opt/membrane
# an init container of the agent DaemonSet copies it to the node's /opt/cni/bin
COPY --from=cni /membrane-cni /opt/membrane/cni/membrane-cni
# the agent's init container links the node's kernel headers where bcc looks (as make setup does)
COPY --chmod=0755 scripts/kernel-headers.sh /opt/membrane/bin/membrane-kernel-headers
# Debian's bcc package into the virtualenv (only bcc, not all of dist-packages), as
# scripts/setup.sh links it; the same Python minor (3.11) on both sides, and bcc is pure
# Python over libbcc through ctypes. Importing it proves libbcc loads.
RUN ln -s /usr/lib/python3/dist-packages/bcc \
       "$(/opt/membrane/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bcc" \
    && /opt/membrane/bin/python -c 'import bcc'

ENV PATH=/opt/membrane/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
ENTRYPOINT ["membrane"]
CMD ["--help"]
