"""tools/train_step_benchmark.py: argument checks, the timing and ratio logic on fake trainers
with a fake clock, and (slow, bundled PSC data) one real step of two variants."""
import os
import time

import pytest

from conftest import load_script

tsb = load_script("tools/train_step_benchmark.py", "train_step_benchmark")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PSC_TRAIN = os.path.join(REPO, "datasets", "ctc_psc", "annotations", "video_train.json")


@pytest.mark.parametrize("argv, message", [
    (["--variant", ""], "at least two"),
    (["--variant", "", "--variant", "SOLVER.BASE_LR"], "KEY VALUE pairs"),
    (["--variant", "", "--variant", "", "--steps", "0"], ">= 1"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        tsb.parse_args(["--config-file", "x.yaml", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeTrainer:
    """run_step advances the fake clock by its step times in turn and counts the calls."""

    def __init__(self, clock, step_times):
        self.clock, self.step_times, self.calls = clock, list(step_times), 0

    def run_step(self):
        self.clock.now += self.step_times[self.calls % len(self.step_times)]
        self.calls += 1


def test_rounds_take_turns_drop_warmup_and_ratio_to_the_first(monkeypatch, tmp_path):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)  # the clock qi_bench.measure reads
    # warm-up steps are slow (10 s) and must not count; then 1, 1, 4 s (median 1) against
    # 3, 3, 3 s (median 3): ratio 3 in every round
    fakes = [FakeTrainer(clock, [10, 1, 1, 4]), FakeTrainer(clock, [10, 3, 3, 3])]
    built = iter(fakes)
    monkeypatch.setattr(tsb, "build_trainer", lambda config, opts, out: next(built))
    out = tmp_path / "r.json"
    result = tsb.main(["--config-file", "x.yaml", "--variant", "", "--variant", "A 1",
                       "--rounds", "2", "--steps", "3", "--warmup", "1", "--json-out", str(out)])
    assert [f.calls for f in fakes] == [8, 8]  # 2 rounds x (1 + 3)
    assert result["round_medians_s"] == [[1, 3], [1, 3]]
    assert result["median_ratio_to_first"] == [1.0, 3.0]
    assert out.read_text().count("median_ratio_to_first") == 1


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(PSC_TRAIN), reason="bundled PSC data not prepared")
def test_two_real_variants_of_the_psc_config_run(tmp_path):
    small = ("MODEL.WEIGHTS '' INPUT.MIN_SIZE_TRAIN (128,) INPUT.MAX_SIZE_TRAIN 168 "
             "MODEL.QUERYINST.NUM_PROPOSALS 16 MODEL.QUERYINST.TEST_TOPK 16")
    result = tsb.main([
        "--config-file", os.path.join(REPO, "configs/bundled/queryinst_vis_MNV2_FPN_ctc_psc.yaml"),
        "--variant", small + " MODEL.QUERYINST_VIS.SUPERVISE_REFERENCE_FRAME True",
        "--variant", small, "--rounds", "1", "--steps", "1", "--warmup", "0",
        "--output-dir", str(tmp_path)])
    assert len(result["round_medians_s"]) == 1 and all(t > 0 for t in result["round_medians_s"][0])
    assert result["median_ratio_to_first"][0] == 1.0
