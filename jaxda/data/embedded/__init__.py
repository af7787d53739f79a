"""jaxda.data.embedded."""
