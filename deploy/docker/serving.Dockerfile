# The serving image (NVIDIA CUDA): Ray + the Gemma 4 platform. KubeRay starts Ray in it (head and GPU
# workers); the Serve application is `gemma4_platform.graph:build_app`.
#   docker build -f deploy/docker/serving.Dockerfile -t ghcr.io/gemma4-platform/gemma4-platform:0.1.0 .
FROM rayproject/ray:2.60.0-py311-cu128

WORKDIR /opt/gemma4
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users model ./model
COPY --chown=ray:users platform ./platform
COPY --chown=ray:users protos ./protos

# torch is pinned with triton so the CUDA build matches what the tests run on the CPU.
RUN pip install --no-cache-dir "torch==2.13.0" "triton==3.7.1" \
 && pip install --no-cache-dir ".[platform]" \
 && python -c "import gemma4, gemma4_platform.graph"

EXPOSE 8000 9000 8080
# KubeRay overrides the command with `ray start ...`; run standalone, the image serves locally.
CMD ["gemma4-platform", "serve", "--set", "server.host=0.0.0.0"]
