"""What result files that open where our users work hold: label TIFFs at their pixel size (Fiji, napari) and
GeoJSON of instance outlines (QuPath). Pure functions (the domains write the files): shared by pannuke, cellsam
and stress_granules. And what the domains' readers and writers of large inputs share: where an uncompressed
TIFF's pixels lie (contiguous_pixels), the metadata of an OME-Zarr label image (label_image_attrs).

Pixel coordinates everywhere: pixel (row r, column c) covers [c, c + 1) x [r, r + 1), as QuPath and shapely read
them; x is the column.
"""

from __future__ import annotations

import uuid
from xml.etree import ElementTree

import cv2
import numpy as np
from scipy import ndimage

from common.tiling import ngff_datasets

MICROMETRES_PER_UNIT = {"um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
                        "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4}  # fmt: skip
MAX_PIXEL_SIZE_UM = 50.0  # a per-centimetre resolution coarser than this is a print setting, not a microscope's
CENTIMETER = 3  # the TIFF ResolutionUnit of a pixel size (2, inch, is a print setting such as 72 dpi)


def _micrometres(unit: str) -> float | None:
    unit = unit.strip().replace("\\u00B5", "u").replace("µ", "u").replace("μ", "u").lower()
    return MICROMETRES_PER_UNIT.get(unit)


def pixel_size_from_tiff(tif) -> float | None:
    """The pixel size in micrometres stored in an open tifffile.TiffFile: OME's PhysicalSizeX (with its unit),
    ImageJ's XResolution with the unit of its metadata, or a resolution in pixels per centimetre (what label_tiff
    gives uint32 labels). None without any of these (a resolution per inch is a print setting, such as 72 dpi, not
    a pixel size)."""
    if tif.is_ome:
        for element in ElementTree.fromstring(tif.ome_metadata).iter():
            if element.tag.endswith("Pixels") and element.get("PhysicalSizeX"):
                unit = element.get("PhysicalSizeXUnit", "µm")
                return float(element.get("PhysicalSizeX")) * _micrometres(unit)
    tags = tif.pages[0].tags
    resolution = tags.get("XResolution")
    if not resolution or not resolution.value[0]:
        return None
    numerator, denominator = resolution.value
    if tif.is_imagej:
        unit = (tif.imagej_metadata or {}).get("unit")
        if unit and _micrometres(unit):
            return denominator / numerator * _micrometres(unit)
    unit = tags.get("ResolutionUnit")
    if unit is not None and int(unit.value) == CENTIMETER:
        size = denominator / numerator * 1e4
        return size if size <= MAX_PIXEL_SIZE_UM else None  # 28.35 px/cm is 72 dpi, a print setting
    return None


def label_tiff(labels: np.ndarray, pixel_size: float | None) -> tuple[np.ndarray, dict]:
    """(array, tifffile.imwrite keywords) of a label TIFF that Fiji and napari open at its scale: uint16 as an
    ImageJ image with its resolution and unit (micrometres), or uint32 when ids pass 65,535, with the resolution
    in pixels per centimetre (ImageJ has no 32-bit integer images)."""
    if labels.max(initial=0) < 65536:  # uncompressed: every ImageJ reads it
        extra = {"resolution": (1 / pixel_size, 1 / pixel_size), "metadata": {"unit": "um"}} if pixel_size else {}
        return labels.astype(np.uint16), {"imagej": True, **extra}
    per_cm = 1e4 / pixel_size if pixel_size else None
    extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"} if pixel_size else {}
    return labels.astype(np.uint32), {"compression": "zlib", **extra}


def instance_polygons(labels: np.ndarray, scale: float = 1.0, offset=(0.0, 0.0)) -> dict[int, list[list[list[float]]]]:
    """Instance id -> its outline as GeoJSON polygon rings: the closed outer ring [[x, y], ...], then one ring per
    hole. Traced through the centres of the border pixels (OpenCV's findContours), so the outline lies within
    half a pixel of the instance's edge; coordinates plus `offset` (x, y: where `labels` lies in a larger image),
    times `scale` (e.g. back to a slide's full-resolution pixels). An
    instance in several pieces gets its largest; one or two pixels get the box of their pixel edges."""
    labels = np.asarray(labels)
    polygons = {}
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        (r0, r1), (c0, c1) = ((b.start, b.stop) for b in box)
        crop = np.pad((labels[box] == index).astype(np.uint8), 1)
        contours, hierarchy = cv2.findContours(crop, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        outer = [k for k in range(len(contours)) if hierarchy[0][k][3] < 0]
        k = max(outer, key=lambda k: (cv2.contourArea(contours[k]), len(contours[k])))
        # the crop's padded pixel (x, y) is the image's pixel (x + c0 - 1, y + r0 - 1); + 0.5: its centre
        shift = np.array([c0 - 0.5, r0 - 0.5])
        if len(contours[k]) < 3 or cv2.contourArea(contours[k]) == 0:  # a pixel or a line of pixels
            rings = [np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1]], np.float64)]
        else:
            holes = [h for h in range(len(contours)) if hierarchy[0][h][3] == k and cv2.contourArea(contours[h]) > 0]
            rings = [contours[h][:, 0, :].astype(np.float64) + shift for h in [k, *holes]]
        polygons[index] = [np.round((np.vstack([r, r[:1]]) + offset) * scale, 3).tolist() for r in rings]
    return polygons


