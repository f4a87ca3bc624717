"""Safety Reflection Pretraining core: segmentation, classification, the shared types."""
