# The image that runs fedprune's ServerApp and ClientApps under docker-compose.yml: Flower's
# SuperExec (flwr/superexec at our pinned Flower version, Python 3.11 like pyproject.toml asks) plus
# the app's dependencies, with CPU-only torch. The app's code is not baked in: `flwr run` sends it
# (the FAB) to every SuperExec at run time, so the image changes only when the dependencies in
# pyproject.toml do.
#
#   docker compose build        # or: docker build -t fedprune-superexec:1.41.0 .
#
# docs/deployment.md: "A local federation with docker-compose".
ARG FLWR_VERSION=1.41.0
ARG PYTHON_VERSION=3.11
FROM flwr/superexec:${FLWR_VERSION}-py${PYTHON_VERSION}-ubuntu24.04

# The same torch as the Makefile installs, from the CPU-only index: the default index brings ~3 GB
# of CUDA libraries that a CPU container never uses.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY --chown=app:app pyproject.toml deploy/image_requirements.py ./
RUN python -m pip install --no-cache-dir --index-url "${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && python image_requirements.py pyproject.toml > requirements.txt \
 && python -m pip install --no-cache-dir -r requirements.txt \
 && python -c "import torch; assert not torch.version.cuda, 'a CUDA build of torch got in'" \
 && rm requirements.txt image_requirements.py

ENTRYPOINT ["flower-superexec"]
