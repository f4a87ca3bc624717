"""MedSafetyWorld: a synthetic world with an exact definition of safety (docs/medsafetyworld.md).

world.py (drugs, conditions, patients) -> corpus.py (labelled passages) -> queries.py (held-out
questions and attacks) -> safety.py (the exact judge) -> experiment.py (the whole SRP-vs-baselines
experiment as one resumable command) -> report.py.
"""
