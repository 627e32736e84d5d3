"""User-facing errors: one clear line saying what is wrong and what to do."""


class CCAError(Exception):
    """An error caused by the user's input (path, config, option), not by a bug.

    The CLI prints ``str(err)`` as a single line and exits non-zero; library users
    catch it like any exception.
    """


class UnsupportedConfigError(CCAError):
    """A checkpoint config asks for a feature the model code does not implement."""
