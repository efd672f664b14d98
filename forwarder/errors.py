"""The two error families the CLI maps to exit codes: runtime (1) and usage (2)."""


class NatfwdError(Exception):
    """A runtime failure: the message says what failed and, where known, how to fix it (exit 1)."""


class UsageError(Exception):
    """A usage or config mistake: the message names the bad input and what is valid (exit 2)."""
