"""The data stage: from a folder of clips to batches. Reading and writing video, synthetic clips,
frame sampling, resolution buckets, captions, VAE/UMT5 latents, the latent cache and its index, and
resumable batches from it. Builds on the root and model modules. Nothing is re-exported here.
"""
