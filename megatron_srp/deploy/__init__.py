"""Deployment helpers: launching the pretraining tool on other machines than this one.

The training command is always ``torchrun ... tools/pretrain_srp.py --config FILE key=value``;
this package only decides where it runs (docs/deployment.md). ``nemo_run`` submits it through
NeMo-Run to a local torchrun or a Slurm cluster; NeMo-Run itself is an optional dependency.
"""
