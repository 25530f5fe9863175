"""Writing generated images and videos atomically, with their provenance (PNG text chunk, video comment)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from .errors import UsageError
from .files import STDIO, atomic_output, output_target, write_atomic

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
VIDEO_SUFFIXES = (".mp4", ".gif")
PROVENANCE_KEY = "meancache"


def check_output_path(path: str | Path, video: bool = False) -> Path:
    """Fail before any expensive work when the output cannot be written."""
    path = Path(path)
    kinds, what = (VIDEO_SUFFIXES, "video") if video else (tuple(IMAGE_SUFFIXES), "image")
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory; give a file name such as {path / ('out' + kinds[0])}")
    if not path.suffix:
        raise UsageError(f"--out {path} has no extension to name the {what} type; use one of {', '.join(kinds)}")
    if path.suffix.lower() not in kinds:
        raise UsageError(f"--out {path}: unknown {what} type '{path.suffix}'; use one of {', '.join(kinds)}")
    return check_output_directory(path)


def can_write_mp4() -> bool:
    """imageio writes MP4 through its ffmpeg plugin, which needs the imageio-ffmpeg package."""
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def video_output_path(path: str | Path) -> tuple[Path, str | None]:
    """Where a video asked for at `path` is written, and why it differs: MP4 falls back to GIF without ffmpeg."""
    path = Path(path)
    if path.suffix.lower() == ".mp4" and not can_write_mp4():
        gif = path.with_suffix(".gif")
        return gif, f"imageio-ffmpeg is not installed, so the video goes to {gif} as a GIF (pip install imageio-ffmpeg)"
    return path, None


def check_output_directory(path: str | Path, flag: str = "--out") -> Path:
    """The target's directory must exist and be writable (the target is replaced by a rename), or the
    target is a device, FIFO or stdout that is written in place and must itself be writable."""
    path = Path(path)
    target, in_place = output_target(path)
    if in_place:
        if str(path) != STDIO and not os.access(target, os.W_OK):
            raise UsageError(f"{flag} {path} is not writable; choose another {flag}")
        return path
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    links = f" ({path} links to {target})" if path.is_symlink() else ""
    _check_directory(target.parent, f"{flag} {path}", links)
    if not _writable(target.parent):
        raise UsageError(f"{flag} {path}: the directory {target.parent} is not writable{links}; choose another {flag}")
    return path


def check_output_folder(path: str | Path) -> Path:
    """A folder of outputs may exist (a resumed batch) or be created inside an existing directory;
    either way it must be writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file; give a directory")
    _check_directory(path.parent, f"--out {path}")
    if not _writable(path if path.exists() else path.parent):
        raise UsageError(f"--out {path} is not writable; choose another --out")
    return path


def _check_directory(directory: Path, what: str, links: str = "") -> None:
    """Say whether a missing output directory simply does not exist or sits under a file."""
    if directory.is_dir():
        return
    blocker = next((p for p in [directory, *directory.parents] if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        raise UsageError(f"{what}: {blocker} is a file, not a directory{links}; choose another path")
    raise UsageError(f"{what}: the directory {directory} does not exist{links}; create it first")


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


def _frame_array(frame: Any) -> np.ndarray:
    """HxWx3 uint8 from a PIL image or a float array in [0, 1]."""
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    array = np.asarray(frame)
    return array if array.dtype == np.uint8 else (np.clip(array, 0, 1) * 255).round().astype(np.uint8)


def save_video(frames: Sequence[Any], path: str | Path, fps: int, provenance: dict[str, Any]) -> Path:
    """Encode `frames` to a temporary file beside `path`, then rename; return the path written.

    `.mp4` goes through imageio's ffmpeg plugin (H.264); without imageio-ffmpeg it falls back to a GIF
    next to it (see `video_output_path`). `.gif` goes through Pillow. Both carry `provenance` as a comment.
    """
    path, _ = video_output_path(path)
    arrays = [_frame_array(frame) for frame in frames]
    comment = json.dumps(provenance, sort_keys=True)
    if path.suffix.lower() == ".gif":
        images = [Image.fromarray(array) for array in arrays]
        buffer = io.BytesIO()
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], loop=0,
                       duration=round(1000 / fps), comment=comment.encode())
        write_atomic(path, buffer.getvalue())
        return path
    import imageio.v2 as imageio

    with atomic_output(path, suffix=path.suffix) as tmp:
        imageio.mimwrite(tmp, arrays, format="FFMPEG", fps=fps, codec="libx264", quality=8,
                         output_params=["-metadata", f"comment={comment}"])
    return path


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance a PNG written by `save_image`, or a GIF written by `save_video`, carries."""
    with Image.open(path) as image:
        if image.format == "GIF":
            return json.loads(image.info["comment"])
        return json.loads(image.text[PROVENANCE_KEY])
