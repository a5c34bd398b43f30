"""queryinst.data.read_image: 8-bit images exactly as Detectron2 reads them, 16-bit and float
images stretched (1st..99.8th percentiles -> 0..255) instead of clipped to white.

The real case is the bundled nuclei data: its source is a uint16 microscope image (values
0..235), and the bundled 8-bit tiles were made from it with the same percentile rule.
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
from queryinst.data import normalize_to_uint8, read_image, register_coco_instances_checked
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


def test_16bit_tile_is_not_white(tmp_path, val_tile):
    """The issue's case: the held-out tile saved as 16-bit (8-bit values x 257)."""
    record, gray = val_tile
    path = _save_png16(tmp_path / "val16.png", gray.astype(np.uint16) * 257)
    before = utils.read_image(path, "BGR")
    assert (before[gray > 0] == 255).all()  # Detectron2's read: every non-black pixel white

    ours = read_image(path, "BGR")
    assert ours.shape == (256, 256, 3) and ours.dtype == np.uint8
    assert (ours == ours[..., :1]).all()
    assert (ours == 255).mean() < 0.01  # not saturated
    # The same image as the 8-bit tile, up to the stated linear stretch of its percentiles.
    lo, hi = np.percentile(gray, [1, 99.8])
    expected = np.clip((gray - lo) / (hi - lo), 0, 1) * 255
    assert np.abs(ours[..., 0] - expected).max() <= 0.5 + 1e-6  # rounding only


def test_16bit_source_gives_the_bundled_8bit_tile(tmp_path, source, val_tile):
    """The raw 16-bit source, read with the rule, is the bundled 8-bit data within rounding."""
    path = _save_png16(tmp_path / "source16.png", source)
    ours = read_image(path, "RGB")
    np.testing.assert_array_equal(ours[..., 0], normalize_to_uint8(source))
    x, y = src.NUCLEI_VAL_XY
    tile = ours[y:y + src.NUCLEI_TILE, x:x + src.NUCLEI_TILE, 0].astype(int)
    assert np.abs(tile - val_tile[1]).max() <= 1
    assert (ours == 255).mean() <= 0.003  # 0.2% of the pixels are above the 99.8th percentile


def test_12bit_and_float_tiff_give_the_same_image(tmp_path, source):
    """Bit depth and dtype do not matter: x16 (a 12-bit camera) and float32 TIFF read alike."""
    reference = read_image(_save_png16(tmp_path / "s.png", source), "BGR")
    twelve_bit = read_image(_save_png16(tmp_path / "s12.png", source * 16), "BGR")
    np.testing.assert_array_equal(twelve_bit, reference)
    tifffile.imwrite(tmp_path / "s.tif", source.astype(np.float32) / 65535.0)
    assert Image.open(tmp_path / "s.tif").mode == "F"
    as_float = read_image(str(tmp_path / "s.tif"), "BGR")
    assert np.abs(as_float.astype(int) - reference).max() <= 1  # float32 rounding of the ratio
    assert utils.read_image(str(tmp_path / "s.tif"), "BGR").max() <= 1  # Detectron2: black


def test_normalize_edge_cases():
    assert (normalize_to_uint8(np.full((4, 4), 7, np.uint16)) == 0).all()
    out = normalize_to_uint8(np.array([[np.nan, 0.0, 1.0, 2.0]]), 0, 100)
    np.testing.assert_array_equal(out, [[0, 0, 128, 255]])


def test_mapper_reads_16bit_like_its_8bit_version(tmp_path, source):
    """Mapping the 16-bit source gives the tensor of its 8-bit version (the test-time mapper
    that Trainer.build_test_loader uses; training reads through the same __call__)."""
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.INPUT.MIN_SIZE_TEST = 128
    eight = np.repeat(normalize_to_uint8(source)[:, :, None], 3, axis=2)
    Image.fromarray(eight).save(tmp_path / "s8.png")
    records = [{"file_name": name, "height": 512, "width": 512, "image_id": 0}
               for name in (str(tmp_path / "s8.png"), _save_png16(tmp_path / "s16.png", source))]
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
