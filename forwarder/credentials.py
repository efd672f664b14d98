"""`credential:NAME` paths: files systemd hands to the service in $CREDENTIALS_DIRECTORY (LoadCredential=)."""

from __future__ import annotations

import os
from pathlib import Path

from forwarder.errors import UsageError

PREFIX = "credential:"
ENV = "CREDENTIALS_DIRECTORY"


class CredentialError(UsageError):
    """A credential:NAME path that cannot be resolved."""


def resolve(value: str) -> str:
    """`value` unchanged, or for `credential:NAME` the path of NAME in $CREDENTIALS_DIRECTORY.

    Raises CredentialError when the variable is unset (not started by systemd with LoadCredential=) or NAME is not a
    plain file name.
    """
    if not value.startswith(PREFIX):
        return value
    name = value[len(PREFIX) :]
    if not name or "/" in name or name in (".", ".."):
        raise CredentialError(f"{value!r}: a credential is a plain file name, such as credential:tls.key")
    directory = os.environ.get(ENV)
    if not directory:
        raise CredentialError(
            f"{value!r}: ${ENV} is not set; credential: paths work under systemd with LoadCredential={name}:PATH "
            "(see deploy/natfwd.service), elsewhere give the file's path"
        )
    return str(Path(directory) / name)
