"""queryinst.data.read_image: 8-bit images exactly as Detectron2 reads them, 16-bit and float
images mapped linearly to 8 bits (``to_uint8``) instead of clipped to white.

The real cases: the bundled held-out nuclei tile saved as 16-bit, and the bundled data's
source, a uint16 microscope image whose values use 8 bits (0..235).
"""
import json

import numpy as np
import pytest
import tifffile
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from PIL import Image

from queryinst import QueryInstDatasetMapper, add_queryinst_config
from queryinst.data import bundled_sources as src
from queryinst.data import read_image, register_coco_instances_checked, to_uint8
from conftest import load_script
from test_train_net import train_net

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

FORMATS = ("BGR", "RGB", "L", None)


@pytest.fixture(scope="module")
def source():
    """The bundled nuclei source: (512, 512) uint16 (stardist's img2d.tif)."""
    return src.fetch_nuclei_source()[0]


@pytest.fixture(scope="module")
def val_tile():
    """The bundled held-out tile: its record and its 8-bit gray values (256, 256)."""
    record = DatasetCatalog.get("nuclei_dsb_val")[0]
    rgb = np.asarray(Image.open(record["file_name"]))
    assert rgb.dtype == np.uint8 and (rgb == rgb[..., :1]).all()  # gray in 3 channels
    return record, rgb[..., 0]


