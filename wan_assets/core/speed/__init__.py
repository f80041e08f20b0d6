"""The speed stage: the per-run training options that trade memory for time (compile, activation
checkpointing and offloading, fused LoRA matmuls, the inactive expert off the device) and the pieces
they apply to a transformer block. Builds on the root and model modules. Nothing is re-exported here.
"""
