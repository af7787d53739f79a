"""jaxda.models.kernels."""
