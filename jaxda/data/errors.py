"""Errors raised by the jaxda data layer."""


class DataError(ValueError):
  """A data set on disk or in memory is missing, malformed or inconsistent.

  The message is one line that says what is wrong, where (the directory or
  file) and how to fix it, so it can be shown to a user as is.
  """
