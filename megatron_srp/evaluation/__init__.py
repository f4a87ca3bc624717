"""Evaluation of trained checkpoints: what a model learned about safety, measured.

* ``classification``: accuracy, per-class and per-category precision/recall/F1, confusion
  matrices, shared by the classifiers' held-out report and reflection accuracy.
* ``probes``: last-token activations of chosen layers and logistic-regression probes on them
  (AUC, mean and standard deviation over seeds).
* ``reflection_accuracy``: the SRP headline metric, read from the model's own reflections on
  labelled held-out segments (a few-shot prompt and a probe for models trained without them).
* ``suite``: the ``tools/evaluate_srp.py`` runner (config, resume, JSON + Markdown + plots).
"""
