"""MODEL.QUERYINST.TRAIN_DTYPE: bf16 autocast of the training forward pass (docs/training.md).

Truth: the same model in float32 (losses agree to bf16 rounding), the dtypes autocast gives
the ROI heads' linear layers, and the errors named in fast_inference's docstrings.
"""
import copy
import warnings

import pytest
import torch
from detectron2.modeling import build_model

from queryinst.modeling import fast_inference
from queryinst.modeling.fast_inference import bf16_supported
from test_model import gt_instances, random_gt, small_cfg, train_input
from test_vis_model import frame_instances, random_image, vis_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

needs_bf16 = pytest.mark.skipif(
    not bf16_supported("cpu"),
    reason="this CPU has no native bf16 (AVX512-BF16 / AMX): TRAIN_DTYPE bfloat16 falls back "
    "to float32 here",
)


def _linear_output_dtypes(model):
    """Record the output dtype of every nn.Linear of the ROI heads during the next call."""
    seen = []
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
               for m in model.roi_heads.modules() if isinstance(m, torch.nn.Linear)]
    return seen, handles


def _image_model(train_dtype, seed=0):
    cfg = small_cfg(num_proposals=8)
    cfg.MODEL.QUERYINST.TRAIN_DTYPE = train_dtype
    torch.manual_seed(seed)
    return build_model(cfg).train()


def _image_batch():
    return [train_input(96, 128, 60, random_gt(96, 128, 3, 3, seed=61)),
            train_input(96, 128, 62, random_gt(96, 128, 2, 3, seed=63))]


@needs_bf16
def test_bf16_losses_match_float32_and_gradients_stay_float32():
    fp32, bf16 = _image_model("float32"), _image_model("bfloat16")
    bf16.load_state_dict(fp32.state_dict())
    batch = _image_batch()
    want = fp32(batch)
    seen, handles = _linear_output_dtypes(bf16)
    got = bf16(batch)
    for h in handles:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the heads' matrix products ran in bf16
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == torch.float32, name
        # bf16 keeps 8 bits of mantissa: ~0.4% per product, a few % through 3 stages
        torch.testing.assert_close(got[name], want[name], rtol=0.05, atol=0.02, msg=name)
    sum(got.values()).backward()
    grads = [(n, p.grad) for n, p in bf16.named_parameters() if p.grad is not None]
    assert grads and all(p.dtype == torch.float32 for p in bf16.parameters())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for _, g in grads)


def test_float32_training_has_no_autocast():
    model = _image_model("float32")
    seen, handles = _linear_output_dtypes(model)
    model(_image_batch())
    for h in handles:
        h.remove()
    assert seen and set(seen) == {torch.float32}


@needs_bf16
def test_video_model_trains_under_bf16():
    cfg = vis_cfg()
    cfg.MODEL.QUERYINST.TRAIN_DTYPE = "bfloat16"
    torch.manual_seed(0)
    model = build_model(cfg).train()
    video = {
        "image": [random_image(64, 80, 1), random_image(64, 80, 2)],
        "instances": [frame_instances([[4, 4, 30, 40], [40, 10, 70, 50]], [5, 6]),
                      frame_instances([[8, 6, 34, 42], [20, 30, 50, 60]], [5, 9])],
    }
    seen, handles = _linear_output_dtypes(model)
    losses = model([video])
    for h in handles:
        h.remove()
    assert set(seen) == {torch.bfloat16}
    assert "loss_track" in losses
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_inference_ignores_train_dtype():
    fp32 = _image_model("float32").eval()
    bf16 = copy.deepcopy(fp32)
    bf16.train_dtype = "bfloat16"
    image = {"image": random_image(96, 128, 64)}
    with torch.no_grad():
        want = fp32([image])[0]["instances"]
        got = bf16([image])[0]["instances"]
    assert torch.equal(got.scores, want.scores)
    assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)


