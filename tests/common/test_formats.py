"""common/formats.py: label TIFFs read back with tifffile at their pixel size, GeoJSON outlines read back with
shapely (the library QuPath-side tools use), each covering its instance within a pixel; where an uncompressed
TIFF's pixels lie; OME-Zarr label-image metadata as ome-zarr's reader (napari's) reads it."""

import json

import numpy as np
import pytest
import tifffile
from shapely.geometry import Point, shape

from common.formats import (
    contiguous_pixels,
    instance_polygons,
    label_image_attrs,
    label_tiff,
    pixel_size_from_tiff,
    qupath_features,
)


def hand_made_labels() -> np.ndarray:
    labels = np.zeros((40, 50), np.int32)
    yy, xx = np.mgrid[:40, :50]
    labels[(yy - 12) ** 2 + (xx - 14) ** 2 <= 49] = 1  # a disc
    labels[20:30, 30:45] = 2  # a rectangle
    labels[35, 5] = 3  # one pixel
    labels[2, 40:44] = 4  # a line of four pixels
    ring = ((yy - 30) ** 2 + (xx - 12) ** 2 <= 36) & ((yy - 30) ** 2 + (xx - 12) ** 2 > 4)
    labels[ring & (labels == 0)] = 5  # a ring: its hole is not outlined
    return labels


def covers_within_one_pixel(polygon, labels, index) -> bool:
    """Every pixel centre of the instance lies within 1 px of the polygon, and every point of the polygon lies
    within 1 px of the instance's pixels."""
    ys, xs = np.nonzero(labels == index)
    near = polygon.buffer(1.0)
    if not all(near.contains(Point(x + 0.5, y + 0.5)) for y, x in zip(ys, xs, strict=True)):
        return False
    pixels = shape({"type": "MultiPolygon", "coordinates": [
        [[[x, y], [x + 1, y], [x + 1, y + 1], [x, y + 1], [x, y]]] for y, x in zip(ys, xs, strict=True)]})  # fmt: skip
    return pixels.buffer(1.0).contains(polygon)


def test_polygons_cover_their_instances_within_a_pixel():
    labels = hand_made_labels()
    polygons = instance_polygons(labels)
    assert sorted(polygons) == [1, 2, 3, 4, 5]
    for index, rings in polygons.items():
        polygon = shape({"type": "Polygon", "coordinates": rings})
        assert polygon.is_valid and all(ring[0] == ring[-1] for ring in rings), index
        assert len(rings) == (2 if index == 5 else 1), index  # the ring's hole is a hole
        assert covers_within_one_pixel(polygon, labels, index), index
    # the rectangle: through its border pixel centres, 14 x 9 px
    assert shape({"type": "Polygon", "coordinates": polygons[2]}).area == pytest.approx(14 * 9)
    assert polygons[3] == [[[5, 35], [6, 35], [6, 36], [5, 36], [5, 35]]]  # one pixel: its edges
    assert instance_polygons(labels, scale=2.0)[3] == [[[10, 70], [12, 70], [12, 72], [10, 72], [10, 70]]]


