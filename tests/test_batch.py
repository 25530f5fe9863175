"""generate --prompts: numbered outputs, a merged JSONL manifest, resumable, split across torchrun ranks."""

import json
import subprocess
import sys

import numpy as np
from cli_helpers import ROOT, run_cli
from PIL import Image

SIZE = ["--height", "32", "--width", "32"]
PROMPTS = ["a red circle", "a blue star", "a green square", "a white triangle", "a black circle"]


def manifest(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "manifest.jsonl").read_text().splitlines()]


def test_batch_writes_numbered_outputs_and_resumes(model_dir, calibration, tmp_path, capsys) -> None:
    prompts, out, schedule = tmp_path / "prompts.txt", tmp_path / "images", tmp_path / "s.yaml"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assert run_cli(["plan", "--calibration", calibration, "--budget", "4", "--out", str(schedule)], capsys).code == 0
    args = ["generate", "--model", model_dir, "--prompts", str(prompts), "--out", str(out), "--schedule",
            str(schedule), "--batch-size", "2", "--seed", "10", *SIZE, "--json"]
    first = run_cli(args, capsys)
    assert first.code == 0, first.stderr
    assert json.loads(first.stdout)["generated"] == 5
    records = manifest(out)
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["prompt"] for r in records] == PROMPTS and [r["seed"] for r in records] == [10, 11, 12, 13, 14]
    assert all(r["nfe"] == 4 for r in records) and [r["batch"] for r in records] == [2, 2, 2, 2, 1]
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(5)] + ["manifest.jsonl"]

    single = tmp_path / "single.png"
    assert run_cli(["generate", "--model", model_dir, "--prompt", PROMPTS[3], "--seed", "13", "--schedule",
                    str(schedule), *SIZE, "--out", str(single)], capsys).code == 0
    batched, alone = np.asarray(Image.open(out / "000003.png"), float), np.asarray(Image.open(single), float)
    assert np.abs(batched - alone).max() <= 2  # same seed, same image (batched matmuls may round differently)

    (out / "000001.png").unlink()
    (out / "000004.png").unlink()
    again = run_cli(args, capsys)
    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["generated"] == 2 and json.loads(again.stdout)["skipped"] == 3
    assert [r["index"] for r in manifest(out)] == [0, 1, 2, 3, 4]


def test_batch_under_torchrun_splits_prompts_and_merges_the_manifest(model_dir, tmp_path) -> None:
    prompts, out = tmp_path / "prompts.txt", tmp_path / "images"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "meancache_cli", "generate", "--model", model_dir, "--prompts", str(prompts),
                             "--out", str(out), "--no-cache", "--steps", "4", *SIZE, "--json"],
                            cwd=ROOT, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)
    assert summary["processes"] == 2 and summary["prompts"] == 5
    records = manifest(out)
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4] and all(r["nfe"] == 4 for r in records)
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(5)] + ["manifest.jsonl"]


def test_manifest_merge_keeps_the_newest_record_of_each_index(tmp_path) -> None:
    """After a resume the rank parts hold newer records than the merged manifest: those win."""
    from meancache_cli.batch import MANIFEST, _rank_manifest, merge_manifests

    old = [{"index": 0, "seconds": 9.0}, {"index": 1, "seconds": 9.0}]
    (tmp_path / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in old))
    _rank_manifest(tmp_path, 0).write_text(json.dumps({"index": 1, "seconds": 1.0}) + "\n")
    _rank_manifest(tmp_path, 1).write_text(json.dumps({"index": 2, "seconds": 2.0}) + "\n")
    merged = merge_manifests(tmp_path, 2)
    assert merged == [{"index": 0, "seconds": 9.0}, {"index": 1, "seconds": 1.0}, {"index": 2, "seconds": 2.0}]
    assert manifest(tmp_path) == merged and sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST]
