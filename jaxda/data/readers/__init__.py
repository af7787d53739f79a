"""jaxda.data.readers."""
