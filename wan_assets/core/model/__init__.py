"""The model stage: loading Wan 2.2 I2V (both experts, VAE, text encoder), the tiny random-weight
stand-in the tests and demo use, LoRA/LoKr adapters on the experts, and weight quantization. Builds
only on the root modules. Modules are imported by their full path; nothing is re-exported here.
"""
