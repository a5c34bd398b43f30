#!/usr/bin/env python3
"""Install requirement files into the running Python with uv where it can, else with pip.

uv installs the same distributions several times faster than pip: it unpacks the wheels and
compiles their bytecode in parallel (docs/install.md gives the times: PyPI's CUDA build of
torch alone unpacks to 6 GB). uv reads neither pip's configuration files nor the ``PIP_*``
variables, so this script passes pip's settings on as uv's flags: ``pip config list`` shows
both sources. pip installs instead, with a message saying why, when

- ``QUERYINST_SETUP_INSTALLER=pip`` is set;
- pip is configured with a setting this script cannot translate (the message names it);
- uv cannot be installed, or its install fails (then pip starts over).

uv resolves with ``--index-strategy unsafe-best-match``, pip's rule: the best version found on
any of the indexes. Called by ``tools/setup_env.sh``.

Usage: ``python tools/install_requirements.py -r requirements.txt [-r more.txt ...]``.
Exit code: 0 when the install succeeded, pip's exit code otherwise.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import subprocess
import sys
from typing import Dict, List, NamedTuple

INSTALLER_ENV = "QUERYINST_SETUP_INSTALLER"  # "uv" (default) or "pip"
# pip settings (from any of the sections that `pip install` reads) -> the uv flag taking each
# of their whitespace-separated values.
UV_FLAGS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
    "trusted-host": "--allow-insecure-host",
}
# pip settings that become uv's environment variables.
UV_ENV = {"cert": "SSL_CERT_FILE", "timeout": "UV_HTTP_TIMEOUT",
          "default-timeout": "UV_HTTP_TIMEOUT"}
# pip settings about pip's own output or cache: they change nothing that gets installed.
IGNORED = {
    "disable-pip-version-check", "no-input", "progress-bar", "quiet", "verbose", "cache-dir",
    "no-cache-dir", "no-warn-script-location", "root-user-action", "require-virtualenv",
}
SECTIONS = ("global", "install", ":env:")  # those `pip install` reads
PIP_INSTALL = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]


class UvPlan(NamedTuple):
    """uv's flags and environment for pip's settings, and the settings it cannot take."""

    flags: List[str]
    env: Dict[str, str]
    unsupported: List[str]


def pip_settings(config_list: str) -> Dict[str, List[str]]:
    """Parse ``pip config list`` output into setting name -> values.

    Args:
        config_list: lines ``section.name='value'`` (``global``, ``install``, ``:env:`` for a
            ``PIP_*`` variable, ...). Sections other than :data:`SECTIONS` are skipped.

    Returns:
        dict: each name (e.g. "extra-index-url") -> its whitespace-separated values, those of
        every section in order of appearance.

    Raises:
        ValueError: a line that is not ``section.name=value``.
    """
    settings: Dict[str, List[str]] = {}
    for line in config_list.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        section, dot, name = key.rpartition(".")
        if not sep or not dot:
            raise ValueError(f"unexpected line in `pip config list`: {line!r}")
        if section not in SECTIONS:
            continue
        if value[:1] in ("'", '"'):  # pip prints each value as a Python literal
            value = ast.literal_eval(value)
        settings.setdefault(name, []).extend(value.split())
    return settings


def uv_plan(settings: Dict[str, List[str]]) -> UvPlan:
    """uv's flags and environment equivalent to pip's ``settings`` (:func:`pip_settings`).

    Returns:
        UvPlan: ``unsupported`` lists the setting names without a translation (uv must not be
        used then: it would install from other places than pip).
    """
    flags, env, unsupported = [], {}, []
    for name, values in settings.items():
        if name in UV_FLAGS:
            for value in dict.fromkeys(values):  # a setting in two sections: once
                flags += [UV_FLAGS[name], value]
        elif name in UV_ENV and values:
            env[UV_ENV[name]] = values[-1]
        elif name not in IGNORED:
            unsupported.append(name)
    return UvPlan(flags, env, unsupported)


def _requirement_args(requirements: List[str]) -> List[str]:
    return [arg for req in requirements for arg in ("-r", req)]


def uv_command(plan: UvPlan, requirements: List[str], *options: str) -> List[str]:
    """The ``uv pip install`` command line of :func:`_uv` for the running Python.

    Args:
        plan: :func:`uv_plan`'s flags (its ``env`` goes into the command's environment).
        requirements: requirements file paths.
        options: further ``uv pip install`` options (e.g. "--dry-run").

    Returns:
        list[str]: the command, run as ``python -m uv`` (uv installed into this Python).
    """
    return [sys.executable, "-m", "uv", "pip", "install", "-q", "--python", sys.executable,
            "--index-strategy", "unsafe-best-match", "--compile-bytecode", *options,
            *plan.flags, *_requirement_args(requirements)]


def _pip(requirements: List[str]) -> int:
    return subprocess.call(PIP_INSTALL + _requirement_args(requirements))


def _uv(requirements: List[str]) -> str:
    """Install with uv; "" on success, else why not (pip then does the install)."""
    if os.environ.get(INSTALLER_ENV, "uv") == "pip":
        return f"{INSTALLER_ENV}=pip"
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        return f"`pip config list` failed: {listed.stderr.strip()}"
    plan = uv_plan(pip_settings(listed.stdout))
    if plan.unsupported:
        return f"pip setting(s) {', '.join(plan.unsupported)} have no uv equivalent here"
    if importlib.util.find_spec("uv") is None and subprocess.call(PIP_INSTALL + ["uv"]):
        return "uv could not be installed"
    code = subprocess.call(uv_command(plan, requirements), env={**os.environ, **plan.env})
    return f"uv failed with exit code {code}" if code else ""


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-r", "--requirement", action="append", required=True,
                        help="a requirements file (repeatable)")
    args = parser.parse_args(argv)
    for req in args.requirement:
        if not os.path.isfile(req):
            parser.error(f"no requirements file {req!r}")
    why_not = _uv(args.requirement)
    if not why_not:
        return 0
    print(f"[setup] installing with pip: {why_not}", flush=True)
    return _pip(args.requirement)


if __name__ == "__main__":
    sys.exit(main())
