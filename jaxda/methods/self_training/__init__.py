"""jaxda.methods.self_training."""
