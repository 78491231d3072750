"""labkit's errors: bad input, told in one line that says what was wrong and what is allowed.

Every error labkit raises about its input (a setting, a conversation, a ranking, a tokenizer file,
a reward function) derives from `LabkitError`; the command line reports one in a single line and
exits with status 2. Each module defines its own kind (`ChatError` in chat.py, `RankingError` in
preferences.py, ...); `ConfigError` lives here so that the rules (labkit/rules.py) and the config
(labkit/config.py) share it.
"""


class LabkitError(ValueError):
    """Bad input to labkit: the message says what was wrong and what is allowed."""


class ConfigError(LabkitError):
    """A bad preset, field, value or stage name, or settings that do not go together."""
