"""Writing generated images atomically, with their provenance in a PNG text chunk."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .errors import UsageError
from .files import write_atomic

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
PROVENANCE_KEY = "meancache"


def check_output_path(path: str | Path) -> Path:
    """Fail before any expensive work when the output cannot be written."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"--out {path}: unknown image type '{path.suffix}'; use one of {', '.join(IMAGE_SUFFIXES)}")
    return check_output_directory(path)


def check_output_directory(path: str | Path) -> Path:
    """The target's directory must exist and be writable; the target itself is replaced atomically."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"--out {path}: the directory {parent} does not exist; create it first")
    if not _writable(parent):
        raise UsageError(f"--out {path}: the directory {parent} is not writable; choose another --out")
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory; give a file name")
    return path


def _writable(directory: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def save_image(image: Image.Image, path: str | Path, provenance: dict[str, Any]) -> None:
    """Encode in memory, then write through a rename; PNGs carry `provenance` as JSON text."""
    path = Path(path)
    kind = IMAGE_SUFFIXES[path.suffix.lower()]
    buffer = io.BytesIO()
    if kind == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text(PROVENANCE_KEY, json.dumps(provenance, sort_keys=True))
        image.save(buffer, format=kind, pnginfo=info)
    else:
        image.convert("RGB").save(buffer, format=kind)
    write_atomic(path, buffer.getvalue())


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance a PNG written by `save_image` carries."""
    with Image.open(path) as image:
        return json.loads(image.text[PROVENANCE_KEY])
