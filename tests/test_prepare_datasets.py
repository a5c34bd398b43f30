"""tools/prepare_datasets.py with --config-file: only the datasets a config uses."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join("configs", "bundled", "queryinst_vis_MNV2_FPN_ctc_psc.yaml")


def _run(*argv):
    # A subprocess: the script re-registers the bundled datasets under its --root.
    return subprocess.run([sys.executable, "tools/prepare_datasets.py", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_config_file_builds_and_lists_only_its_datasets(tmp_path):
    """make demo's config trains on ctc_psc_video_train and tests on ctc_psc_val and
    ctc_psc_video_val: those three rows (frame and cell counts of docs/datasets.md), and
    only the PSC folder is written."""
    result = _run("--root", str(tmp_path), "--config-file", DEMO_CONFIG)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["name", "images", "instances", "json"]
    assert [r[:3] for r in rows[1:]] == [["ctc_psc_video_train", "35", "2348"],
                                         ["ctc_psc_val", "15", "1109"],
                                         ["ctc_psc_video_val", "15", "1109"]]
    assert rows[2][3] == str(tmp_path / "ctc_psc" / "annotations" / "val.json")
    assert sorted(os.listdir(tmp_path)) == ["README", "ctc_psc"]


def test_config_naming_a_dataset_that_is_not_bundled_exits_2(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(f'_BASE_: "{os.path.join(REPO, DEMO_CONFIG)}"\n'
                      'DATASETS:\n  TRAIN: ("ctc_psc_video_train", "my_cells_train")\n')
    result = _run("--root", str(tmp_path / "datasets"), "--config-file", str(config))
    assert result.returncode == 2
    assert f"{config}: DATASETS names ['my_cells_train'], which are not bundled" in result.stderr
    assert not (tmp_path / "datasets").exists()  # nothing built
