# The serving image for AMD GPUs (ROCm): the same platform with PyTorch's ROCm build.
#   docker build -f deploy/docker/serving-rocm.Dockerfile -t ghcr.io/gemma4-platform/gemma4-platform:0.1.0-rocm .
FROM rayproject/ray:2.60.0-py311

WORKDIR /opt/gemma4
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users model ./model
COPY --chown=ray:users platform ./platform
COPY --chown=ray:users protos ./protos

RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/rocm6.4 "torch==2.13.0" \
 && pip install --no-cache-dir ".[platform]" \
 && python -c "import gemma4, gemma4_platform.graph"

EXPOSE 8000 9000 8080
CMD ["gemma4-platform", "serve", "--set", "server.host=0.0.0.0"]
