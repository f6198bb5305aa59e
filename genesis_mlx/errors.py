class GenesisError(Exception):
    """A user-facing problem: the message names it and says how to fix it, on one
    line. The CLI prints it without a traceback."""
