"""The natfwd the NAT instance installs: a reproducible sdist of the natfwd running provision, kept in S3.

The sdist is built from the source tree this natfwd runs from, byte for byte the same for the same sources
(sorted members, zero timestamps and owners), so its sha256 names it: running provision again with unchanged
sources finds the object already stored and changes nothing on the instance.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from forwarder import __version__
from forwarder.errors import UsageError

PACKAGE_NAME = "natfwd"
# What pip needs to build natfwd from source: the project file, the readme it names, and the package's sources.
_SOURCE_SUFFIXES = (".py", ".pyi", ".c", ".h")
_TOP_FILES = ("pyproject.toml", "README.md", "LICENSE")
_BUCKET_MAX = 63


@dataclass(frozen=True, slots=True)
class Artefact:
    """An sdist in the cluster's bucket; `data` is set when it was built here (and may still need uploading)."""

    bucket: str
    key: str
    sha256: str
    filename: str
    data: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def arn(self) -> str:
        return f"arn:aws:s3:::{self.bucket}/{self.key}"


def bucket_name(account_id: str, region: str, cluster_id: str) -> str:
    """The cluster's bucket: S3 names are global, so the account and region are part of it (at most 63 chars)."""
    name = f"natfwd-{account_id}-{region}-{cluster_id.lower()}"
    if len(name) <= _BUCKET_MAX:
        return name
    digest = hashlib.sha256(cluster_id.encode()).hexdigest()[:12]
    return f"natfwd-{account_id}-{region}-{digest}"


def source_tree() -> Path | None:
    """The source tree natfwd runs from (a checkout, or an editable install), or None for an installed wheel."""
    import forwarder

    root = Path(forwarder.__file__).resolve().parent.parent
    project = root / "pyproject.toml"
    if not project.is_file() or not re.search(r'(?m)^name\s*=\s*"natfwd"', project.read_text(encoding="utf-8")):
        return None
    return root


def _members(root: Path) -> list[Path]:
    files = [root / name for name in _TOP_FILES if (root / name).is_file()]
    package = root / "forwarder"
    files += [
        path
        for path in package.rglob("*")
        if path.is_file() and path.suffix in _SOURCE_SUFFIXES and "__pycache__" not in path.parts
    ]
    return sorted(files)


def build_sdist(root: Path, version: str = __version__) -> tuple[str, bytes]:
    """A reproducible sdist of the tree at `root`: (file name, bytes). The same sources give the same bytes."""
    prefix = f"{PACKAGE_NAME}-{version}"
    pkg_info = f"Metadata-Version: 2.1\nName: {PACKAGE_NAME}\nVersion: {version}\n".encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = [(f"{prefix}/PKG-INFO", pkg_info)]
        entries += [(f"{prefix}/{path.relative_to(root).as_posix()}", path.read_bytes()) for path in _members(root)]
        for name, data in sorted(entries):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    compressed = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0) as gz:
        gz.write(raw.getvalue())
    return f"{prefix}.tar.gz", compressed.getvalue()


def build(bucket: str) -> Artefact:
    """Build the sdist of this natfwd for `bucket`. Raises UsageError when natfwd does not run from a source tree."""
    root = source_tree()
    if root is None:
        raise UsageError(
            "natfwd runs from an installed wheel, not from its source tree, so provision cannot build the package "
            "the instance installs; run it from a checkout (pip install -e .), or pass --package SPEC"
        )
    filename, data = build_sdist(root)
    sha256 = hashlib.sha256(data).hexdigest()
    return Artefact(bucket, f"artefacts/{sha256}/{filename}", sha256, filename, data)
