"""bench --quick still times each method several times: one run on a loaded machine is noise."""

from meancache_cli.bench.runner import bench_settings


def test_quick_bench_times_at_least_three_runs_per_method() -> None:
    settings, _ = bench_settings(quick=True)
    assert settings.repeats >= 3
    assert bench_settings(quick=True, repeats=1)[0].repeats == 1
