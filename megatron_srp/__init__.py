"""megatron-srp: safety pretraining (Safety Reflection Pretraining and related interventions)
on Megatron-Core."""

import warnings

__version__ = "0.1.0"

# Without Apex / Transformer Engine (always so on CPU) Megatron-Core announces its torch
# fallbacks at import time; they are expected and tested here, so the notices are noise. So are
# torch's renames of the collectives Megatron-Core 0.16 calls, and one non-leaf ``.grad`` read
# inside Megatron's DDP.
for _notice in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                "full scope is deprecated", r"`torch.distributed.\w+` is deprecated",
                "The .grad attribute of a Tensor that is not a leaf"):
    warnings.filterwarnings("ignore", message=_notice)


def quiet_megatron_warnings() -> None:
    """For command-line tools: hide Megatron-Core's UserWarnings and the deprecation notices
    of the libraries below it, which say nothing to someone running a tool."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
