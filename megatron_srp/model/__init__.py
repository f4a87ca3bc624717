"""Model code: presets, layer specs, the GPTModel provider, initialisation."""
