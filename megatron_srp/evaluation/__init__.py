"""Evaluation of trained checkpoints: what a model learned about safety, measured.

* ``probes``: last-token activations of chosen layers and logistic-regression probes on them
  (AUC, mean and standard deviation over seeds).
* ``reflection_accuracy``: the SRP headline metric, read from the model's own reflections on
  labelled held-out segments (a few-shot prompt and a probe for models trained without them),
  scored with the classifiers' metrics (``megatron_srp/reflection/scores.py``).
* ``suite``: the ``tools/evaluate_srp.py`` runner (config, resume, JSON + Markdown + plots).
"""
