"""The training engine: parallel setup, the loop, optimizer, checkpoints, logging, the CPU path."""