def test_geojson_is_a_qupath_feature_collection(tmp_path):
    labels = hand_made_labels()
    classes = {1: ("Neoplastic", (255, 0, 0)), 2: ("Inflammatory", (0, 255, 0))}
    (tmp_path / "a.geojson").write_text(json.dumps(qupath_features(labels, classes, {1: {"Area um^2": 9.6}}, name="a")))
    collection = json.loads((tmp_path / "a.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 5
    first, second = collection["features"][:2]
    assert first["properties"]["classification"] == {"name": "Neoplastic", "color": [255, 0, 0]}
    assert first["properties"]["objectType"] == "detection" and first["properties"]["label_id"] == 1
    assert first["properties"]["measurements"] == {"Area um^2": 9.6}
    assert second["properties"]["classification"]["name"] == "Inflammatory"
    assert "classification" not in collection["features"][2]["properties"]
    assert len({f["id"] for f in collection["features"]}) == 5  # UUIDs, stable per file and id
    assert [f["id"] for f in qupath_features(labels, classes, name="a")["features"]] == [
        f["id"] for f in collection["features"]]  # fmt: skip


def pixel_size(path) -> float | None:
    with tifffile.TiffFile(path) as tif:
        return pixel_size_from_tiff(tif)


@pytest.mark.parametrize("top", [5, 70_000])  # uint16 ImageJ; uint32 with pixels per centimetre
def test_label_tiffs_keep_ids_and_pixel_size(tmp_path, top):
    labels = hand_made_labels().astype(np.int64)
    labels[labels == 5] = top
    array, options = label_tiff(labels, 0.325)
    tifffile.imwrite(tmp_path / "l.tif", array, **options)
    back = tifffile.imread(tmp_path / "l.tif")
    assert back.dtype == (np.uint16 if top < 65536 else np.uint32) and np.array_equal(back, labels)
    assert pixel_size(tmp_path / "l.tif") == pytest.approx(0.325, rel=1e-5)
    with tifffile.TiffFile(tmp_path / "l.tif") as tif:  # what napari and Fiji read: the resolution tags
        numerator, denominator = tif.pages[0].tags["XResolution"].value
        per_unit = numerator / denominator
        assert per_unit == pytest.approx(1 / 0.325 if top < 65536 else 1e4 / 0.325, rel=1e-5)
    array, options = label_tiff(labels, None)
    tifffile.imwrite(tmp_path / "none.tif", array, **options)
    assert pixel_size(tmp_path / "none.tif") is None
    tifffile.imwrite(tmp_path / "dpi.tif", array, resolution=(72, 72), resolutionunit="INCH")
    assert pixel_size(tmp_path / "dpi.tif") is None  # a print setting, not a pixel size
    tifffile.imwrite(tmp_path / "dpcm.tif", array, resolution=(28.35, 28.35), resolutionunit="CENTIMETER")
    assert pixel_size(tmp_path / "dpcm.tif") is None  # 72 dpi given per centimetre: 353 um is no pixel size


TIFF_KINDS = {  # tifffile.imwrite keywords: the files our users' microscopes and Fiji write
    "uncompressed": {},  # one strip per plane: the zarr view's chunk would be the whole plane
    "uncompressed big-endian": {"byteorder": ">"},
    "ImageJ stack": {"imagej": True},
    "Deflate strips": {"compression": "zlib"},
    "LZW tiles": {"compression": "lzw", "tile": (64, 64)},
    "pyramid": {"subifds": 1, "tile": (64, 64), "compression": "zlib"},
}


def write_tiff(path, image, kind: str) -> None:
    keywords = dict(TIFF_KINDS[kind])
    with tifffile.TiffWriter(
        path, imagej=keywords.pop("imagej", False), byteorder=keywords.pop("byteorder", None)
    ) as tif:
        if keywords.pop("subifds", 0):
            tif.write(image, subifds=1, **keywords)
            tif.write(image[:, ::2, ::2], subfiletype=1, **keywords)
        else:
            tif.write(image, **keywords)


@pytest.mark.parametrize("kind", TIFF_KINDS)
def test_contiguous_pixels_are_where_the_uncompressed_pixels_lie(tmp_path, kind):
    image = np.random.default_rng(0).integers(0, 65535, (2, 300, 260), dtype=np.uint16)
    write_tiff(tmp_path / "image.tif", image, kind)
    with tifffile.TiffFile(tmp_path / "image.tif") as tif:
        found = contiguous_pixels(tif.series[0], tif.byteorder)
    if kind.startswith("uncompressed") or kind == "ImageJ stack":
        offset, stored = found
        pixels = np.memmap(tmp_path / "image.tif", dtype=stored, mode="r", offset=offset, shape=(2, 300, 260))
        np.testing.assert_array_equal(pixels, image)
        assert stored.byteorder in ((">",) if "big" in kind else ("<", "="))
        del pixels
    else:
        assert found is None
    tifffile.imwrite(tmp_path / "b.tif", image[0] > 30000)  # 1 bit per pixel: packed, read through the zarr view
    with tifffile.TiffFile(tmp_path / "b.tif") as tif:
        assert contiguous_pixels(tif.series[0], tif.byteorder) is None


@pytest.mark.parametrize("pixel_size", [0.5, None])
def test_label_image_attrs_open_as_a_label_image_at_the_folder_itself(tmp_path, pixel_size):
    """What napari-ome-zarr sees (through ome-zarr's reader): a label image at the folder itself, its levels and
    their scale in micrometres (in pixels without a pixel size)."""
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    path = tmp_path / "plate.ome.zarr"
    labels = (np.arange(2500 * 1800, dtype=np.int64).reshape(2500, 1800) // 7919).astype(np.uint32)
    root = zarr.open_group(str(path), mode="w")
    for k in range(3):
        root.create_array(str(k), data=labels[:: 2**k, :: 2**k], chunks=(512, 512))
    root.attrs.update(label_image_attrs(3, pixel_size, "cells"))
    (node,) = list(Reader(parse_url(str(path)))())
    assert {type(s) for s in node.specs} == {Label, Multiscales}
    assert [np.array_equal(np.asarray(level), labels[:: 2**k, :: 2**k]) for k, level in enumerate(node.data)] == [
        True, True, True]  # fmt: skip
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    unit = pixel_size or 1.0
    assert scales == [[unit, unit], [2 * unit, 2 * unit], [4 * unit, 4 * unit]]
    assert node.metadata["name"] == "cells"
    assert [a.get("unit") for a in node.metadata["axes"]] == ["micrometer" if pixel_size else None] * 2
