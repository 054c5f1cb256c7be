"""The one exception type a user sees: its message is a sentence they can act on."""


class HeadscopeError(ValueError):
    """Bad input or an unusable model. The CLI prints it as one line; the app shows it with st.error."""


class OutputError(HeadscopeError):
    """A file could not be written (disk full, no permission): the run's fault, not its text's, so a batch stops."""
