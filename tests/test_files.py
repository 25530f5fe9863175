import numpy as np
import pytest
import yaml

from meancache_cli.core.stability import EdgeErrors, defined_mask
from meancache_cli.errors import FileFormatError
from meancache_cli.files import (
    Calibration,
    HeldOutRun,
    Schedule,
    load_calibration,
    load_schedule,
    save_calibration,
    save_schedule,
    shipped_schedule_for,
    shipped_schedules,
)


def make_calibration(n: int = 6, max_back: int = 2) -> Calibration:
    rng = np.random.default_rng(0)
    reuse_defined, jvp_defined = defined_mask(n, max_back, 2)
    reuse = np.where(reuse_defined, rng.random((n + 1, n + 1)), np.nan)
    jvp = np.where(jvp_defined, rng.random((2, max_back, n + 1, n + 1)), np.nan)
    exp = np.where(jvp_defined[:1], rng.random((1, max_back, n + 1, n + 1)), np.nan)
    held = [HeldOutRun("a green star on a white background", 7, rng.random((1, 4, 8)).astype(np.float32),
                       rng.random((1, 4, 8)).astype(np.float32))]
    return Calibration(
        model="demo", pipeline_class="FluxPipeline", sigmas=np.linspace(1, 0, n + 1),
        errors=EdgeErrors(reuse, jvp, (0.5, 1.0), exp), call_kwargs={"num_inference_steps": n, "height": 32},
        held_out=held, stability={"budget": 2, "map_runs": 2, "shared_steps": 1, "regret": 0.25},
        step_statistics={name: rng.random(n) for name in ("velocity_norm", "velocity_change",
                                                           "mean_velocity_change")},
        prompts=["a red circle on a blue background"], seeds=[0, 1], height=32, width=32,
        guidance={"true_cfg_scale": 2.0}, trajectories=4, elements=256, latent_elements=256,
    )


SCHEDULE = Schedule(model="demo", num_inference_steps=10, compute_steps=[0, 1, 2, 6], orders=[0, 1, 2, 1],
                    lambdas=[0.0, 1.0, 0.5, 1.0], gamma=0.5, cost="displacement", predicted_cost=0.25,
                    edge_costs=[0.1, 0.2, 0.3, 0.1], height=32, width=32,
                    calibration={"path": "c.safetensors", "sha256": "ab" * 32})


