"""Errors caused by the user's input: shown as one line, never as a traceback."""


class UserError(Exception):
    """Bad input (a wrong path, an unknown method, an over-long prompt...)."""
