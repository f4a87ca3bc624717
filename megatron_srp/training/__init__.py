"""The training engine: parallel setup, the loop, optimizer, checkpoints, logging. What the
engine needs to run Megatron-Core off CUDA is in ``megatron_srp/compat.py``, below every
package, because model building, validation and the classifiers ask it too."""
