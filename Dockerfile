# megatron-srp on an NGC PyTorch container, which ships CUDA, NCCL and Transformer Engine (Apex where the release includes it; optional either way: docs/deployment.md).
#   docker build -t megatron-srp .
#   docker run --gpus all --ipc=host --rm -v "$PWD/data:/workspace/megatron-srp/data" \
#       -v "$PWD/runs:/workspace/megatron-srp/runs" megatron-srp \
#       torchrun --standalone --nproc_per_node=8 tools/pretrain_srp.py --config examples/smollm2_1.7b.yaml
# For Slurm with pyxis: enroot import -o megatron-srp.sqsh dockerd://megatron-srp (docs/deployment.md).
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /workspace/megatron-srp
# Dependencies first, so that a code change does not reinstall them. The container's torch is
# kept: the build fails if pip replaced it.
COPY docker/requirements.txt /tmp/requirements.txt
RUN torch_before="$(python -c 'import torch; print(torch.__version__)')" \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && torch_after="$(python -c 'import torch; print(torch.__version__)')" \
 && test "${torch_before}" = "${torch_after}"
COPY setup.py pyproject.toml README.md ./
COPY megatron_srp ./megatron_srp
RUN pip install --no-cache-dir --no-deps -e .
COPY tools ./tools
COPY examples ./examples
ENV OMP_NUM_THREADS=8 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PYTHONUNBUFFERED=1
CMD ["python", "tools/pretrain_srp.py", "--help"]