def qupath_features(
    labels: np.ndarray, classes: dict[int, tuple[str, tuple[int, int, int]]] | None = None,
    measurements: dict[int, dict] | None = None, scale: float = 1.0, object_type: str = "detection", name: str = "",
    offset=(0.0, 0.0), id_offset: int = 0,
) -> dict:  # fmt: skip
    """A GeoJSON FeatureCollection that QuPath imports (File > Import objects, or drag and drop): one Polygon
    feature per instance, `objectType` detection (or annotation), its class as QuPath's `classification` {name,
    color}, its label id and `measurements` in the properties, and a UUID stable per (name, id). A block of a
    larger image: `offset` (x, y) where it lies (see instance_polygons), and its label k is the image's id
    k + id_offset (the key of `classes` and `measurements`)."""
    features = []
    for local, rings in instance_polygons(labels, scale, offset).items():
        index = local + id_offset
        properties = {"objectType": object_type, "name": str(index), "label_id": index}
        if classes and index in classes:
            label, colour = classes[index]
            properties["classification"] = {"name": label, "color": [int(c) for c in colour]}
        if measurements and index in measurements:
            properties["measurements"] = measurements[index]
        features.append({
            "type": "Feature", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{name}#{index}")),
            "geometry": {"type": "Polygon", "coordinates": rings}, "properties": properties,
        })  # fmt: skip
    return {"type": "FeatureCollection", "features": features}


def contiguous_pixels(series, byteorder: str) -> tuple[int, np.dtype] | None:
    """(file offset, dtype as stored) of a tifffile series whose pixels are uncompressed and lie in one run of
    whole bytes (Fiji's and tifffile's default for uncompressed files), so that a region of it can be read
    through a memory map; None otherwise (compressed, tiled or packed bits: read chunk by chunk through
    tifffile's zarr view). Such a file is one strip per plane, which the zarr view would decode whole."""
    dtype = np.dtype(series.dtype)
    if series.dataoffset is None or series.keyframe.bitspersample != 8 * dtype.itemsize:
        return None
    return int(series.dataoffset), dtype.newbyteorder(byteorder)


def label_image_attrs(levels: int, pixel_size: float | None, name: str) -> dict:
    """The zarr attributes of an OME-Zarr (NGFF 0.5) label image of `levels` (y, x) pyramid levels named 0, 1, ...
    (each every second pixel of the one before: common.tiling.pyramid_plan), written at the label image's own
    root: multiscales in micrometres (in pixels without a pixel size) and image-label. napari (napari-ome-zarr)
    opens the folder as a labels layer, Fiji and QuPath's OME-Zarr readers as an image."""
    axes = [{"name": a, "type": "space", **({"unit": "micrometer"} if pixel_size else {})} for a in "yx"]
    multiscale = {"name": name, "axes": axes, "datasets": ngff_datasets(levels, [pixel_size or 1.0] * 2)}
    return {"ome": {"version": "0.5", "multiscales": [multiscale], "image-label": {"version": "0.5"}}}
