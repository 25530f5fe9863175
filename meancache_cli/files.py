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
from typing import Any, NamedTuple

import numpy as np
import yaml
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from . import defaults
from .core.stability import COST_KINDS, EDGE_KINDS, EdgeErrors, defined_mask
from .errors import FileFormatError, interrupts_raise

# Version 3: schedules name each edge's estimate (`kinds`) and may carry their validation; calibrations add
# the exponential edge's map and held-out runs. Version-2 schedules are still read (their edges are reuse or
# JVP); version-2 calibrations are not (they lack both).
FORMAT_VERSION = 3
READABLE_SCHEDULE_VERSIONS = (2, 3)
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
    interrupts_raise()  # a signal from here on must reach the clean-up below
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
    if version == 1:
        redo = ("plan it again with 'meancache plan' (its orders counted sampler steps, now they count "
                "compute steps)" if kind == SCHEDULE_KIND else "run 'meancache calibrate' again (its maps "
                "lack the previous compute step that edge costs now depend on)")
        raise FileFormatError(f"{source} is a format version 1 file, which this meancache no longer reads: {redo}")
    if version == 2 and kind == CALIBRATION_KIND:
        raise FileFormatError(f"{source} is a format version 2 calibration, which this meancache no longer reads: "
                              "run 'meancache calibrate' again (it lacks the exponential edge's map and the held-out "
                              "runs that plans are validated on)")
    if version not in (READABLE_SCHEDULE_VERSIONS if kind == SCHEDULE_KIND else (FORMAT_VERSION,)):
        raise FileFormatError(
            f"{source}: format_version {version!r} is not supported (this meancache reads version "
            f"{FORMAT_VERSION}); recreate the file with this version"
        )


ESTIMATORS = ("meancache", "release")


class Edge(NamedTuple):
    """One edge of a schedule: the model runs at `start`, and its estimate serves every step up to `end`."""

    start: int
    end: int
    order: int
    damping: float
    kind: str