def _save_png16(path, gray):
    Image.fromarray(gray.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"  # a real 16-bit grayscale PNG
    return str(path)


def test_8bit_images_read_exactly_as_detectron2(tmp_path, val_tile):
    rng = np.random.default_rng(0)
    files = [val_tile[0]["file_name"]]  # the bundled RGB PNG
    Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(tmp_path / "c.jpg")
    rotated = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: both readers must transpose
    rotated.save(tmp_path / "r.jpg", exif=exif)
    files += [str(tmp_path / n) for n in ("g.png", "c.jpg", "r.jpg")]
    for path in files:
        for fmt in FORMATS:
            ours, theirs = read_image(path, fmt), utils.read_image(path, fmt)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            np.testing.assert_array_equal(ours, theirs)
    assert read_image(str(tmp_path / "r.jpg")).shape[:2] == (7, 9)


def test_16bit_tile_is_read_back_exactly(tmp_path, val_tile):
    """The issue's case: the held-out tile saved as 16-bit (8-bit values x 257, and x 256)."""
    record, gray = val_tile
    path = _save_png16(tmp_path / "val16.png", gray.astype(np.uint16) * 257)
    before = utils.read_image(path, "BGR")
    assert (before[gray > 0] == 255).all()  # Detectron2's read: every non-black pixel white

    ours = read_image(path, "BGR")
    assert ours.shape == (256, 256, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, utils.read_image(record["file_name"], "BGR"))
    shifted = _save_png16(tmp_path / "val16_shifted.png", gray.astype(np.uint16) << 8)
    np.testing.assert_array_equal(read_image(shifted, "BGR"), ours)


def test_16bit_source_keeps_its_values(tmp_path, source):
    """The raw nuclei source uses 8 of its 16 bits (values 0..235): read unchanged, not
    stretched and not divided by 256 (a fixed ``>> 8`` would give a black image)."""
    assert source.dtype == np.uint16 and source.max() == 235
    ours = read_image(_save_png16(tmp_path / "source16.png", source), "RGB")
    np.testing.assert_array_equal(ours, np.repeat(source[:, :, None], 3, axis=2))


def test_12bit_and_float_tiff(tmp_path, source, val_tile):
    """A 12-bit camera (x 16) reads like the source; float TIFFs in [0, 1] are x 255."""
    reference = read_image(_save_png16(tmp_path / "s.png", source), "BGR")
    twelve_bit = read_image(_save_png16(tmp_path / "s12.png", source * 16), "BGR")
    assert source.max() * 16 < 4096
    np.testing.assert_array_equal(twelve_bit, reference)
    gray = val_tile[1]
    tifffile.imwrite(tmp_path / "t.tif", gray.astype(np.float32) / 255.0)
    assert Image.open(tmp_path / "t.tif").mode == "F"
    np.testing.assert_array_equal(read_image(str(tmp_path / "t.tif"), "L")[..., 0], gray)
    assert utils.read_image(str(tmp_path / "t.tif"), "BGR").max() <= 1  # Detectron2: black


def test_to_uint8_rule_by_hand():
    # integers: shift by (bit length of the maximum) - 8; negatives clipped to 0
    np.testing.assert_array_equal(to_uint8(np.array([[0, 7, 255]], np.uint16)), [[0, 7, 255]])
    np.testing.assert_array_equal(to_uint8(np.array([[0, 256, 511]], np.uint16)),
                                  [[0, 128, 255]])  # 9 bits: >> 1
    np.testing.assert_array_equal(to_uint8(np.array([[4095, 16, 0]], np.uint16)),
                                  [[255, 1, 0]])  # 12 bits: >> 4
    np.testing.assert_array_equal(to_uint8(np.array([[-5, 300]], np.int32)), [[0, 150]])
    assert (to_uint8(np.zeros((2, 2), np.uint16)) == 0).all()
    # floats: [0, 1] -> x 255; other ranges min..max; NaN -> 0
    np.testing.assert_array_equal(to_uint8(np.array([[np.nan, 0.0, 0.5, 1.0]])),
                                  [[0, 0, 128, 255]])
    np.testing.assert_array_equal(to_uint8(np.array([[-1.0, 1.0, 3.0]], np.float32)),
                                  [[0, 128, 255]])
    assert (to_uint8(np.full((2, 2), 7.5)) == 0).all()


def test_mapper_reads_16bit_like_its_8bit_version(tmp_path, val_tile):
    """Mapping the 16-bit tile gives the tensor of its 8-bit version (the test-time mapper
    that Trainer.build_test_loader uses; training reads through the same __call__)."""
    record, gray = val_tile
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.INPUT.MIN_SIZE_TEST = 128
    path16 = _save_png16(tmp_path / "t16.png", gray.astype(np.uint16) * 257)
    records = [{"file_name": name, "height": 256, "width": 256, "image_id": 0}
               for name in (record["file_name"], path16)]
    mapper = QueryInstDatasetMapper(cfg, is_train=False)
    out8, out16 = mapper(records[0]), mapper(records[1])
    assert out16["image"].shape == (3, 128, 128) and out16["image"].dtype == torch.uint8
    assert torch.equal(out8["image"], out16["image"])


def test_evaluation_loader_and_demo_read_16bit(tmp_path, val_tile):
    """The wiring: Trainer.build_test_loader maps with QueryInstDatasetMapper, and
    demo/demo.py reads its inputs with queryinst.data.read_image."""
    record, gray = val_tile
    _save_png16(tmp_path / "val16.png", gray.astype(np.uint16) * 257)
    coco = {"images": [{"id": 1, "file_name": "val16.png", "height": 256, "width": 256}],
            "annotations": [], "categories": [{"id": 1, "name": "nucleus"}]}
    (tmp_path / "val16.json").write_text(json.dumps(coco))
    register_coco_instances_checked("val16_test", {}, str(tmp_path / "val16.json"),
                                    str(tmp_path))
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.INPUT.MIN_SIZE_TEST = 256
    try:
        batch = next(iter(train_net.Trainer.build_test_loader(cfg, "val16_test")))
    finally:
        DatasetCatalog.remove("val16_test")
        MetadataCatalog.remove("val16_test")
    image = batch[0]["image"]
    assert image.shape == (3, 256, 256)
    assert (image == 255).float().mean() < 0.01  # Detectron2's mapper: ~99% white

    demo = load_script("demo/demo.py", "demo_main")
    assert demo.read_image is read_image
