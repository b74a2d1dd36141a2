# The operator image: kopf + the Kubernetes client + gemma4.config/memory. No torch, no Ray.
#   docker build -f deploy/docker/operator.Dockerfile -t ghcr.io/gemma4-platform/gemma4-operator:0.1.0 .
FROM python:3.11-slim

WORKDIR /opt/gemma4
COPY pyproject.toml README.md ./
COPY model ./model
COPY operators ./operators
# The platform package is not installed (it needs Ray); setuptools still finds its folder.
COPY platform ./platform

RUN pip install --no-cache-dir ".[operator]" \
 && python -c "import sys, gemma4_operator; assert 'torch' not in sys.modules" \
 && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin gemma4

USER 10001
ENTRYPOINT ["gemma4-operator"]
