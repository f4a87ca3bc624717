"""Safety Reflection Pretraining core: segmentation, classification, the shared types, and the
metrics that compare safety verdicts with labels (``scores``)."""
