"""The one user-facing error type.

A ``KdlabError`` means the *input* is wrong (a config key, a file, a name), not
kdlab: its message is one line per problem naming the key or file, what was
wrong and how to fix it. The CLI prints it without a traceback and exits with
code 2. Anything else that escapes is a bug and keeps its traceback.
"""


class KdlabError(Exception):
    """Bad user input: a config key, a registry name, a file, a checkpoint."""


class ConfigError(KdlabError):
    """One or more config problems, each a ``key.path: message`` line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class NonFiniteLossError(KdlabError):
    """A loss term became NaN or inf; the last good checkpoint is kept."""


class WorkspaceError(KdlabError):
    """The workspace cannot be written (disk full, read-only, no permission): the study stops.

    Unlike a bad config of one run, this fails every later run too, so the
    runner re-raises it instead of going on with the next run.
    """
