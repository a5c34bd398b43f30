"""tools/results_table.py: the results table of several runs, its statistics and provenance.

The run directories are written here in Detectron2's own formats: ``config.yaml`` is
``cfg.dump()`` of the bundled config (what ``default_setup`` writes) and ``metrics.json`` has
the ``JSONWriter`` lines: training losses, an evaluation at ``TEST.EVAL_PERIOD`` and the final
evaluation at ``SOLVER.MAX_ITER`` (flattened "bbox/AP", "segm/AP", ... keys, per-category
"bbox/AP-nucleus" included). No training is run: ``launch`` is replaced where seeds are
launched.
"""
import datetime
import importlib.metadata
import json
import math
import os
import platform

import pytest
from conftest import load_script
from detectron2.config import get_cfg
from qi_bench import results  # tools/qi_bench (setup.cfg puts tools/ on the path)

from queryinst import add_queryinst_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join("configs", "bundled", "queryinst_R50_FPN_nuclei.yaml")
NOW = datetime.datetime(2026, 11, 30, 10, 0, tzinfo=datetime.timezone.utc)

# Four runs: box AP 20, 22, 24, 26 -> mean 23.0, sample std sqrt(20/3) = 2.582;
# mask AP 28.6, 33.0, 35.9, 40.9 (values seen in `make demo` runs) -> mean 138.4/4 = 34.6,
# deviations -6.0, -1.6, 1.3, 6.3, squares 36 + 2.56 + 1.69 + 39.69 = 79.94,
# sample std sqrt(79.94/3) = 5.162.
BOX = [20.0, 22.0, 24.0, 26.0]
MASK = [28.6, 33.0, 35.9, 40.9]


def _load_tool():
    return load_script("tools/results_table.py", "results_table")


@pytest.fixture(scope="module")
def tool():
    return _load_tool()


def write_run(run_dir, seed, box_ap, mask_ap, *, finished=True, overrides=()):
    """A run directory as train_net.py leaves it (config.yaml, metrics.json, log.txt)."""
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, CONFIG))
    cfg.merge_from_list(["SEED", seed, "OUTPUT_DIR", str(run_dir), "TEST.EVAL_PERIOD", 100,
                         *overrides])
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())

    def evaluation(it, box, mask):
        rec = {"iteration": it}
        for task, ap in (("bbox", box), ("segm", mask)):
            rec.update({f"{task}/AP": ap, f"{task}/AP50": ap + 30.0, f"{task}/AP75": ap - 5.0,
                        f"{task}/APs": ap - 10.0, f"{task}/APm": ap + 1.0,
                        f"{task}/APl": math.nan, f"{task}/AP-nucleus": ap})
        return rec

    lines = [{"data_time": 0.01, "eta_seconds": 100.0, "iteration": it, "lr": 2.5e-4,
              "s0_loss_cls": 1.0, "total_loss": 10.0 - it / 50, "time": 2.0}
             for it in (19, 39, 99, 199, 249)]
    lines.insert(3, evaluation(100, 1.0, 2.0))  # the periodic evaluation: not the result
    if finished:
        lines.append(evaluation(250, box_ap, mask_ap))
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        f.writelines(json.dumps(rec, sort_keys=True) + "\n" for rec in lines)
    with open(os.path.join(run_dir, "log.txt"), "w") as f:
        f.write("[11/30 10:00:00 detectron2]: Command line arguments: Namespace(...)\n")


def test_table_of_finished_runs(tool, tmp_path, capsys):
    runs = [tmp_path / f"seed{s}" for s in range(4)]
    for s, (run, box, mask) in enumerate(zip(runs, BOX, MASK)):
        write_run(run, s, box, mask)
    out = tmp_path / "docs" / "results" / "nuclei.md"
    argv = ["--runs", *map(str, runs), "--out", str(out)]

    assert tool.main(argv, now=NOW) == 0
    text = out.read_text()

    # per run: the final evaluation, not the periodic one at iteration 100
    assert f"| `{runs[3]}` | 3 | 26.0 | 56.0 | 21.0 | 40.9 | 70.9 | 35.9 |" in text
    assert "| 1.0 |" not in text
    # mean ± sample std and the range, against the hand-computed values above
    assert "| mean ± std | | 23.0 ± 2.6 | 53.0 ± 2.6 | 18.0 ± 2.6 | 34.6 ± 5.2 |" in text
    assert "| min to max | | 20.0 to 26.0 |" in text and "28.6 to 40.9" in text
    assert "mask AP spans 12.3 points (28.6 to 40.9, std 5.2)" in text
    assert "box AP spans 6.0 points" in text
    # provenance: date, command, versions
    assert "2026-11-30 10:00 UTC" in text
    assert "python tools/results_table.py --runs " + " ".join(map(str, runs)) in text
    assert f"- python: {platform.python_version()}" in text
    assert f"- torch: {importlib.metadata.version('torch')}" in text
    assert f"- torchvision: {importlib.metadata.version('torchvision')}" in text
    d2 = importlib.metadata.version("detectron2")
    assert f"- detectron2: {d2} (compiled ops detectron2._C)" in text or \
        f"- detectron2: {d2} (pure Python, no detectron2._C)" in text
    assert "- git commit: " in text
    assert "nuclei_dsb_val" in text and "after 250 iterations" in text
    assert "commands are not recorded" in text  # these runs were not launched by the tool
    assert f"- `{runs[0]}`: Namespace(...)" in text  # what their log.txt recorded
    assert f"written to {out}" in capsys.readouterr().out


