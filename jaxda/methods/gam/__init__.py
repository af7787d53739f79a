"""jaxda.methods.gam."""