@pytest.mark.parametrize("name,match", [
    ("float16", "TRAIN_DTYPE 'float16' is not supported .*SOLVER.AMP.ENABLED"),
    ("bf16", r"TRAIN_DTYPE 'bf16' is not supported: use one of \['float32', 'bfloat16', 'auto'\]"),
])
def test_unsupported_train_dtype_is_refused_naming_the_key(name, match):
    with pytest.raises(ValueError, match=match):
        _image_model(name)


def test_bf16_without_cpu_support_trains_in_float32_with_a_warning(monkeypatch):
    monkeypatch.setattr(fast_inference, "bf16_supported", lambda device_type: False)
    model = _image_model("bfloat16")
    seen, handles = _linear_output_dtypes(model)
    empty = gt_instances(96, 128, torch.zeros(0, 4), torch.zeros(0))
    with pytest.warns(RuntimeWarning, match="TRAIN_DTYPE bfloat16.*training in float32"):
        model([train_input(96, 128, 65, empty)])
    for h in handles:
        h.remove()
    assert seen and set(seen) == {torch.float32}


@pytest.mark.parametrize("vendor,amx,avx512_bf16,want", [
    ("AuthenticAMD", False, True, True),  # Zen 4: bf16 measured 1.27-1.42x faster
    ("GenuineIntel", True, True, True),  # AMX
    ("GenuineIntel", False, True, False),  # the Intel Xeon VM: bf16 1.18-1.28x slower
    ("AuthenticAMD", False, False, False),  # Zen 3: no bf16 instructions
    ("", False, True, False),  # vendor unknown (no /proc/cpuinfo)
])
def test_auto_train_dtype_picks_bf16_only_where_it_is_faster(
        monkeypatch, caplog, vendor, amx, avx512_bf16, want):
    """The rule of docs/training.md, "bf16 training", on each kind of CPU; the model then
    trains under that autocast (the ROI heads' linear layers' output dtype), warning nothing,
    and Detectron2's log says which dtype it chose."""
    fast_inference._log_auto_choice.cache_clear()
    caplog.set_level("INFO", logger="detectron2")
    monkeypatch.setattr(fast_inference, "_cpu_vendor", lambda: vendor)
    features = {"amx_tile": amx, "avx512_bf16": avx512_bf16}
    monkeypatch.setattr(fast_inference, "_cpu_feature", lambda name: features[name])
    monkeypatch.setattr(fast_inference, "bf16_supported", lambda device_type: avx512_bf16)
    assert fast_inference.bf16_training_faster("cpu") is want
    model = _image_model("auto")
    seen, handles = _linear_output_dtypes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(_image_batch())
    for h in handles:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16 if want else torch.float32}
    chosen = "bfloat16" if want else "float32"
    assert f"TRAIN_DTYPE auto: training in {chosen} on this CPU" in caplog.text



def test_cpuinfo_field(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2\n"
                       "processor\t: 1\nvendor_id\t: other\n")
    assert fast_inference.cpuinfo_field("vendor_id", str(cpuinfo)) == "GenuineIntel"  # first
    assert fast_inference.cpuinfo_field("flags", str(cpuinfo)) == "fpu avx2"
    assert fast_inference.cpuinfo_field("model name", str(cpuinfo)) is None
    assert fast_inference.cpuinfo_field("flags", str(tmp_path / "missing")) is None

def test_cpu_probes_read_this_machine():
    """The vendor is /proc/cpuinfo's (where Linux has one); the features are PyTorch's own
    probes, the same answer as the flags the kernel lists."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    vendor = fast_inference._cpu_vendor()
    assert vendor and f"vendor_id\t: {vendor}" in info
    flags = set(next(line for line in info.splitlines() if line.startswith("flags")).split())
    assert fast_inference._cpu_feature("avx512_bf16") == ("avx512_bf16" in flags)
    assert fast_inference._cpu_feature("amx_tile") == ("amx_tile" in flags)
    assert fast_inference._cpu_feature("no_such_feature") is False
