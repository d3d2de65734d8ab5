"""UserError: the one base class of every error meant for the person running npllama.

Its message is one line that says what is wrong and, where it helps, what to do. A front end shows it
as it is, without a traceback (the CLI: "Error: ..." and exit status 1); anything else that escapes is
a bug.

A message may name a run's settings (TrainSettings' fields, a model's config fields) with setting():
printed by the library they read as the settings' names ("lr must be positive"), while the CLI shows
each as the flag that sets it ("--lr must be positive") through message(name_of).
"""
import re

_MARK = "\x1f"  # ASCII unit separator: never part of a message's own text
_SETTING = re.compile(f"{_MARK}(\\w+){_MARK}")


def setting(name):
    """The name of a setting, marked so that a front end can show it its own way (UserError.message)."""
    return f"{_MARK}{name}{_MARK}"


class UserError(ValueError):
    """Bad input or an impossible request, explained in one line (module docstring)."""

    def __init__(self, message=""):
        self.template = str(message)
        super().__init__(self.message())

    def message(self, name_of=lambda name: name):
        """The message, each marked setting shown as name_of(its name)."""
        return _SETTING.sub(lambda match: name_of(match.group(1)), self.template)


class TokenizerError(UserError):
    """A tokenizer, text or id that cannot be used (here, below the io modules that raise it)."""


class Notice(UserWarning):
    """Something the user should know that is not an error (one line): issued with warnings.warn, shown
    by the CLI as "Warning: ..." every time."""
