"""wan-assets: Wan 2.2 I2V LoRA training as a Dagster asset graph."""

import logging

# Import-time noise from dependencies that users can do nothing about: torchao's CPU wheel reports
# its CUDA-only kernels as missing, diffusers then warns it cannot import them, and torch's pytree
# complains about torchao's enum registration; transformers warns that the CLIP image processor (which
# Wan 2.2 I2V never uses: it has no image encoder) falls back to PIL without torchvision.
_NOISY = (
    "torchao",
    "diffusers.quantizers.torchao.torchao_quantizer",
    "torch.utils._pytree",
    "transformers.utils.import_utils",
)
for _name in _NOISY:
    logging.getLogger(_name).setLevel(logging.ERROR)
