"""What people filter photos by, read from a file's EXIF: when it was taken and with which camera.

`taken` is stored as text, "YYYY-MM-DD HH:MM:SS", so that SQL compares it as people write dates
(`taken >= '2024-06-01'`, `taken LIKE '2024-%'`): LanceDB's SQL does not turn a string literal
into a timestamp. It is the camera's clock (EXIF DateTimeOriginal, else DateTimeDigitized, else
DateTime), which records no time zone; a file without one falls back to its mtime, in this
machine's local time, as a photo viewer shows it.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from datetime import datetime

from PIL import Image

_EXIF_IFD = 0x8769
_DATE_TAGS = ((_EXIF_IFD, 0x9003), (_EXIF_IFD, 0x9004), (None, 0x0132))  # DateTimeOriginal, DateTimeDigitized, DateTime
_MAKE, _MODEL = 0x010F, 0x0110
_EXIF_DATE = re.compile(r"(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")


@dataclass(frozen=True)
class PhotoFacts:
    taken: str  # "YYYY-MM-DD HH:MM:SS"
    camera: str | None  # "Make Model" as the camera wrote them, None without EXIF


def read_photo_facts(data: bytes, mtime: float) -> PhotoFacts:
    """The capture time and camera of an image file's bytes; only the header is parsed."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            exif = image.getexif()
            taken = next((t for t in (_date(exif, ifd, tag) for ifd, tag in _DATE_TAGS) if t), None)
            camera = _camera(exif)
    except Exception:  # EXIF is often malformed; a photo is still a photo
        taken, camera = None, None
    return PhotoFacts(taken=taken or format_time(datetime.fromtimestamp(mtime)), camera=camera)


def format_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _date(exif: Image.Exif, ifd: int | None, tag: int) -> str | None:
    value = (exif.get_ifd(ifd) if ifd is not None else exif).get(tag)
    match = _EXIF_DATE.match(str(value).strip()) if value else None
    if not match:
        return None
    try:  # "0000:00:00 00:00:00" and other impossible dates are unknown, not a date
        return format_time(datetime(*(int(part) for part in match.groups())))  # type: ignore[arg-type]
    except ValueError:
        return None


def _camera(exif: Image.Exif) -> str | None:
    make, model = (_text(exif.get(tag)) for tag in (_MAKE, _MODEL))
    if make and model and model.lower().startswith(make.lower()):  # "Canon" + "Canon EOS R5"
        return model
    return " ".join(part for part in (make, model) if part) or None


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value).replace("\x00", "").strip() if value is not None else ""
    return text or None
