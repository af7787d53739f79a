"""jaxda.tasks."""
