"""The one exception type that means "the user asked for something wrong".

The CLI turns a ``UserError`` into a single ``error: ...`` line and a non-zero exit, never a
traceback. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: unknown name, bad value, missing or broken file."""
