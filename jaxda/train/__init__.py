"""jaxda.train."""
