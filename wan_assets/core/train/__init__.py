"""The train stage: the training loop and what it owns. Flow-matching noise and loss, optimizers,
the alpha schedule and its statistics, the run folder and its metrics log, multi-GPU, samples during
training, progress reporting, and the preflight checks. Builds on root, model, speed and data.
Nothing is re-exported here.
"""