@dataclass(frozen=True)
class Schedule:
    """Which steps run the model and how each edge is estimated: the output of `plan`, input of `generate`.

    `estimator: meancache`: `kinds[i]` is the edge's estimate (`reuse` v_t, the damped `jvp`, or the exponential
    integrator `exp`), `orders[i]` its K (0 for reuse; K ≥ 1 = the K-th previous compute step it reads) and
    `lambdas[i]` the JVP's damping λ (0 for reuse, 1 for exp; required wherever an order is set). `estimator:
    release`: `orders[i]` is the authors' sliding window (1 = reuse, 0 on edges without a skipped step),
    `lambdas` are all 0 and `kinds` all reuse. `validation`, when the plan was validated, holds every candidate
    recipe's measured score on held-out calibration runs and which one was chosen. `sigmas` (optional, written
    by `plan`): the N + 1 sigmas it was planned on, so it can be applied by σ at another step count or
    resolution; without them its steps are taken on the run's own grid.
    """

    model: str
    num_inference_steps: int
    compute_steps: list[int]
    orders: list[int]
    lambdas: list[float] = field(default_factory=list)
    estimator: str = "meancache"
    gamma: float = defaults.RECIPE.gamma
    cost: str = defaults.RECIPE.cost
    predicted_cost: float = 0.0
    edge_costs: list[float] = field(default_factory=list)
    max_skip: int | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    calibration: dict[str, str] | None = None
    notes: str | None = None
    kinds: list[str] = field(default_factory=list)
    validation: dict[str, Any] | None = None
    sigmas: list[float] | None = None

    def __post_init__(self) -> None:
        if not self.lambdas and (self.estimator == "release" or not any(self.orders)):
            # Nothing to choose: a release schedule and a reuse edge (K = 0) have no damping. Where an order is
            # set the damping must be given: `validate` names the missing field.
            object.__setattr__(self, "lambdas", [0.0] * len(self.orders))
        if not self.kinds:
            # A version-2 schedule: every edge with an order and a damping is the JVP, the rest reuse.
            meancache = self.estimator == "meancache"
            object.__setattr__(self, "kinds", ["jvp" if meancache and k and lam else "reuse"
                                               for k, lam in zip(self.orders, self.lambdas)])

    @property
    def budget(self) -> int:
        return len(self.compute_steps)

    @property
    def edges(self) -> list[Edge]:
        """Every edge, in order."""
        ends = [*self.compute_steps[1:], self.num_inference_steps]
        return [Edge(*values) for values in zip(self.compute_steps, ends, self.orders, self.lambdas, self.kinds)]

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
        if not self.lambdas and any(orders):
            raise FileFormatError(f"{source}: 'lambdas' is missing: give each edge's damping λ (0 where K = 0, 1 for "
                                  "the full JVP correction), one per step")
        for name, values in (("orders", orders), ("lambdas", self.lambdas), ("kinds", self.kinds),
                             ("edge_costs", self.edge_costs)):
            if (values or name != "edge_costs") and len(values) != len(steps):
                raise FileFormatError(
                    f"{source}: '{name}' has {len(values)} entries but 'compute_steps' has {len(steps)}: one per step"
                )
        if self.estimator not in ESTIMATORS:
            raise FileFormatError(
                f"{source}: 'estimator' must be one of {', '.join(ESTIMATORS)}, not {self.estimator!r}")
        unknown = [kind for kind in self.kinds if kind not in EDGE_KINDS]
        if unknown:
            raise FileFormatError(f"{source}: 'kinds' holds {unknown[0]!r}: use one of {', '.join(EDGE_KINDS)}")
        if self.estimator == "release":
            if any(k < 0 for k in orders) or any(self.lambdas) or set(self.kinds) != {"reuse"}:
                raise FileFormatError(f"{source}: a release schedule needs windows ≥ 0 in 'orders', 0 in 'lambdas' "
                                      "and reuse in 'kinds'")
        else:
            for index, (t, k, damping, kind) in enumerate(zip(steps, orders, self.lambdas, self.kinds)):
                if not 0 <= k <= index:
                    raise FileFormatError(
                        f"{source}: 'orders' gives K={k} at step {t}, but {index} compute step(s) come before it: "
                        f"K must lie in 0…{index} (the K-th previous compute step must exist)"
                    )
                if (kind == "reuse") != (k == 0):
                    raise FileFormatError(f"{source}: step {t} is a {kind} edge with K={k}: reuse edges have K = 0, "
                                          "jvp and exp edges K ≥ 1")
                if not (math.isfinite(damping) and 0 <= damping <= 1) or (k == 0 and damping != 0):
                    raise FileFormatError(
                        f"{source}: 'lambdas' gives λ={damping} at step {t}: use a damping in 0…1, and 0 where K = 0"
                    )
                if kind == "exp" and damping != 1:
                    raise FileFormatError(f"{source}: 'lambdas' gives λ={damping} for the exp edge at step {t}: "
                                          "exponential edges are undamped, use 1")
        if self.cost not in COST_KINDS:
            raise FileFormatError(f"{source}: 'cost' must be one of {', '.join(COST_KINDS)}, not {self.cost!r}")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise FileFormatError(f"{source}: 'gamma' must be a finite number ≥ 0, not {self.gamma}")
        if self.sigmas is not None and (len(self.sigmas) != n + 1 or not all(map(math.isfinite, self.sigmas))
                                        or any(b >= a for a, b in zip(self.sigmas, self.sigmas[1:]))):
            raise FileFormatError(f"{source}: 'sigmas' must be num_inference_steps + 1 = {n + 1} finite, strictly "
                                  "decreasing numbers (or be left out)")

    def to_yaml(self) -> str:
        data = {"format_version": FORMAT_VERSION, "kind": SCHEDULE_KIND, "budget": self.budget, **asdict(self)}
        if self.sigmas is None:
            del data["sigmas"]  # optional: a schedule without them reads and hashes as before
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100, allow_unicode=True)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()


_SCHEDULE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": str, "num_inference_steps": int, "compute_steps": list, "orders": list, "lambdas": list,
    "estimator": str, "gamma": (int, float), "cost": str, "predicted_cost": (int, float), "edge_costs": list,
    "max_skip": (int, type(None)), "height": (int, type(None)), "width": (int, type(None)),
    "frames": (int, type(None)), "calibration": (dict, type(None)), "notes": (str, type(None)),
}
# Fields a version-2 schedule does not have.
_SCHEDULE_FIELDS_V3: dict[str, type | tuple[type, ...]] = {"kinds": list, "validation": (dict, type(None))}


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
    fields = {**_SCHEDULE_FIELDS, **(_SCHEDULE_FIELDS_V3 if data["format_version"] >= 3 else {})}
    values = {name: _require(data, name, kind, source) for name, kind in fields.items()}
    if not all(isinstance(v, str) for v in values.get("kinds", [])):
        raise FileFormatError(f"{source}: 'kinds' must be a list of strings")
    for name in ("compute_steps", "orders"):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values[name]):
            raise FileFormatError(f"{source}: '{name}' must be a list of integers")
    for name in ("lambdas", "edge_costs"):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values[name]):
            raise FileFormatError(f"{source}: '{name}' must be a list of numbers")
        values[name] = [float(v) for v in values[name]]
    budget = _require(data, "budget", int, source)
    if budget != len(values["compute_steps"]):
        raise FileFormatError(
            f"{source}: 'budget' is {budget} but 'compute_steps' lists {len(values['compute_steps'])} steps"
        )
    values["gamma"] = float(values["gamma"])
    sigmas = data.get("sigmas")
    if sigmas is not None:
        if not (isinstance(sigmas, list)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sigmas)):
            raise FileFormatError(f"{source}: 'sigmas' must be a list of numbers (or be left out)")
        values["sigmas"] = [float(v) for v in sigmas]
    values["predicted_cost"] = float(values["predicted_cost"])
    schedule = Schedule(**values)
    schedule.validate(source)
    return schedule


