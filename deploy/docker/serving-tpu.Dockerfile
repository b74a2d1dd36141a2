# The serving image for Cloud TPUs (GKE v5e / v6e single-chip slices): the same platform on torch_xla.
#   docker build -f deploy/docker/serving-tpu.Dockerfile -t ghcr.io/gemma4-platform/gemma4-platform:0.1.0-tpu .
# torch_xla 2.9.0 is the newest on PyPI and needs torch 2.9.x (see the toolchain notes), so the `model` extra's
# torch 2.13 / triton pins are left out: the package goes in without its dependencies, then everything else the
# platform extra lists. The engine runs the torch reference ops there (no Triton) on `model.device: xla`.
FROM rayproject/ray:2.60.0-py311

WORKDIR /opt/gemma4
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users model ./model
COPY --chown=ray:users platform ./platform
COPY --chown=ray:users protos ./protos

RUN pip install --no-cache-dir "torch==2.9.*" "torch_xla[tpu]==2.9.0" \
 && python -c "import tomllib; extras = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']; \
print('\n'.join(d for d in extras['model'] + extras['platform'] if not d.startswith(('torch', 'triton', 'gemma4-platform'))))" \
    > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && pip install --no-cache-dir --no-deps ".[platform]" \
 && python -c "import torch, torch_xla, gemma4, gemma4_platform.graph; assert torch.__version__.startswith('2.9')"

ENV PJRT_DEVICE=TPU
EXPOSE 8000 9000 8080
CMD ["gemma4-platform", "serve", "--set", "server.host=0.0.0.0", "--set", "model.device=xla"]
