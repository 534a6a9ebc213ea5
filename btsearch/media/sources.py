"""Image inputs beyond folders: webdataset tar shards and parquet tables, with their captions.

A collection stores a file path per image (re-ranking, thumbnails and the server read it), so
images that live inside a shard or a parquet file are extracted once into the collection's
`media/` folder; parquet rows that name a file are used in place. Captions found beside the
images (a webdataset `.txt` or `.json` member, a parquet caption column) are returned so the
caller can add them as texts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from ..errors import BtsearchError
from .images import IMAGE_SUFFIXES

PATH_COLUMNS = ("path", "image_path", "filepath", "file", "filename")
BYTES_COLUMNS = ("image", "bytes", "jpg", "png", "img")
CAPTION_COLUMNS = ("caption", "text", "txt", "title")
CAPTION_KEYS = ("caption", "text", "txt")


@dataclass
class ExpandedInputs:
    roots: list[Path] = field(default_factory=list)  # what add_images syncs: folders and files
    captions: list[str] = field(default_factory=list)  # captions that came with the images
    caption_images: list[Path | None] = field(default_factory=list)  # the image each caption came with (None: none)
    missing: list[tuple[Path, str]] = field(default_factory=list)  # listed files not on disk, and why
    gone: list[tuple[Path, Path]] = field(default_factory=list)  # (media folder, its container): emptied, for the sync to remove
    prune: bool = True  # remove extracted images their container no longer holds (not with --keep-missing)


SOURCE_FILE = ".source"  # in a media folder: the container its images came from


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_container(path: Path) -> bool:
    return path.is_file() and _container_name(path.name)


def _container_name(name: str) -> bool:
    return name.lower().endswith((".parquet", *SHARD_SUFFIXES))


def expand_inputs(paths: list[Path], media_dir: Path, keep_missing: bool = False) -> ExpandedInputs:
    """Folders and image files pass through; shards and parquet files, given or found in a
    given folder, become the images they hold (extracted under `media_dir`, once; a member no
    longer in its container is removed) plus their captions. One found in a folder that cannot
    be read (or a parquet file without an image column) is passed over, with its reason in
    `missing`; one named is an error. The media folder of a container that was under a given
    folder and is gone is emptied and made a root, so the sync removes its images (`gone`),
    unless `keep_missing`."""
    out = ExpandedInputs(prune=not keep_missing)
    for path in paths:
        path = Path(path)
        if is_container(path):
            _expand(path, _media_folder(media_dir, _stem(path), path), out)
            continue
        out.roots.append(path)
        if path.is_dir():
            if out.prune:
                _empty_gone_containers(path, media_dir, out)
            for found in _containers_under(path, skip=media_dir):
                # Named by their place under the folder: train/00000.tar and val/00000.tar are two.
                name = "__".join([*found.relative_to(path).parent.parts, _stem(found)])
                try:
                    _expand(found, _media_folder(media_dir, name, found), out)
                except BtsearchError as error:  # one bad file found in a folder is skipped, as a bad image is
                    out.missing.append((found, str(error)))
    return out


def _media_folder(media_dir: Path, name: str, container: Path) -> Path:
    """Where `container`'s images are extracted: `media_dir/name`, unless another container that
    still exists holds that folder (two shards named 00000.tar in two places), then a name of
    its own (the container's path's hash) so neither prunes the other's images."""
    folder = media_dir / _safe(name)
    holder = _source_of(folder)
    if holder is None or holder == container.resolve() or not holder.exists():
        return folder
    return media_dir / f"{_safe(name)}-{hashlib.sha1(str(container.resolve()).encode()).hexdigest()[:8]}"


