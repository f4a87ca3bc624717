"""megatron-srp: safety pretraining (Safety Reflection Pretraining and related interventions)
on Megatron-Core."""

__version__ = "0.1.0"
