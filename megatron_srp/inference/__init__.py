"""Inference: load a trained checkpoint and generate text from it.

``sample`` holds the simple sampler the README demo uses: :func:`~.sample.load_for_inference`
rebuilds a run's model in one process (TP=PP=1, whatever layout it was trained with),
:func:`~.sample.generate` samples continuations for a batch of prompts by recomputing the whole
sequence at every step, and :func:`~.sample.perplexity` scores a text. KV-cache generation,
beam search and SafeBeam plug in behind the same ``GenerationConfig`` / ``generate`` API.
"""