SHIPPED_SCHEDULES = Path(__file__).parent / "schedules"


def shipped_schedules() -> dict[str, Path]:
    """The schedules installed with the package, by name (`<model>/<file stem>`, e.g. `qwen-image/authors-b10`)."""
    return {f"{path.parent.name}/{path.stem}": path for path in sorted(SHIPPED_SCHEDULES.glob("*/*.yaml"))}


def shipped_schedule_for(model: str, budget: int) -> str:
    """The shipped schedule `generate --budget` uses: `<model>/b<B>` (planned by meancache), else the
    authors' `<model>/authors-b<B>`; one line saying how to calibrate when there is none."""
    shipped = shipped_schedules()
    for name in (f"{model}/b{budget}", f"{model}/authors-b{budget}"):
        if name in shipped:
            return name
    budgets = sorted({int(name.rsplit("b", 1)[1]) for name in shipped if name.startswith(f"{model}/")})
    have = f"shipped budgets for {model}: {', '.join(map(str, budgets))}" if budgets else f"none ships for {model}"
    raise FileFormatError(
        f"no shipped schedule for {model} at budget {budget} ({have}): run 'meancache calibrate --model {model}' "
        f"and 'meancache plan --budget {budget}', then pass --schedule FILE"
    )


def load_schedule(path: str | Path) -> Schedule:
    """Read and validate a schedule file (`-` for stdin) or a shipped schedule by name."""
    if str(path) != STDIO and not Path(path).exists() and str(path) in shipped_schedules():
        path = shipped_schedules()[str(path)]
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
class HeldOutRun:
    """A calibration run kept out of the maps: the start noise the pipeline drew for (prompt, seed) and its
    uncached final latents (as `output_type="latent"` returns them), to validate plans against."""

    prompt: str
    seed: int
    noise: np.ndarray
    final: np.ndarray


@dataclass
class Calibration:
    """Mean error maps of the uncached sampler, held-out runs, and where they came from."""

    model: str
    pipeline_class: str
    sigmas: np.ndarray
    errors: EdgeErrors
    step_statistics: dict[str, np.ndarray]
    prompts: list[str]
    seeds: list[int]
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    guidance: dict[str, Any] = field(default_factory=dict)
    model_revision: str | None = None
    trajectories: int = 0
    elements: int = 0
    latent_elements: int = 0
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    held_out: list[HeldOutRun] = field(default_factory=list)
    stability: dict[str, Any] | None = None

    @property
    def num_inference_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def max_back(self) -> int:
        return self.errors.max_back

    @property
    def evaluations_per_branch(self) -> int:
        """Model evaluations per guidance branch its runs made (every prompt with every seed, held out or not)."""
        return len(self.prompts) * len(self.seeds) * self.num_inference_steps

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "kind": CALIBRATION_KIND, "model": self.model,
            "model_revision": self.model_revision, "pipeline_class": self.pipeline_class,
            "num_inference_steps": self.num_inference_steps, "max_back": self.max_back,
            "lambdas": list(self.errors.lambdas), "height": self.height, "width": self.width, "frames": self.frames,
            "guidance": self.guidance, "prompts": self.prompts, "seeds": self.seeds,
            "trajectories": self.trajectories, "elements": self.elements, "latent_elements": self.latent_elements,
            "call_kwargs": self.call_kwargs, "stability": self.stability,
            "held_out": [{"prompt": run.prompt, "seed": run.seed} for run in self.held_out],
        }

    def to_bytes(self) -> bytes:
        arrays = {"reuse_errors": self.errors.reuse, "jvp_errors": self.errors.jvp, "exp_errors": self.errors.exp,
                  "sigmas": self.sigmas, **self.step_statistics}
        arrays = {name: np.ascontiguousarray(a, dtype=np.float64) for name, a in arrays.items()}
        for index, run in enumerate(self.held_out):
            arrays[f"held_out_{index}_noise"] = np.ascontiguousarray(run.noise, dtype=np.float32)
            arrays[f"held_out_{index}_final"] = np.ascontiguousarray(run.final, dtype=np.float32)
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


