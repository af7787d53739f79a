"""The run loop's user errors: the CLI prints them in one line."""


class TrainingDivergedError(RuntimeError):
  """A loss or gradient became NaN/Inf."""


class ConfigError(ValueError):
  """A config value is invalid."""
