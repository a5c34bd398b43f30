"""tools/setup_env.sh: the checks it makes before creating a virtualenv."""
import os
import re
import shutil
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_refuses_a_new_venv_on_a_disk_without_room(tmp_path):
    """Asked for more free disk than any disk has, it stops before creating anything, says
    how much is free (as shutil reports it) and how to go on, and exits 1."""
    venv = tmp_path / "envs" / ".venv"
    env = {**os.environ, "VENV": str(venv), "QUERYINST_SETUP_MIN_FREE_GB": "1000000"}
    result = subprocess.run(["bash", "tools/setup_env.sh"], cwd=REPO, env=env, timeout=120,
                            capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    found = re.search(r"\[setup\] error: (\d+) GB free on the disk of (\S+), but a new",
                      result.stderr)
    assert found, result.stderr
    assert found.group(2) == str(venv.parent)
    assert abs(int(found.group(1)) - shutil.disk_usage(venv.parent).free // 2**30) <= 1
    assert "QUERYINST_SETUP_MIN_FREE_GB=0 skips this check" in result.stderr
    assert not venv.exists()  # nothing half-made
