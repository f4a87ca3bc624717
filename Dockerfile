# megatron-srp on an NGC PyTorch container, which ships CUDA, NCCL, Apex and Transformer Engine.
#   docker build -t megatron-srp .
#   docker run --gpus all --ipc=host --rm -v $PWD/data:/workspace/data megatron-srp \
#       torchrun --nproc_per_node=8 tools/pretrain_srp.py --config examples/tiny_cpu.yaml
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /workspace/megatron-srp
COPY setup.py pyproject.toml README.md ./
COPY megatron_srp ./megatron_srp
# The container's torch and Transformer Engine are kept; only the project and its small
# dependencies are added (megatron-core >= 0.16.1 on the container's Python 3.12).
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir "megatron-core>=0.16.1" omegaconf tokenizers tensorboard tqdm \
        psutil pyarrow matplotlib
COPY tools ./tools
COPY examples ./examples
ENV OMP_NUM_THREADS=8
CMD ["python", "tools/pretrain_srp.py", "--help"]
