"""megatron-srp: safety pretraining (Safety Reflection Pretraining and related interventions)
on Megatron-Core."""

import warnings

__version__ = "0.1.0"

# Without Apex / Transformer Engine (always so on CPU) Megatron-Core announces its torch
# fallbacks at import time; they are expected and tested here, so the notices are noise.
for _notice in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                "full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_notice)