def _check_map(source: str, name: str, values: np.ndarray, defined: np.ndarray) -> None:
    if np.any(np.isinf(values)) or np.any(np.isnan(values[defined])):
        raise FileFormatError(f"{source}: '{name}' holds NaN or Inf in defined entries: calibrate again")
    if np.any(values[defined] < 0):
        raise FileFormatError(f"{source}: '{name}' holds negative values: calibrate again")


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
    for name in ("reuse_errors", "jvp_errors", "exp_errors", "sigmas", *STEP_STATISTICS):
        if name not in arrays:
            raise FileFormatError(f"{source}: the array '{name}' is missing")
        if arrays[name].dtype != np.float64:
            raise FileFormatError(
                f"{source}: the array '{name}' holds {arrays[name].dtype} values, not float64: calibrate again")
    n = _require(meta, "num_inference_steps", int, source)
    max_back = _require(meta, "max_back", int, source)
    lambdas = _require(meta, "lambdas", list, source)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in lambdas):
        raise FileFormatError(f"{source}: 'lambdas' must be a list of dampings in (0, 1]")
    sigmas, reuse, jvp, exp = arrays["sigmas"], arrays["reuse_errors"], arrays["jvp_errors"], arrays["exp_errors"]
    if sigmas.shape != (n + 1,):
        raise FileFormatError(f"{source}: 'sigmas' has shape {sigmas.shape}, expected ({n + 1},)")
    if not np.all(np.isfinite(sigmas)) or np.any(np.diff(sigmas) >= 0):
        raise FileFormatError(f"{source}: 'sigmas' must be finite and strictly decreasing")
    for name, values, shape in (("reuse_errors", reuse, (n + 1, n + 1)),
                                ("jvp_errors", jvp, (len(lambdas), max_back, n + 1, n + 1)),
                                ("exp_errors", exp, (1, max_back, n + 1, n + 1))):
        if values.shape != shape:
            raise FileFormatError(f"{source}: '{name}' has shape {values.shape}, expected {shape}")
    reuse_defined, jvp_defined = defined_mask(n, max_back, len(lambdas))
    _check_map(source, "reuse_errors", reuse, reuse_defined)
    _check_map(source, "jvp_errors", jvp, jvp_defined)
    _check_map(source, "exp_errors", exp, defined_mask(n, max_back, 1)[1])
    for name in STEP_STATISTICS:
        if arrays[name].shape != (n,):
            raise FileFormatError(f"{source}: '{name}' has shape {arrays[name].shape}, expected ({n},)")
    return Calibration(
        model=_require(meta, "model", str, source),
        pipeline_class=_require(meta, "pipeline_class", str, source),
        sigmas=sigmas, errors=EdgeErrors(reuse, jvp, tuple(float(v) for v in lambdas), exp),
        step_statistics={name: arrays[name] for name in STEP_STATISTICS},
        prompts=_require(meta, "prompts", list, source), seeds=_require(meta, "seeds", list, source),
        height=_require(meta, "height", (int, type(None)), source),
        width=_require(meta, "width", (int, type(None)), source),
        frames=_require(meta, "frames", (int, type(None)), source),
        guidance=_require(meta, "guidance", dict, source),
        model_revision=_require(meta, "model_revision", (str, type(None)), source),
        trajectories=_require(meta, "trajectories", int, source),
        elements=_require(meta, "elements", int, source),
        latent_elements=_require(meta, "latent_elements", int, source),
        call_kwargs=_require(meta, "call_kwargs", dict, source),
        held_out=_held_out_runs(meta, arrays, source),
        stability=_require(meta, "stability", (dict, type(None)), source),
    )


def _held_out_runs(meta: dict, arrays: dict[str, np.ndarray], source: str) -> list[HeldOutRun]:
    """The held-out runs the metadata lists, each with its two latents."""
    runs = []
    for index, entry in enumerate(_require(meta, "held_out", list, source)):
        if not (isinstance(entry, dict) and isinstance(entry.get("prompt"), str)
                and isinstance(entry.get("seed"), int)):
            raise FileFormatError(f"{source}: 'held_out' entry {index} must be a mapping with a prompt and a seed")
        latents = [arrays.get(f"held_out_{index}_{part}") for part in ("noise", "final")]
        if any(array is None for array in latents):
            raise FileFormatError(f"{source}: the latents of held-out run {index} are missing: calibrate again")
        runs.append(HeldOutRun(entry["prompt"], entry["seed"], *latents))
    return runs


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

