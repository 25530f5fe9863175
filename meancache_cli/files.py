"""Calibration and schedule files (DESIGN.md §5): dataclasses, validation on load, atomic writes.

Every loader names the field that is wrong; every writer writes a temporary file beside the target
and renames it, so an interrupted run never leaves a half-written file. `-` is stdin/stdout.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from .core.planner import computed_run
from .core.stability import COST_KINDS
from .errors import FileFormatError

FORMAT_VERSION = 1
CALIBRATION_KIND = "meancache-calibration"
SCHEDULE_KIND = "meancache-schedule"
STDIO = "-"


def output_target(path: str | Path) -> tuple[Path, bool]:
    """Where bytes written to `path` really land, and whether they must be written there in place.

    A symlink is followed to its final target, which is then replaced by a rename in its own
    directory, so the link stays a link. A device, a FIFO, a socket, or an open descriptor reached
    through /proc (`/dev/stdout`, `/dev/fd/N`) is written in place: a rename would replace the special
    file or the system's link instead of writing to it. `-` is stdout.
    """
    if str(path) == STDIO:
        return Path(STDIO), True
    current = Path.cwd() / path
    for _ in range(40):  # Linux's SYMLOOP_MAX
        current = Path(os.path.realpath(current.parent)) / current.name
        if current.parts[1:2] == ("proc",):
            return current, True
        if not current.is_symlink():
            break
        current = current.parent / os.readlink(current)
    else:
        raise FileFormatError(f"cannot write {path}: too many levels of symbolic links")
    try:
        mode = current.stat().st_mode
    except OSError:
        return current, False
    return current, not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def writes_to_stdout(path: str | Path) -> bool:
    """`-`, `/dev/stdout` and the like: where the command's own output goes."""
    target, in_place = output_target(path)
    return str(target) == STDIO or (in_place and str(target) in ("/proc/self/fd/1", f"/proc/{os.getpid()}/fd/1"))


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path`: through a temporary file renamed over the target, or in place for
    stdout (`-`), devices and FIFOs (see `output_target`)."""
    target, in_place = output_target(path)
    if in_place:
        _write_in_place(path, target, data)
        return
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def atomic_output(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file (named with `suffix`, for writers that infer the format) whose content
    replaces `path` when the block succeeds; on failure or interrupt the target is left as it was."""
    target, in_place = output_target(path)
    directory = None if in_place else target.parent
    if directory is not None and not directory.is_dir():
        raise FileFormatError(f"cannot write {path}: the directory {directory} does not exist; create it first")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=suffix)
        os.close(fd)
    except OSError as error:
        raise FileFormatError(f"cannot write {path}: {error.strerror}; choose a writable directory") from None
    try:
        yield Path(tmp)
        if in_place:
            _write_in_place(path, target, Path(tmp).read_bytes())
        else:
            os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask())
            os.replace(tmp, target)
    except OSError as error:
        raise FileFormatError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _write_in_place(path: str | Path, target: Path, data: bytes) -> None:
    """Stdout, one of this process's open descriptors (/proc/self/fd/N), or a device or FIFO."""
    if str(path) == STDIO:
        if sys.stdout is None:
            raise FileFormatError("cannot write to stdout (-): it is closed; pass --out FILE")
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    descriptor = re.fullmatch(r"/proc/(?:self|(\d+))/fd/(\d+)", str(target))
    try:
        if descriptor and int(descriptor[1] or os.getpid()) == os.getpid():
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:
                    stream.flush()
            view = memoryview(data)
            while view:
                view = view[os.write(int(descriptor[2]), view):]
            return
        with open(target, "wb") as handle:
            handle.write(data)
    except OSError as error:
        if error.errno == errno.EPIPE:
            raise
        raise FileFormatError(f"cannot write {path}: {error.strerror or error}") from None


def _umask() -> int:
    """The process umask (only readable by setting it), so outputs get the usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_bytes(path: str | Path, what: str) -> bytes:
    """The whole file (or stdin for `-`), with a one-line error when it cannot be read."""
    if str(path) == STDIO:
        if sys.stdin is None or sys.stdin.closed:
            raise FileFormatError(f"cannot read the {what} from stdin (-): stdin is closed; pipe it in or pass a file")
        if sys.stdin.isatty():
            raise FileFormatError(f"the {what} should come from stdin (-), but stdin is a terminal; pipe it in "
                                  "(e.g. meancache plan ... | meancache generate --schedule - ...) or pass a file")
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileFormatError(f"{what} file {path} does not exist: check the path") from None
    except IsADirectoryError:
        raise FileFormatError(f"{what} file {path} is a directory: pass the file inside it") from None
    except OSError as error:
        raise FileFormatError(f"cannot read {what} file {path}: {error.strerror}") from None


def reference_from(file: str | Path, target: str | Path) -> str:
    """How `file` should name `target`: an absolute path stays absolute; a relative one is made relative
    to `file`'s directory, so the two can move together and be found from any working directory."""
    if Path(target).is_absolute():
        return str(target)
    return os.path.relpath(os.path.abspath(target), os.path.dirname(os.path.abspath(file)))


def resolve_reference(file: str | Path, reference: str) -> Path:
    """The path a file names: relative to the file's directory (see `reference_from`), else, for files
    written before that rule, relative to the working directory."""
    beside = Path(file).parent / reference
    return beside if beside.exists() or not Path(reference).exists() else Path(reference)


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _require(data: dict, name: str, kind: type | tuple[type, ...], source: str) -> Any:
    """One field of a loaded mapping, checked for presence and type."""
    if name not in data:
        raise FileFormatError(f"{source}: the field '{name}' is missing")
    value = data[name]
    if isinstance(value, bool) and kind is not bool:
        raise FileFormatError(f"{source}: '{name}' must be {_kind_name(kind)}, not {value!r}")
    if not isinstance(value, kind):
        raise FileFormatError(f"{source}: '{name}' must be {_kind_name(kind)}, not {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        kinds = tuple(k for k in kinds if k is not int)
    return " or ".join({int: "an integer", float: "a number", str: "a string", list: "a list",
                        dict: "a mapping", bool: "true or false", type(None): "null"}.get(k, k.__name__)
                       for k in kinds)


def _check_header(data: dict, kind: str, source: str) -> None:
    found = data.get("kind")
    if found != kind:
        other = {SCHEDULE_KIND: "a schedule", CALIBRATION_KIND: "a calibration"}.get(found, "not a MeanCache file")
        expected = "a schedule" if kind == SCHEDULE_KIND else "a calibration"
        raise FileFormatError(f"{source} is {other}, but {expected} is needed here")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise FileFormatError(
            f"{source}: format_version {version!r} is not supported (this meancache reads version "
            f"{FORMAT_VERSION}); recreate the file with this version"
        )


@dataclass(frozen=True)
class Schedule:
    """Which steps run the model and with which order K: the output of `plan`, input of `generate`."""

    model: str
    num_inference_steps: int
    compute_steps: list[int]
    orders: list[int]
    gamma: float = 0.5
    cost: str = "displacement"
    predicted_cost: float = 0.0
    edge_costs: list[float] = field(default_factory=list)
    max_skip: int | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    calibration: dict[str, str] | None = None

    @property
    def budget(self) -> int:
        return len(self.compute_steps)

    def validate(self, source: str) -> None:
        """Raise FileFormatError naming the first inconsistent field."""
        n, steps, orders = self.num_inference_steps, self.compute_steps, self.orders
        if n < 1:
            raise FileFormatError(f"{source}: 'num_inference_steps' must be ≥ 1, not {n}")
        if not steps or steps[0] != 0:
            raise FileFormatError(f"{source}: 'compute_steps' must start at step 0, not {steps[:1] or 'empty'}")
        if any(b <= a for a, b in zip(steps, steps[1:])) or steps[-1] >= n:
            raise FileFormatError(
                f"{source}: 'compute_steps' must be strictly ascending step indices below num_inference_steps={n}"
            )
        if len(orders) != len(steps):
            raise FileFormatError(
                f"{source}: 'orders' has {len(orders)} entries but 'compute_steps' has {len(steps)}: one K per step"
            )
        for index, (t, k) in enumerate(zip(steps, orders)):
            run = computed_run(steps, index)
            if not 0 <= k <= run:
                raise FileFormatError(
                    f"{source}: 'orders' gives K={k} at step {t}, but only the {run} step(s) before it are computed: "
                    f"K must lie in 0…{run}, the JVP reads only computed velocities"
                )
        if self.edge_costs and len(self.edge_costs) != len(steps):
            raise FileFormatError(f"{source}: 'edge_costs' must have one entry per compute step")
        if self.cost not in COST_KINDS:
            raise FileFormatError(f"{source}: 'cost' must be one of {', '.join(COST_KINDS)}, not {self.cost!r}")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise FileFormatError(f"{source}: 'gamma' must be a finite number ≥ 0, not {self.gamma}")

    def to_yaml(self) -> str:
        data = {"format_version": FORMAT_VERSION, "kind": SCHEDULE_KIND, "budget": self.budget, **asdict(self)}
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()


_SCHEDULE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": str, "num_inference_steps": int, "compute_steps": list, "orders": list,
    "gamma": (int, float), "cost": str, "predicted_cost": (int, float), "edge_costs": list,
    "max_skip": (int, type(None)), "height": (int, type(None)), "width": (int, type(None)),
    "frames": (int, type(None)), "calibration": (dict, type(None)),
}


def parse_schedule(text: str, source: str) -> Schedule:
    """A Schedule from YAML text, validated field by field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        message = f"{source} is not valid YAML{where}: fix it or plan it again with 'meancache plan'"
        raise FileFormatError(message) from None
    if not isinstance(data, dict):
        raise FileFormatError(f"{source} is not a MeanCache schedule (expected a YAML mapping)")
    _check_header(data, SCHEDULE_KIND, source)
    values = {name: _require(data, name, kind, source) for name, kind in _SCHEDULE_FIELDS.items()}
    for name in ("compute_steps", "orders"):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values[name]):
            raise FileFormatError(f"{source}: '{name}' must be a list of integers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values["edge_costs"]):
        raise FileFormatError(f"{source}: 'edge_costs' must be a list of numbers")
    budget = _require(data, "budget", int, source)
    if budget != len(values["compute_steps"]):
        raise FileFormatError(
            f"{source}: 'budget' is {budget} but 'compute_steps' lists {len(values['compute_steps'])} steps"
        )
    values["gamma"] = float(values["gamma"])
    values["predicted_cost"] = float(values["predicted_cost"])
    schedule = Schedule(**values)
    schedule.validate(source)
    return schedule


def load_schedule(path: str | Path) -> Schedule:
    """Read and validate a schedule file (`-` for stdin)."""
    source = "stdin" if str(path) == STDIO else str(path)
    raw = read_bytes(path, "schedule")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        if _calibration_metadata(raw) is not None:
            raise FileFormatError(f"{source} is a calibration, but a schedule is needed here") from None
        raise FileFormatError(f"{source} is not a YAML schedule (binary data): pass a schedule file") from None
    return parse_schedule(text, source)


def save_schedule(schedule: Schedule, path: str | Path) -> None:
    write_atomic(path, schedule.to_yaml().encode())


@dataclass
class Calibration:
    """Mean error maps of the uncached sampler and where they came from."""

    model: str
    pipeline_class: str
    sigmas: np.ndarray
    errors: np.ndarray
    step_statistics: dict[str, np.ndarray]
    prompts: list[str]
    seeds: list[int]
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    guidance: dict[str, Any] = field(default_factory=dict)
    model_revision: str | None = None
    trajectories: int = 0

    @property
    def num_inference_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def kmax(self) -> int:
        return self.errors.shape[0] - 1

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "kind": CALIBRATION_KIND, "model": self.model,
            "model_revision": self.model_revision, "pipeline_class": self.pipeline_class,
            "num_inference_steps": self.num_inference_steps, "kmax": self.kmax, "height": self.height,
            "width": self.width, "frames": self.frames, "guidance": self.guidance, "prompts": self.prompts,
            "seeds": self.seeds, "trajectories": self.trajectories,
        }

    def to_bytes(self) -> bytes:
        arrays = {"errors": self.errors, "sigmas": self.sigmas, **self.step_statistics}
        arrays = {name: np.ascontiguousarray(a, dtype=np.float64) for name, a in arrays.items()}
        return save_safetensors(arrays, metadata={"meancache": json.dumps(self.metadata())})


STEP_STATISTICS = ("velocity_norm", "velocity_change", "mean_velocity_change")


def _calibration_metadata(raw: bytes) -> dict | None:
    """The meancache metadata of a safetensors file, or None when `raw` is not one."""
    try:
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        meta = json.loads(header.get("__metadata__", {}).get("meancache", "null"))
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_schedule_text(raw: bytes) -> bool:
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("kind") == SCHEDULE_KIND


def parse_calibration(raw: bytes, source: str) -> Calibration:
    """A Calibration from safetensors bytes, with every array checked against the metadata."""
    if _is_schedule_text(raw):
        raise FileFormatError(f"{source} is a schedule, but a calibration is needed here")
    meta = _calibration_metadata(raw)
    try:
        arrays = load_safetensors(raw)
    except (SafetensorError, ValueError):
        meta = None
    if meta is None:
        raise FileFormatError(
            f"{source} is not a readable calibration (truncated, corrupted or another kind of file): "
            "run 'meancache calibrate' again"
        )
    _check_header(meta, CALIBRATION_KIND, source)
    for name in ("errors", "sigmas", *STEP_STATISTICS):
        if name not in arrays:
            raise FileFormatError(f"{source}: the array '{name}' is missing")
    n = _require(meta, "num_inference_steps", int, source)
    kmax = _require(meta, "kmax", int, source)
    sigmas, errors = arrays["sigmas"], arrays["errors"]
    if sigmas.shape != (n + 1,):
        raise FileFormatError(f"{source}: 'sigmas' has shape {sigmas.shape}, expected ({n + 1},)")
    if not np.all(np.isfinite(sigmas)) or np.any(np.diff(sigmas) >= 0):
        raise FileFormatError(f"{source}: 'sigmas' must be finite and strictly decreasing")
    if errors.shape != (kmax + 1, n + 1, n + 1):
        raise FileFormatError(f"{source}: 'errors' has shape {errors.shape}, expected {(kmax + 1, n + 1, n + 1)}")
    defined = defined_edges(kmax, n)
    if np.any(np.isinf(errors)) or np.any(np.isnan(errors[defined])):
        raise FileFormatError(f"{source}: 'errors' holds NaN or Inf in defined entries: calibrate again")
    if np.any(errors[defined] < 0):
        raise FileFormatError(f"{source}: 'errors' holds negative values: calibrate again")
    for name in STEP_STATISTICS:
        if arrays[name].shape != (n,):
            raise FileFormatError(f"{source}: '{name}' has shape {arrays[name].shape}, expected ({n},)")
    return Calibration(
        model=_require(meta, "model", str, source),
        pipeline_class=_require(meta, "pipeline_class", str, source),
        sigmas=sigmas, errors=errors,
        step_statistics={name: arrays[name] for name in STEP_STATISTICS},
        prompts=_require(meta, "prompts", list, source), seeds=_require(meta, "seeds", list, source),
        height=_require(meta, "height", (int, type(None)), source),
        width=_require(meta, "width", (int, type(None)), source),
        frames=_require(meta, "frames", (int, type(None)), source),
        guidance=_require(meta, "guidance", dict, source),
        model_revision=_require(meta, "model_revision", (str, type(None)), source),
        trajectories=_require(meta, "trajectories", int, source),
    )


def defined_edges(kmax: int, n: int) -> np.ndarray:
    """Mask of the (K, t, s) entries an error map defines: t < s and t − K ≥ 0."""
    k, t, s = np.meshgrid(np.arange(kmax + 1), np.arange(n + 1), np.arange(n + 1), indexing="ij")
    return (t < s) & (t - k >= 0) & (t < n)


def load_file(path: str | Path) -> Calibration | Schedule:
    """A calibration or a schedule, whichever the file holds."""
    source = "stdin" if str(path) == STDIO else str(path)
    raw = read_bytes(path, "input")
    if _calibration_metadata(raw) is not None:
        return parse_calibration(raw, source)
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        data = None
    if not isinstance(data, dict):
        raise FileFormatError(
            f"{source} is neither a MeanCache calibration nor a schedule (truncated, corrupted or another kind of file)"
        )
    return parse_schedule(raw.decode("utf-8"), source)


def load_calibration(path: str | Path) -> Calibration:
    source = "stdin" if str(path) == STDIO else str(path)
    return parse_calibration(read_bytes(path, "calibration"), source)


def save_calibration(calibration: Calibration, path: str | Path) -> None:
    write_atomic(path, calibration.to_bytes())

