"""Dagster assets: thin calls into `wan_assets.core` that report what happened."""
