"""Plain-Python core: tensors, files and models; never imports dagster."""
