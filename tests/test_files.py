import numpy as np
import pytest
import yaml

from meancache_cli.errors import FileFormatError
from meancache_cli.files import (
    Calibration,
    Schedule,
    defined_edges,
    load_calibration,
    load_schedule,
    save_calibration,
    save_schedule,
)


def make_calibration(n: int = 6, kmax: int = 2) -> Calibration:
    rng = np.random.default_rng(0)
    errors = rng.random((kmax + 1, n + 1, n + 1))
    errors[~defined_edges(kmax, n)] = np.nan
    return Calibration(
        model="demo", pipeline_class="FluxPipeline", sigmas=np.linspace(1, 0, n + 1), errors=errors,
        step_statistics={name: rng.random(n) for name in ("velocity_norm", "velocity_change",
                                                           "mean_velocity_change")},
        prompts=["a red circle on a blue background"], seeds=[0, 1], height=32, width=32,
        guidance={"true_cfg_scale": 2.0}, trajectories=4,
    )


SCHEDULE = Schedule(model="demo", num_inference_steps=10, compute_steps=[0, 1, 2, 6], orders=[0, 0, 2, 0],
                    gamma=0.5, cost="displacement", predicted_cost=0.25, edge_costs=[0.1, 0.2, 0.3, 0.1],
                    height=32, width=32, calibration={"path": "c.safetensors", "sha256": "ab" * 32})


def test_schedule_round_trips(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    save_schedule(SCHEDULE, path)
    assert load_schedule(path) == SCHEDULE
    text = path.read_text()
    assert "compute_steps: [0, 1, 2, 6]" in text and text.startswith("format_version: 1\nkind: meancache-schedule")
    assert [p.name for p in tmp_path.iterdir()] == ["s.yaml"]


def test_calibration_round_trips(tmp_path) -> None:
    path = tmp_path / "c.safetensors"
    original = make_calibration()
    save_calibration(original, path)
    loaded = load_calibration(path)
    np.testing.assert_array_equal(loaded.errors, original.errors)
    np.testing.assert_array_equal(loaded.sigmas, original.sigmas)
    for name, values in original.step_statistics.items():
        np.testing.assert_array_equal(loaded.step_statistics[name], values)
    assert loaded.metadata() == original.metadata()
    assert loaded.num_inference_steps == 6 and loaded.kmax == 2


def edited(**changes) -> str:
    data = yaml.safe_load(SCHEDULE.to_yaml())
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    return yaml.safe_dump(data)


@pytest.mark.parametrize(("text", "message"), [
    (edited(compute_steps=[1, 2, 5, 8]), "'compute_steps' must start at step 0"),
    (edited(compute_steps=[0, 5, 2, 8]), "'compute_steps' must be strictly ascending"),
    (edited(compute_steps=[0, 1, 2, 10]), "below num_inference_steps=10"),
    (edited(orders=[0, 1, 2]), "'orders' has 3 entries but 'compute_steps' has 4"),
    (edited(orders=[0, 0, 3, 0]), "'orders' gives K=3 at step 2, but only the 2 step"),
    (edited(orders=[0, 0, 2, 1]), "'orders' gives K=1 at step 6, but only the 0 step"),
    (edited(budget=5), "'budget' is 5 but 'compute_steps' lists 4 steps"),
    (edited(gamma="high"), "'gamma' must be a number"),
    (edited(gamma=-1), "'gamma' must be a finite number ≥ 0"),
    (edited(cost="peak"), "'cost' must be one of displacement, velocity"),
    (edited(num_inference_steps=...), "the field 'num_inference_steps' is missing"),
    (edited(compute_steps=[0, 1.5, 2, 6]), "'compute_steps' must be a list of integers"),
    (edited(format_version=2), "format_version 2 is not supported"),
    (edited(kind="meancache-calibration"), "is a calibration, but a schedule is needed here"),
    ("compute_steps: [0, 1\n", "is not valid YAML at line"),
    ("- just\n- a list\n", "is not a MeanCache schedule"),
])
def test_corrupted_schedules_name_the_bad_field(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(FileFormatError, match=message):
        load_schedule(path)


def test_calibration_passed_as_schedule_and_back(tmp_path) -> None:
    cal, sched = tmp_path / "c.safetensors", tmp_path / "s.yaml"
    save_calibration(make_calibration(), cal)
    save_schedule(SCHEDULE, sched)
    with pytest.raises(FileFormatError, match="is a calibration, but a schedule is needed here"):
        load_schedule(cal)
    with pytest.raises(FileFormatError, match="is a schedule, but a calibration is needed here"):
        load_calibration(sched)


def test_truncated_and_missing_calibrations(tmp_path) -> None:
    path = tmp_path / "c.safetensors"
    save_calibration(make_calibration(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="truncated, corrupted"):
        load_calibration(path)
    with pytest.raises(FileFormatError, match="does not exist"):
        load_calibration(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.errors.__setitem__((1, 2, 4), np.nan), "NaN or Inf in defined entries"),
    (lambda c: c.errors.__setitem__((0, 0, 0), np.inf), "NaN or Inf"),
    (lambda c: c.errors.__setitem__((0, 1, 3), -1.0), "negative values"),
    (lambda c: setattr(c, "sigmas", c.sigmas[::-1].copy()), "strictly decreasing"),
    (lambda c: setattr(c, "errors", c.errors[:, :-1, :-1]), "'errors' has shape"),
])
def test_inconsistent_calibrations_are_rejected(tmp_path, change, message: str) -> None:
    calibration = make_calibration()
    change(calibration)
    path = tmp_path / "c.safetensors"
    save_calibration(calibration, path)
    with pytest.raises(FileFormatError, match=message):
        load_calibration(path)


def test_a_failed_write_leaves_the_old_file_untouched(tmp_path, monkeypatch) -> None:
    path = tmp_path / "s.yaml"
    save_schedule(SCHEDULE, path)
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("meancache_cli.files.os.replace", explode)
    other = Schedule(model="demo", num_inference_steps=10, compute_steps=[0], orders=[0])
    with pytest.raises(KeyboardInterrupt):
        save_schedule(other, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.yaml"]