def _source_of(folder: Path) -> Path | None:
    """The container a media folder's images came from (None: not noted, e.g. before notes were kept)."""
    try:
        return Path((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _empty_gone_containers(folder: Path, media_dir: Path, out: ExpandedInputs) -> None:
    if not media_dir.is_dir():
        return
    under = folder.resolve()
    for media in sorted(media_dir.iterdir()):
        source = _source_of(media)
        if source is not None and source.is_relative_to(under) and not source.exists():
            _prune(media, keep=set())
            out.roots.append(media)
            out.gone.append((media, source))


def _prune(folder: Path, keep: set[Path]) -> None:
    """Remove the extracted images of `folder` that are not in `keep`."""
    for extracted in folder.iterdir():
        if extracted.suffix.lower() in IMAGE_SUFFIXES and extracted not in keep:
            extracted.unlink(missing_ok=True)


def _extracted(folder: Path, container: Path, images: set[Path], out: ExpandedInputs) -> None:
    """`folder` holds `container`'s images, now exactly `images`: note where they came from,
    remove what the container no longer holds, and sync the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    note = folder / SOURCE_FILE
    source = str(container.resolve())
    if not note.exists() or note.read_text(encoding="utf-8") != source:
        note.write_text(source, encoding="utf-8")
    if out.prune:
        _prune(folder, keep=images)
    out.roots.append(folder)


def _stem(path: Path) -> str:
    """What names a container's media folder: a parquet file's stem, a shard's name up to its
    first dot (webdataset keys hold no dot)."""
    return path.stem if path.suffix.lower() == ".parquet" else path.name.split(".")[0]


def _expand(path: Path, folder: Path, out: ExpandedInputs) -> None:
    if path.suffix.lower() == ".parquet":
        _expand_parquet(path, folder, out)
    else:
        _expand_tar(path, folder, out)


def _containers_under(folder: Path, skip: Path) -> list[Path]:
    """Shards and parquet files under `folder`, in a stable order; none from inside `skip` (a
    collection's media folder under the folder holds what was extracted, never a container)."""
    skip = skip.resolve()
    found: list[Path] = []
    for directory, subfolders, files in os.walk(folder):
        if Path(directory).resolve() == skip:
            subfolders.clear()
            continue
        subfolders.sort()
        found.extend(Path(directory) / name for name in sorted(files) if _container_name(name) and not name.startswith("."))
    return [path for path in found if path.is_file()]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def _write_once(target: Path, data: bytes) -> None:
    if target.exists() and target.stat().st_size == len(data):
        return  # extracted by an earlier run: keep its mtime, so the sync sees it unchanged
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def _expand_tar(shard: Path, folder: Path, out: ExpandedInputs) -> None:
    """webdataset: members grouped by key (the name up to its first dot); an image member and a
    `.txt` / `.json` caption member of the same key belong together."""
    try:
        with tarfile.open(shard) as tar:
            captions: dict[str, str] = {}
            images: dict[str, Path] = {}
            written: set[Path] = set()  # every image member (a key may hold more than one)
            for member in tar:
                if not member.isfile():
                    continue
                directory, base = os.path.split(member.name)
                key, _, extension = base.partition(".")
                key = os.path.join(directory, key)
                suffix = "." + extension.lower().rsplit(".", 1)[-1] if extension else ""
                extracted = tar.extractfile(member)
                if extracted is None:  # not a regular file after all
                    continue
                data = extracted.read()
                if suffix in IMAGE_SUFFIXES:
                    images[key] = folder / (_safe(key.replace(os.sep, "__")) + suffix)
                    _write_once(images[key], data)
                    written.add(images[key])
                elif suffix in (".txt", ".json"):
                    caption = _caption_from(data, suffix)
                    if caption:
                        captions[key] = caption
            out.captions.extend(captions.values())
            out.caption_images.extend(images.get(key) for key in captions)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise BtsearchError(f"cannot read the shard {shard}: {error}") from error
    _extracted(folder, shard, written, out)


def _caption_from(data: bytes, suffix: str) -> str | None:
    text = data.decode("utf-8", errors="replace").strip()
    if suffix == ".txt":
        return text or None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict):
        for key in CAPTION_KEYS:
            if isinstance(value.get(key), str) and value[key].strip():
                return value[key].strip()
    return None


def _expand_parquet(table_path: Path, folder: Path, out: ExpandedInputs) -> None:
    """A column of file paths (relative ones to the parquet's folder) or of image bytes (also
    Hugging Face's {"bytes", "path"} struct), and an optional caption column."""
    try:
        table = pq.read_table(table_path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
        raise BtsearchError(f"cannot read the parquet file {table_path}: {error}") from error
    names = {name.lower(): name for name in table.column_names}
    path_column = next((names[c] for c in PATH_COLUMNS if c in names), None)
    bytes_column = next((names[c] for c in BYTES_COLUMNS if c in names), None)
    caption_column = next((names[c] for c in CAPTION_COLUMNS if c in names), None)
    if path_column is None and bytes_column is None:
        raise BtsearchError(
            f"{table_path} has no image column: name one {', '.join(PATH_COLUMNS)} (file paths) or {', '.join(BYTES_COLUMNS)} (image bytes)"
        )
    captions = table.column(caption_column).to_pylist() if caption_column else [None] * table.num_rows
    row_images: list[Path | None] = [None] * table.num_rows
    if bytes_column is not None:
        for row, value in enumerate(table.column(bytes_column).to_pylist()):
            data = value.get("bytes") if isinstance(value, dict) else value
            if not data:
                continue
            row_images[row] = folder / f"row{row:08d}{_image_suffix(data)}"
            _write_once(row_images[row], bytes(data))  # type: ignore[arg-type]
        _extracted(folder, table_path, {image for image in row_images if image is not None}, out)
    else:
        for row, value in enumerate(table.column(path_column).to_pylist()):
            if value:
                path = Path(value)
                path = path if path.is_absolute() else table_path.parent / path
                if path.exists():
                    out.roots.append(path)
                    row_images[row] = path
                else:
                    out.missing.append((path, f"listed in {table_path.name} but not on disk"))
    for caption, image in zip(captions, row_images):
        if caption is not None and str(caption).strip():
            out.captions.append(str(caption).strip())
            out.caption_images.append(image)


def _image_suffix(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = (image.format or "").lower()
    except (UnidentifiedImageError, OSError):
        return ".jpg"  # not an image: indexing will skip it, naming why
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(kind, f".{kind}" if f".{kind}" in IMAGE_SUFFIXES else ".jpg")
