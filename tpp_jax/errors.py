"""The library's user-facing error: the CLIs print its message as one line, without a traceback."""


class ConfigError(ValueError):
  """A user mistake in the config or in a file it names; main prints the message without a traceback."""
