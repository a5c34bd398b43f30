"""tools/install_requirements.py: pip's settings passed on to uv, and the fall-back to pip."""
import importlib.util
import os
import subprocess
import sys

import pytest

from install_requirements import UvPlan, pip_settings, uv_command, uv_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "install_requirements.py")

# `pip config list` as pip 23-25 print it: a file's sections and the PIP_* variables (:env:).
CONFIG_LIST = """\
:env:.disable-pip-version-check='1'
:env:.find-links='/opt/wheels'
download.dest='/srv/dl'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/pip/constraints.txt'
global.extra-index-url='file:///srv/a/simple file:///srv/b/simple'
global.find-links='/opt/wheels'
global.trusted-host=''
install.timeout='60'
"""


def test_pip_settings_reads_the_sections_pip_install_reads():
    settings = pip_settings(CONFIG_LIST)
    assert settings == {
        "disable-pip-version-check": ["1"],
        "find-links": ["/opt/wheels", "/opt/wheels"],  # env and file: both listed
        "cert": ["/etc/ssl/certs/ca-certificates.crt"],
        "constraint": ["/etc/pip/constraints.txt"],
        "extra-index-url": ["file:///srv/a/simple", "file:///srv/b/simple"],
        "trusted-host": [],  # set empty: no flag
        "timeout": ["60"],
    }  # download.dest is `pip download`'s, not install's


def test_uv_plan_translates_each_setting_once():
    plan = uv_plan(pip_settings(CONFIG_LIST))
    assert plan == UvPlan(
        flags=["--find-links", "/opt/wheels",
               "--constraint", "/etc/pip/constraints.txt",
               "--extra-index-url", "file:///srv/a/simple",
               "--extra-index-url", "file:///srv/b/simple"],
        env={"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt", "UV_HTTP_TIMEOUT": "60"},
        unsupported=[],
    )


def test_uv_plan_refuses_what_it_cannot_translate():
    """A proxy or --no-binary that uv would not apply the same way: pip must install."""
    settings = pip_settings("global.proxy='http://proxy:3128'\ninstall.no-binary=':all:'\n")
    assert uv_plan(settings).unsupported == ["proxy", "no-binary"]


def test_pip_settings_rejects_a_line_it_cannot_read():
    with pytest.raises(ValueError, match="pip config list"):
        pip_settings("not a setting\n")


def test_pip_installs_when_asked_and_says_why(tmp_path):
    """QUERYINST_SETUP_INSTALLER=pip: pip installs (here a requirement already met)."""
    req = tmp_path / "req.txt"
    req.write_text("pytest\n")
    env = {**os.environ, "QUERYINST_SETUP_INSTALLER": "pip"}
    result = subprocess.run([sys.executable, SCRIPT, "-r", str(req)], env=env, timeout=300,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "[setup] installing with pip: QUERYINST_SETUP_INSTALLER=pip" in result.stdout


def test_a_pip_setting_without_translation_hands_the_install_to_pip(tmp_path):
    """PIP_NO_INDEX (no uv flag here): pip installs, offline, a requirement already met,
    and the message names the setting."""
    req = tmp_path / "req.txt"
    req.write_text("pytest\n")
    env = {**os.environ, "PIP_NO_INDEX": "1", "QUERYINST_SETUP_INSTALLER": "uv"}
    result = subprocess.run([sys.executable, SCRIPT, "-r", str(req)], env=env, timeout=300,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert ("[setup] installing with pip: pip setting(s) no-index have no uv equivalent here"
            in result.stdout), result.stdout


def test_a_missing_requirements_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.txt")
    result = subprocess.run([sys.executable, SCRIPT, "-r", missing], timeout=120,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert f"no requirements file {missing!r}" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("uv") is None,
                    reason="uv is not installed here (setup ran with pip)")
def test_uv_with_this_machines_pip_settings_resolves_the_installed_environment():
    """The script's uv command, with the flags translated from this machine's pip
    settings, resolves requirements.txt to exactly what this environment holds: it would
    change nothing."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=True,
                            capture_output=True, text=True).stdout
    plan = uv_plan(pip_settings(listed))
    assert plan.unsupported == []
    command = uv_command(plan, [os.path.join(REPO, "requirements.txt")], "--dry-run")
    command.remove("-q")  # the dry run's verdict is printed, not quiet
    result = subprocess.run(command, env={**os.environ, **plan.env}, timeout=300,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Would make no changes" in result.stderr, result.stderr
