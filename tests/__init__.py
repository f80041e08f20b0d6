"""Tests (CPU, tiny model)."""
