"""The eval stage: validation loss on held-out clips, and scoring a run's checkpoints (loss, samples,
the contact sheet). Builds on every stage before it, train included. Nothing is re-exported here.
"""
