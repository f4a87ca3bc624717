"""Model code: layer specs, the GPTModel provider, initialisation. The shapes it builds are
named in ``megatron_srp/presets.py``, below the configs that refer to them."""