def test_summarise_matches_hand_computed_values(tool):
    s = results.summarise(MASK)
    assert s["n"] == 4
    assert s["mean"] == pytest.approx(34.6)
    assert s["std"] == pytest.approx(math.sqrt(79.94 / 3))
    assert (s["min"], s["max"]) == (28.6, 40.9)
    # COCO gives NaN AP for a run without detections: left out, and n says so
    s = results.summarise([20.0, math.nan, 26.0])
    assert s["n"] == 2 and s["mean"] == pytest.approx(23.0)
    assert s["std"] == pytest.approx(math.sqrt(18.0))


def test_unfinished_run_is_refused(tool, tmp_path, capsys):
    done, killed = tmp_path / "seed0", tmp_path / "seed1"
    write_run(done, 0, 20.0, 30.0)
    write_run(killed, 1, 20.0, 30.0, finished=False)  # only the evaluation at iteration 100
    out = tmp_path / "table.md"

    assert tool.main(["--runs", str(done), str(killed), "--out", str(out)], now=NOW) == 1
    err = capsys.readouterr().err
    assert f"{killed}: metrics.json has no evaluation at iteration 250 (SOLVER.MAX_ITER)" in err
    assert "no table written" in err
    assert not out.exists()


def test_runs_of_different_settings_are_refused(tool, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(a, 0, 20.0, 30.0)
    write_run(b, 1, 21.0, 31.0, overrides=["SOLVER.BASE_LR", 0.0005])
    out = tmp_path / "table.md"

    assert tool.main(["--runs", str(a), str(b), "--out", str(out)], now=NOW) == 1
    err = capsys.readouterr().err
    assert "differ in more than SEED: SOLVER.BASE_LR (0.00025 vs 0.0005)" in err
    assert not out.exists()


def test_seeds_are_launched_once_and_resumed(tool, tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    write_run(root / "seed0", 0, 20.0, 28.6)  # finished in an earlier session
    launched = []

    def fake_launch(cmd, run_dir):
        launched.append(cmd)
        seed = int(cmd[cmd.index("SEED") + 1])
        write_run(run_dir, seed, 26.0, 40.9)
        return 0

    monkeypatch.setattr(results, "launch", fake_launch)
    out = tmp_path / "table.md"
    argv = ["--seeds", "0", "1", "--runs-root", str(root), "--out", str(out),
            "--config-file", CONFIG, "TEST.EVAL_PERIOD", "100"]

    assert tool.main(argv, now=NOW) == 0
    assert len(launched) == 1  # seed 0 had finished: not trained again
    cmd = launched[0]
    assert cmd[1:5] == ["train_net.py", "--config-file", CONFIG, "--resume"]
    assert cmd[5:] == ["TEST.EVAL_PERIOD", "100", "SEED", "1", "OUTPUT_DIR", str(root / "seed1")]
    text = out.read_text()
    assert (f"python train_net.py --config-file {CONFIG} --resume TEST.EVAL_PERIOD 100 "
            f"SEED 1 OUTPUT_DIR {root / 'seed1'}") in text
    assert f"`{root / 'seed0'}`" in text and "commands are not recorded" in text
    assert f"# Results: nuclei_dsb_val, 2 run(s) of `{CONFIG}`" in text
    assert "| mean ± std | | 23.0 ± 4.2 |" in text  # box 20, 26: std sqrt(18) = 4.24
    assert "finished earlier, not trained again" in capsys.readouterr().out

    # A second call trains nothing and writes the same numbers.
    assert tool.main(argv, now=NOW) == 0
    assert len(launched) == 1
    assert "| mean ± std | | 23.0 ± 4.2 |" in out.read_text()


def test_run_demo_entry_launches_the_demo_script(tool, tmp_path, monkeypatch):
    launched = []

    def fake_launch(cmd, run_dir):
        launched.append(cmd)
        write_run(run_dir, 5, 24.0, 35.9)
        return 0

    monkeypatch.setattr(results, "launch", fake_launch)
    root = tmp_path / "runs"
    argv = ["--seeds", "5", "--entry", "run_demo", "--runs-root", str(root),
            "--out", str(tmp_path / "t.md")]
    assert tool.main(argv, now=NOW) == 0
    # run_demo.py resumes by itself; the default config is make demo's (MobileNetV2) one
    demo_config = os.path.join("configs", "bundled", "queryinst_MNV2_FPN_nuclei.yaml")
    assert launched == [[launched[0][0], os.path.join("tools", "run_demo.py"), "--config-file",
                         demo_config, "SEED", "5", "OUTPUT_DIR", str(root / "seed5")]]


def test_failed_run_stops_without_a_table(tool, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(results, "launch", lambda cmd, run_dir: 1)
    root, out = tmp_path / "runs", tmp_path / "table.md"
    argv = ["--seeds", "3", "--runs-root", str(root), "--out", str(out), "--config-file", CONFIG]

    assert tool.main(argv, now=NOW) == 1
    err = capsys.readouterr().err
    assert f"{root / 'seed3'}: the run exited with status 1; see {root / 'seed3' / 'launch.log'}" \
        in err
    assert not out.exists()


def test_directory_of_another_seed_is_not_resumed(tool, tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    write_run(root / "seed2", 7, 20.0, 30.0, finished=False)
    monkeypatch.setattr(results, "launch", lambda cmd, run_dir: pytest.fail("must not launch"))
    argv = ["--seeds", "2", "--runs-root", str(root), "--out", str(tmp_path / "t.md"),
            "--config-file", CONFIG]

    assert tool.main(argv, now=NOW) == 1
    assert "holds a run with SEED 7, not 2" in capsys.readouterr().err


def test_overrides_without_seeds_are_an_argument_error(tool, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main(["--runs", str(tmp_path), "--out", "x.md", "SOLVER.MAX_ITER", "10"])
    assert e.value.code == 2
    assert "only apply with --seeds" in capsys.readouterr().err
