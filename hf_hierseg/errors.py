"""The user's own mistakes, told apart from bugs.

Raised where the mistake is detected (a missing file, folder or Hub id, a value that cannot work, a device this
machine lacks). The command line (`hf_hierseg.cli`) prints their message as one line and exits with status 1; every
other exception is a bug and keeps its traceback. They subclass `FileNotFoundError` / `ValueError`, so library callers
catch them as usual.
"""


class UserInputError(Exception):
    """Base class of the user's mistakes (see the module docstring)."""


class MissingInputError(UserInputError, FileNotFoundError):
    """A file, folder, dataset or Hub id that does not exist (or cannot be found offline)."""


class InvalidInputError(UserInputError, ValueError):
    """A value that cannot work: a model that is not CAST, a device that is not available, a wrong file type."""


class MissingDependencyError(UserInputError, ImportError):
    """An optional package that the requested feature needs is not installed (the message names the extra)."""


__all__ = ["InvalidInputError", "MissingDependencyError", "MissingInputError", "UserInputError"]
