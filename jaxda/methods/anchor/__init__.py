"""jaxda.methods.anchor."""