def test_schedule_round_trips(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    save_schedule(SCHEDULE, path)
    assert load_schedule(path) == SCHEDULE
    text = path.read_text()
    assert "compute_steps: [0, 1, 2, 6]" in text and text.startswith("format_version: 3\nkind: meancache-schedule")
    assert [p.name for p in tmp_path.iterdir()] == ["s.yaml"]


def test_calibration_round_trips(tmp_path) -> None:
    path = tmp_path / "c.safetensors"
    original = make_calibration()
    save_calibration(original, path)
    loaded = load_calibration(path)
    np.testing.assert_array_equal(loaded.errors.reuse, original.errors.reuse)
    np.testing.assert_array_equal(loaded.errors.jvp, original.errors.jvp)
    np.testing.assert_array_equal(loaded.errors.exp, original.errors.exp)
    assert loaded.errors.lambdas == (0.5, 1.0)
    np.testing.assert_array_equal(loaded.sigmas, original.sigmas)
    [held] = loaded.held_out
    assert (held.prompt, held.seed) == ("a green star on a white background", 7)
    np.testing.assert_array_equal(held.noise, original.held_out[0].noise)
    np.testing.assert_array_equal(held.final, original.held_out[0].final)
    for name, values in original.step_statistics.items():
        np.testing.assert_array_equal(loaded.step_statistics[name], values)
    assert loaded.metadata() == original.metadata()
    assert loaded.num_inference_steps == 6 and loaded.max_back == 2


def test_a_schedule_without_dampings_is_refused_where_k_is_set(tmp_path) -> None:
    """No damping is guessed for an edge with an order: the missing field is named, in code and in a file."""
    schedule = Schedule(model="demo", num_inference_steps=8, compute_steps=[0, 2, 5], orders=[0, 1, 2])
    with pytest.raises(FileFormatError, match="s: 'lambdas' is missing: give each edge's damping λ"):
        schedule.validate("s")
    path = tmp_path / "s.yaml"
    path.write_text(edited(lambdas=[], kinds=[]))
    with pytest.raises(FileFormatError, match="s.yaml: 'lambdas' is missing"):
        load_schedule(path)
    reuse = Schedule(model="demo", num_inference_steps=8, compute_steps=[0, 2, 5], orders=[0, 0, 0])
    assert reuse.lambdas == [0.0, 0.0, 0.0]  # reuse edges have no damping: nothing to guess
    assert reuse.edges == [(0, 2, 0, 0.0, "reuse"), (2, 5, 0, 0.0, "reuse"), (5, 8, 0, 0.0, "reuse")]


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
    (edited(compute_steps=[0, 1, 1, 6]), "'compute_steps' must be strictly ascending"),
    (edited(compute_steps=[0, 1, 2, 10]), "below num_inference_steps=10"),
    (edited(orders=[0, 1, 2]), "'orders' has 3 entries but 'compute_steps' has 4"),
    (edited(orders=[0, 1, 3, 1]), "'orders' gives K=3 at step 2, but 2 compute step"),
    (edited(orders=[1, 1, 2, 1]), "'orders' gives K=1 at step 0, but 0 compute step"),
    (edited(lambdas=[0.0, 1.0, 0.5]), "'lambdas' has 3 entries but 'compute_steps' has 4"),
    (edited(lambdas=[0.0, 1.5, 0.5, 1.0]), "'lambdas' gives λ=1.5 at step 1"),
    (edited(lambdas=[0.5, 1.0, 0.5, 1.0]), "'lambdas' gives λ=0.5 at step 0: use a damping in 0…1, and 0 where K"),
    (edited(lambdas=[0, "x", 0, 0]), "'lambdas' must be a list of numbers"),
    (edited(estimator="fast"), "'estimator' must be one of meancache, release"),
    (edited(estimator="release"), "a release schedule needs windows ≥ 0 in 'orders', 0 in 'lambdas' and reuse"),
    (edited(budget=5), "'budget' is 5 but 'compute_steps' lists 4 steps"),
    (edited(gamma="high"), "'gamma' must be a number"),
    (edited(gamma=-1), "'gamma' must be a finite number ≥ 0"),
    (edited(cost="peak"), "'cost' must be one of displacement, velocity"),
    (edited(num_inference_steps=...), "the field 'num_inference_steps' is missing"),
    (edited(compute_steps=[0, 1.5, 2, 6]), "'compute_steps' must be a list of integers"),
    (edited(format_version=4), "format_version 4 is not supported"),
    (edited(format_version=1), "format version 1 file, which this meancache no longer reads: plan it again"),
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
    (lambda c: c.errors.jvp.__setitem__((1, 1, 2, 4), np.nan), "'jvp_errors' holds NaN or Inf in defined entries"),
    (lambda c: c.errors.reuse.__setitem__((0, 0), np.inf), "'reuse_errors' holds NaN or Inf"),
    (lambda c: c.errors.reuse.__setitem__((1, 3), -1.0), "negative values"),
    (lambda c: setattr(c, "sigmas", c.sigmas[::-1].copy()), "strictly decreasing"),
    (lambda c: setattr(c.errors, "jvp", c.errors.jvp[:, :, :-1, :-1]), "'jvp_errors' has shape"),
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


def test_calibration_arrays_of_another_type_are_refused(tmp_path) -> None:
    import json

    from safetensors.numpy import save

    calibration = make_calibration()
    arrays = {"reuse_errors": calibration.errors.reuse, "jvp_errors": calibration.errors.jvp,
              "sigmas": calibration.sigmas, **calibration.step_statistics}
    arrays = {name: np.nan_to_num(values).astype(np.int32) for name, values in arrays.items()}
    path = tmp_path / "c.safetensors"
    path.write_bytes(save(arrays, metadata={"meancache": json.dumps(calibration.metadata())}))
    with pytest.raises(FileFormatError, match="'reuse_errors' holds int32 values, not float64: calibrate again"):
        load_calibration(path)


@pytest.mark.parametrize(("version", "message"), [
    (1, "format version 1 file.*run 'meancache calibrate' again"),
    (2, "format version 2 calibration, which this meancache no longer reads: run 'meancache calibrate' again "
        r"\(it lacks the exponential edge's map and the held-out runs"),
])
def test_an_old_calibration_says_to_calibrate_again(tmp_path, version: int, message: str) -> None:
    import json

    from safetensors.numpy import save

    meta = {**make_calibration().metadata(), "format_version": version}
    path = tmp_path / "c.safetensors"
    path.write_bytes(save({"errors": np.zeros((1, 2, 2))}, metadata={"meancache": json.dumps(meta)}))
    with pytest.raises(FileFormatError, match=message):
        load_calibration(path)


def test_a_version_2_schedule_still_loads_with_its_edges_read_as_reuse_and_jvp(tmp_path) -> None:
    text = SCHEDULE.to_yaml().replace("format_version: 3", "format_version: 2")
    text = "\n".join(line for line in text.splitlines() if not line.startswith(("kinds:", "validation:")))
    path = tmp_path / "v2.yaml"
    path.write_text(text)
    loaded = load_schedule(path)
    assert loaded.kinds == ["reuse", "jvp", "jvp", "jvp"] and loaded.validation is None
    assert loaded == SCHEDULE


def test_shipped_schedules_load_by_name_and_by_budget() -> None:
    names = shipped_schedules()
    assert {"qwen-image/authors-b10", "qwen-image/authors-b17", "qwen-image/authors-b25", "z-image/authors-b13",
            "z-image/authors-b15", "z-image/authors-b17", "z-image/authors-b20", "z-image/authors-b25"} <= set(names)
    schedule = load_schedule("qwen-image/authors-b10")
    assert schedule.estimator == "release" and schedule.budget == 10 and "authors" in schedule.notes
    assert schedule.compute_steps == [0, 1, 3, 7, 14, 21, 28, 35, 42, 49]
    assert schedule.orders == [0, 2, 1, 1, 1, 1, 1, 1, 4, 0]
    assert shipped_schedule_for("z-image", 15) == "z-image/authors-b15"
    with pytest.raises(FileFormatError, match="no shipped schedule for z-image at budget 11 .*13, 15, 17, 20, 25"
                                              ".*meancache calibrate --model z-image"):
        shipped_schedule_for("z-image", 11)
