"""wan-assets: Dagster assets that turn video clips into evaluated Wan 2.2 I2V LoRAs."""
