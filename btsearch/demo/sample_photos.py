"""Real photos shipped inside scikit-image, with short English captions.

They give the demo and the tests a small, license-clean collection without any download:
every photo below is a file inside the `skimage/data` package folder (no pooch fetch).
scikit-image is an optional dependency (the "demo" extra), so it is imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Captions were written by looking at each photo. Colour photos first, then grey ones.
SAMPLE_PHOTOS: dict[str, list[str]] = {
    "astronaut": [
        "an astronaut in an orange space suit",
        "a smiling woman astronaut in front of an american flag",
        "portrait of an astronaut with a helmet and a model space shuttle",
    ],
    "chelsea": [
        "a close up of a tabby cat",
        "a cat with green eyes looking at the camera",
        "the face of a striped brown cat",
    ],
    "coffee": [
        "a cup of coffee on a red saucer",
        "an espresso with a spoon on a wooden table",
    ],
    "rocket": [
        "a rocket on the launch pad at night",
        "a space rocket between tall towers with bright lights",
    ],
    "motorcycle_left": [
        "a red motorcycle parked in a garage",
        "a motorbike in a workshop with shelves and boxes",
    ],
    "hubble_deep_field": [
        "thousands of distant galaxies in the dark sky",
        "a telescope image of deep space full of stars and galaxies",
    ],
    "retina": [
        "a photo of the back of the human eye",
        "an orange retina with blood vessels and the optic disc",
    ],
    "ihc": [
        "a microscope image of stained tissue",
        "tissue cells stained brown and blue under a microscope",
    ],
    "camera": [
        "a black and white photo of a man with a camera",
        "a photographer with a camera on a tripod in a field",
    ],
    "moon": [
        "the grey surface of the moon with craters",
        "a close view of the lunar surface in black and white",
    ],
    "coins": [
        "rows of old coins on a dark background",
        "many ancient silver coins laid out in a grid",
    ],
}

# skimage.data loader for each photo whose name is not a loader of its own.
_LOADER_NAMES = {"ihc": "immunohistochemistry", "motorcycle_left": "stereo_motorcycle"}


def _load(data, name: str):
    """The photo as a uint8 array: (H, W, 3) for colour, (H, W) for grey."""
    image = getattr(data, _LOADER_NAMES.get(name, name))()
    # stereo_motorcycle() returns (left, right, disparity).
    return image[0] if name == "motorcycle_left" else image


def write_sample_photos(out_dir: str | Path, names=None, fmt: str = "jpg") -> list[Path]:
    """Write the sample photos as `<out_dir>/<name>.<fmt>` and return their paths in order.

    `names` defaults to every key of `SAMPLE_PHOTOS`. JPEGs are written at quality 90. Grey
    photos stay single-channel ("L" mode) files, so readers must convert them to RGB.
    """
    try:
        from skimage import data
    except ImportError as error:
        raise ImportError(
            "The sample photos come from scikit-image, which is not installed: "
            "pip install 'btsearch[demo]' (or pip install scikit-image)."
        ) from error
    from PIL import Image

    names = list(SAMPLE_PHOTOS) if names is None else list(names)
    unknown = [name for name in names if name not in SAMPLE_PHOTOS]
    if unknown:
        raise ValueError(f"Unknown sample photo(s) {unknown}; choose from {list(SAMPLE_PHOTOS)}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_options: dict[str, Any] = {"quality": 90} if fmt.lower() in ("jpg", "jpeg") else {}
    paths = []
    for name in names:
        path = out_dir / f"{name}.{fmt}"
        Image.fromarray(_load(data, name)).save(path, **save_options)
        paths.append(path)
    return paths
