"""Dataset runs: resume after a finished, interrupted or SIGKILLed run, changed settings, --force, failures.

The runner promises (runner.py, outputs.py): batches are cut from the full ordered list whatever is
already done, every file is written atomically, an image is done only when its record exists, so
"a run killed at any moment and started again redoes exactly the unfinished images and ends with
the same files". These tests hold it to that, mostly through ``vitlens explain`` with the tiny timm
``test_vit`` checkpoint; the SIGKILL test uses the real ViT-Tiny in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlens.data import resolve_inputs
from vitlens.errors import TargetError
from vitlens.runner import run_explain

from .conftest import VIT_TINY_SPEC, VIT_TINY_WEIGHTS, requires_shared
# helpers and the tiny-checkpoint fixtures shared with the CLI tests (tests/ has no helper module)
from .test_cli import assert_one_line_error, manifest_of, run_cli, write_image, write_truncated_jpeg

FAST = "rollout,chefer"


def snapshot(out: Path) -> dict:
    """relative path -> (mtime_ns, bytes) of every file under ``out``."""
    return {p.relative_to(out).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(out.rglob("*")) if p.is_file()}


def temp_files(out: Path) -> list[str]:
    """Leftovers of interrupted atomic writes (``.name.<hex>.tmp``) or write probes."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                  if p.is_file() and (p.name.endswith(".tmp") or p.name.startswith(".")))


def photo_folder(root: Path, count: int, size=(64, 48)) -> Path:
    for i in range(count):
        write_image(root / f"im{i:02d}.png", size=size, seed=i)
    return root


def explain(capsys, folder, tiny_args, out, *extra) -> tuple[int, str, str]:
    return run_cli(capsys, "explain", folder, *tiny_args, "--out", out, "--quiet", *extra)


# --------------------------------------------------------------------------- re-running a finished run


def test_second_run_is_a_no_op(tmp_path, capsys, tiny):
    folder = photo_folder(tmp_path / "in", 5)
    out = tmp_path / "out"
    code, stdout, err = explain(capsys, folder, tiny, out, "--methods", FAST, "--batch-size", "2",
                                "--format", "html")
    assert code == 0, err
    assert stdout.startswith("explained 5 image(s), 0 already done, 0 failed")
    before = snapshot(out)
    time.sleep(0.01)  # so that a rewrite would show in st_mtime_ns on any file system

    code, stdout, err = explain(capsys, folder, tiny, out, "--methods", FAST, "--batch-size", "2",
                                "--format", "html")
    assert code == 0, err
    assert stdout.startswith("explained 0 image(s), 5 already done, 0 failed")
    after = snapshot(out)
    assert sorted(after) == sorted(before)
    # per-image outputs are not touched at all; the run-level files are re-assembled with identical bytes
    run_level = {"manifest.json", "run.json", "report.html"}
    untouched = [path for path in before if path not in run_level]
    assert len(untouched) == 5 * (1 + 1 + 2 * 2)  # record, original, 2 methods x (overlay + map)
    assert [path for path in untouched if after[path][0] != before[path][0]] == []
    assert all(after[path][1] == before[path][1] for path in run_level)
    assert temp_files(out) == []


def test_resume_batch_size_change_keeps_finished_images(tmp_path, capsys, tiny):
    """--batch-size is not a setting of the results: a run may be resumed with another one."""
    folder = photo_folder(tmp_path / "in", 4)
    out = tmp_path / "out"
    code, _, err = explain(capsys, folder, tiny, out, "--methods", "rollout", "--limit", "2", "--batch-size", "2")
    assert code == 0, err
    records = {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()}
    code, stdout, err = explain(capsys, folder, tiny, out, "--methods", "rollout", "--batch-size", "3")
    assert code == 0, err
    assert stdout.startswith("explained 2 image(s), 2 already done, 0 failed")
    assert {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir() if p.name in records} == records
    assert [im["key"] for im in manifest_of(out)["images"]] == ["im00", "im01", "im02", "im03"]


def test_rerun_after_failures_still_reports_them(tmp_path, capsys, tiny):
    folder = photo_folder(tmp_path / "in", 2)
    write_truncated_jpeg(folder / "im05.jpg")
    out = tmp_path / "out"
    code, stdout, _ = explain(capsys, folder, tiny, out, "--methods", "rollout")
    assert code == 1 and "failed: cannot read image" in stdout
    code, stdout, _ = explain(capsys, folder, tiny, out, "--methods", "rollout")
    assert manifest_of(out)["summary"]["failed"] == 1
    assert code == 1, stdout
    assert "im05.jpg" in stdout


def test_failed_image_stays_failed_and_others_resume(tmp_path, capsys, tiny):
    """What a re-run does with a failure record today: keeps it in the manifest and does not redo it."""
    folder = photo_folder(tmp_path / "in", 3)
    write_truncated_jpeg(folder / "im00b.jpg")
    out = tmp_path / "out"
    code, _, _ = explain(capsys, folder, tiny, out, "--methods", "rollout", "--limit", "2")
    assert code == 1  # im00b is the second input in natural order
    code, stdout, _ = explain(capsys, folder, tiny, out, "--methods", "rollout")
    assert "explained 2 image(s), 2 already done" in stdout
    manifest = manifest_of(out)
    assert [(im["key"], im["status"]) for im in manifest["images"]] == [
        ("im00", "ok"), ("im00b", "failed"), ("im01", "ok"), ("im02", "ok")]
    assert manifest["summary"] == {"images": 4, "ok": 3, "failed": 1}


def test_resume_does_not_mistake_another_image_with_the_same_name_for_done(tmp_path, capsys, tiny):
    day1, day2 = tmp_path / "day1", tmp_path / "day2"
    write_image(day1 / "IMG_0001.png", seed=1)
    write_image(day2 / "IMG_0001.png", seed=2)  # cameras restart their numbering
    out = tmp_path / "results"
    code, _, err = explain(capsys, day1, tiny, out, "--methods", "rollout")
    assert code == 0, err
    code, stdout, err = explain(capsys, day2, tiny, out, "--methods", "rollout")
    assert code == 0, err
    images = manifest_of(out)["images"]
    assert [im["path"] for im in images] == [str(day2 / "IMG_0001.png")], stdout


# --------------------------------------------------------------------------- SIGKILL and resume


def _explain_process(folder: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "vitlens.cli", "explain", str(folder), "--model", VIT_TINY_SPEC, "--weights",
            str(VIT_TINY_WEIGHTS), "--methods", "attention,rollout,gmar-l2,legrad,chefer", "--batch-size", "2",
            "--format", "html", "--out", str(out), "--quiet"]


@requires_shared
def test_sigkilled_run_resumes_to_the_same_files_as_an_uninterrupted_run(tmp_path):
    total = 12
    folder = photo_folder(tmp_path / "in", total, size=(320, 240))
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # 1. start, wait until some but not all images are finished, SIGKILL (no cleanup can run)
    process = subprocess.Popen(_explain_process(folder, killed), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env)
    records = killed / "records"
    deadline = time.monotonic() + 300
    try:
        while True:
            done = len(list(records.glob("*.json"))) if records.is_dir() else 0
            if done >= 1:
                os.kill(process.pid, signal.SIGKILL)
                break
            if process.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {process.stderr.read().decode()}")
            assert time.monotonic() < deadline, "no image finished in time"
            time.sleep(0.003)
    finally:
        process.wait()
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    finished = len(list(records.glob("*.json")))
    assert 1 <= finished < total, f"{finished} of {total} images were finished when the run was killed"
    assert not (killed / "manifest.json").exists()  # assembled only at the end
    stale = set(temp_files(killed))  # a kill during a write may leave its temp file: the resume removes it

    # 2. the same command again finishes the job
    resumed = subprocess.run(_explain_process(folder, killed), capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith(
        f"explained {total - finished} image(s), {finished} already done, 0 failed"), resumed.stdout

    # 3. an uninterrupted run of the same command into another directory
    uninterrupted = subprocess.run(_explain_process(folder, reference), capture_output=True, text=True, env=env,
                                   timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    # 4. every file byte for byte, manifest.json, run.json and report.html included: nothing in them
    #    depends on the output directory (paths in the manifest are relative to it, inputs are absolute)
    got = {path: data for path, (_, data) in snapshot(killed).items() if path not in stale}
    want = {path: data for path, (_, data) in snapshot(reference).items()}
    assert sorted(got) == sorted(want)
    assert len(want) == 3 + total * (2 + 5 * 2)  # manifest, run.json, report + per image: record, original, 5x2
    different = [path for path in want if got[path] != want[path]]
    assert different == []
    assert json.loads(got["manifest.json"])["summary"] == {"images": total, "ok": total, "failed": 0}
    # the resumed run removed what the kill left and leaves no temp files of its own
    assert temp_files(killed) == []
    assert temp_files(reference) == []


def test_resume_removes_temp_files_left_by_a_killed_run(tmp_path, capsys, tiny):
    folder = photo_folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    code, _, err = explain(capsys, folder, tiny, out, "--methods", "rollout")
    assert code == 0, err
    # what SIGKILL in the middle of image im02 leaves: half-written temp files, no record
    (out / "records" / "im02.json").unlink()
    leftovers = [out / "originals" / ".im02.jpg.0123456789ab.tmp",
                 out / "overlays" / "rollout" / ".im02__7.png.a1b2c3d4e5f6.tmp",
                 out / ".manifest.json.feedbeefcafe.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    code, stdout, err = explain(capsys, folder, tiny, out, "--methods", "rollout")
    assert code == 0, err
    assert stdout.startswith("explained 1 image(s), 2 already done")
    assert temp_files(out) == []


@pytest.mark.parametrize("emptied", ["overlays/rollout/im01__{c}.png", "maps/rollout/im01__{c}.npy",
                                     "originals/im01.jpg", "records/im01.json"])
def test_files_a_power_cut_left_empty_are_redone(tmp_path, capsys, tiny, emptied):
    """Per-image files are not flushed one by one: after a power cut the newest may be empty. The record's
    file sizes tell, and the resumed run redoes exactly that image, to the same bytes."""
    folder = photo_folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    code, _, err = explain(capsys, folder, tiny, out, "--methods", "rollout")
    assert code == 0, err
    before = snapshot(out)
    record = json.loads((out / "records" / "im01.json").read_text())
    assert set(record["files"]) == {record["original"], record["outputs"][0]["overlay"], record["outputs"][0]["map"]}
    assert all(size == (out / name).stat().st_size > 0 for name, size in record["files"].items())
    (out / emptied.format(c=record["outputs"][0]["target"])).write_bytes(b"")

    code, stdout, err = explain(capsys, folder, tiny, out, "--methods", "rollout")
    assert code == 0, err
    assert stdout.startswith("explained 1 image(s), 2 already done, 0 failed")
    after = snapshot(out)
    assert {path: data for path, (_, data) in after.items()} == {path: data for path, (_, data) in before.items()}
    # the other images were not touched
    assert [p for p in before if "im01" not in p and p not in ("manifest.json", "run.json")
            and after[p][0] != before[p][0]] == []


def test_per_image_files_are_not_flushed_one_by_one(tmp_path, tiny_model, monkeypatch):
    """One fsync per file cost more than drawing it: only run.json and the manifest are flushed, whatever the
    number of images."""
    flushed = []
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append(fd))
    folder = photo_folder(tmp_path / "in", 4)
    summary = run_explain(resolve_inputs([str(folder)]), tiny_model, ["rollout"], out_dir=tmp_path / "out",
                          batch_size=2, progress=False)
    assert summary.explained == 4
    assert len(list((tmp_path / "out").rglob("*.png"))) == 4
    assert len(flushed) == 2


def test_keyboard_interrupt_exits_130_and_the_run_resumes(tmp_path, capsys, tiny, monkeypatch):
    import vitlens.runner as runner

    folder = photo_folder(tmp_path / "in", 5)
    out = tmp_path / "out"
    real_batch = runner._explain_batch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(runner, "_explain_batch", interrupted)
    code, stdout, err = explain(capsys, folder, tiny, out, "--methods", FAST, "--batch-size", "2")
    assert code == 130
    assert_one_line_error(err, "interrupted", "run the same command again to resume")
    assert sorted(p.name for p in (out / "records").iterdir()) == ["im00.json", "im01.json"]
    assert temp_files(out) == []
    monkeypatch.setattr(runner, "_explain_batch", real_batch)

    code, stdout, err = explain(capsys, folder, tiny, out, "--methods", FAST, "--batch-size", "2")
    assert code == 0, err
    assert stdout.startswith("explained 3 image(s), 2 already done, 0 failed")
    assert manifest_of(out)["summary"] == {"images": 5, "ok": 5, "failed": 0}


# --------------------------------------------------------------------------- changed settings, --force


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> Path:
    import timm

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights2") / "test_vit_other.pth"
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), path)
    return path


CHANGES = {
    "methods": (["--methods", "rollout"], ["--methods", "rollout,attention"], "methods.attention (new)"),
    "method parameter": (["--methods", "rollout"], ["--methods", "rollout", "--param", "rollout.discard_ratio=0.9"],
                         "methods.rollout.discard_ratio 0.0 -> 0.9"),
    "target": (["--methods", "rollout"], ["--methods", "rollout", "--target", "top2"], 'target "pred" -> "top2"'),
    "colormap": (["--methods", "rollout"], ["--methods", "rollout", "--cmap", "viridis"],
                 'overlay.cmap "jet" -> "viridis"'),
    "precision": (["--methods", "rollout"], ["--methods", "rollout", "--precision", "bf16"],
                  'precision "fp32" -> "bf16"'),
    "what is saved": (["--methods", "rollout"], ["--methods", "rollout", "--save", "maps"], "save ["),
    "weights": (["--methods", "rollout"], ["--methods", "rollout", "--weights", "{other}"], "model.weights"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_changed_settings_are_refused_without_force(tmp_path, capsys, tiny, other_weights, change):
    first, second, changed_key = CHANGES[change]
    second = [a.format(other=other_weights) for a in second]
    folder = photo_folder(tmp_path / "in", 2)
    out = tmp_path / "out"
    code, _, err = explain(capsys, folder, tiny, out, *first)
    assert code == 0, err
    before = snapshot(out)

    code, stdout, err = explain(capsys, folder, tiny, out, *second)
    assert code == 2
    assert_one_line_error(err, str(out), "different settings", changed_key, "--force")
    assert stdout == ""
    assert snapshot(out) == before  # nothing touched

    code, stdout, err = explain(capsys, folder, tiny, out, *second, "--force")
    assert code == 0, err
    assert stdout.startswith("explained 2 image(s), 0 already done, 0 failed")
    manifest = manifest_of(out)
    run_json = json.loads((out / "run.json").read_text())
    assert {k: v for k, v in manifest.items() if k not in ("images", "summary", "warnings")} == run_json
    assert manifest["warnings"] == []
    for image in manifest["images"]:
        record = out / "records" / f"{image['key']}.json"
        assert record.stat().st_mtime_ns != before[f"records/{image['key']}.json"][0]  # recomputed
        for o in image["outputs"]:
            assert (out / o["map"]).is_file()
            assert (out / o["overlay"]).is_file() if change != "what is saved" else "overlay" not in o
    if change == "methods":
        assert list(manifest["methods"]) == ["rollout", "attention"]
        assert {o["method"] for im in manifest["images"] for o in im["outputs"]} == {"rollout", "attention"}
    if change == "target":
        assert all(len(im["targets"]) == 2 for im in manifest["images"])
    if change == "weights":
        assert manifest["model"]["weights"] == str(other_weights.resolve())

    # and the forced run is itself resumable
    code, stdout, err = explain(capsys, folder, tiny, out, *second)
    assert code == 0, err
    assert stdout.startswith("explained 0 image(s), 2 already done")


def test_force_replaces_the_previous_run(tmp_path, capsys, tiny):
    folder = photo_folder(tmp_path / "in", 2)
    out = tmp_path / "out"
    code, _, err = explain(capsys, folder, tiny, out, "--methods", "attention,rollout")
    assert code == 0, err
    code, _, err = explain(capsys, folder, tiny, out, "--methods", "chefer", "--force")
    assert code == 0, err
    manifest = manifest_of(out)
    listed = {"manifest.json", "run.json"} | {f"records/{im['key']}.json" for im in manifest["images"]}
    listed |= {im["original"] for im in manifest["images"]}
    listed |= {p for im in manifest["images"] for o in im["outputs"] for p in (o["overlay"], o["map"])}
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == listed


def test_target_error_stops_the_run_and_leaves_the_directory_usable(tmp_path, capsys, tiny):
    folder = photo_folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    code, _, err = explain(capsys, folder, tiny, out, "--methods", "rollout", "--target", "5000")
    assert code == 2
    assert_one_line_error(err, "5000", "out of range")
    assert not (out / "records").is_dir() or not list((out / "records").iterdir())
    # the corrected command works in the same directory without --force
    code, stdout, err = explain(capsys, folder, tiny, out, "--methods", "rollout", "--target", "5")
    assert code == 0, err
    assert stdout.startswith("explained 3 image(s), 0 already done")


# --------------------------------------------------------------------------- the runner as a library


def test_run_explain_summary_and_batches_do_not_change_results(tmp_path, tiny_model):
    folder = photo_folder(tmp_path / "in", 4, size=(50, 40))
    write_truncated_jpeg(folder / "im01x.jpg")
    samples = resolve_inputs([str(folder)])
    assert [s.key for s in samples] == ["im00", "im01", "im01x", "im02", "im03"]
    one = run_explain(samples, tiny_model, ["rollout", "chefer"], None, None, tmp_path / "b1", batch_size=1,
                      progress=False)
    three = run_explain(samples, tiny_model, ["rollout", "chefer"], None, None, tmp_path / "b3", batch_size=3,
                        progress=False)
    for summary, out in ((one, tmp_path / "b1"), (three, tmp_path / "b3")):
        assert (summary.total, summary.explained, summary.skipped) == (5, 4, 0)
        assert [(key, Path(path).name) for key, path, _ in summary.failed] == [("im01x", "im01x.jpg")]
        assert "truncated or corrupt" in summary.failed[0][2]
        assert summary.manifest == out / "manifest.json" and summary.report is None
        assert summary.out_dir == out and summary.seconds > 0
    # the same image gives the same maps whatever batch it was in
    for key in ("im00", "im02", "im03"):
        for method in ("rollout", "chefer"):
            a = sorted((tmp_path / "b1" / "maps" / method).glob(f"{key}__*.npy"))
            b = sorted((tmp_path / "b3" / "maps" / method).glob(f"{key}__*.npy"))
            assert [p.name for p in a] == [p.name for p in b] and len(a) == 1
            np.testing.assert_allclose(np.load(a[0]), np.load(b[0]), rtol=1e-4, atol=1e-6)
    # resuming through the API: everything done
    again = run_explain(samples, tiny_model, ["rollout", "chefer"], None, None, tmp_path / "b3", batch_size=3,
                        progress=False)
    assert (again.explained, again.skipped) == (0, 5)


def test_run_explain_records_a_batch_the_model_rejects_and_goes_on(tmp_path, tiny_model, monkeypatch):
    """A VitlensError while explaining a batch marks that batch's images failed; the next batches run."""
    import vitlens.runner as runner
    from vitlens.errors import ModelError

    folder = photo_folder(tmp_path / "in", 4)
    samples = resolve_inputs([str(folder)])
    real = runner.explain

    def flaky(model, images, **kwargs):
        if any(im.size == (64, 48) for im in images) and len(images) == 2 and not flaky.failed:
            flaky.failed = True
            raise ModelError("input of this size does not fit the model")
        return real(model, images, **kwargs)

    flaky.failed = False
    monkeypatch.setattr(runner, "explain", flaky)
    summary = run_explain(samples, tiny_model, ["rollout"], None, None, tmp_path / "out", batch_size=2,
                          progress=False)
    assert summary.explained == 2
    assert [key for key, _, _ in summary.failed] == ["im00", "im01"]
    images = manifest_of(tmp_path / "out")["images"]
    assert [im["status"] for im in images] == ["failed", "failed", "ok", "ok"]
    assert images[0]["error"] == "input of this size does not fit the model"


def test_run_explain_target_error_is_raised(tmp_path, tiny_model):
    samples = resolve_inputs([str(photo_folder(tmp_path / "in", 2))])
    with pytest.raises(TargetError, match="out of range"):
        run_explain(samples, tiny_model, ["rollout"], None, 5000, tmp_path / "out", progress=False)


def test_progress_bar_goes_to_stderr_unless_quiet(tmp_path, capsys, tiny):
    folder = photo_folder(tmp_path / "in", 3)
    code, stdout, err = run_cli(capsys, "explain", folder, *tiny, "--methods", "rollout", "--out", tmp_path / "a")
    assert code == 0
    assert "explaining" in err and "3/3" in err and "img" in err
    assert "explaining" not in stdout and stdout.startswith("explained 3 image(s)")
    code, stdout, err = run_cli(capsys, "explain", folder, *tiny, "--methods", "rollout", "--out", tmp_path / "b",
                                "--quiet")
    assert code == 0 and err == ""


# --------------------------------------------------------------------------- what is written, the pipeline


def test_save_maps_alone_writes_maps_and_records_and_resumes(tmp_path, capsys, tiny):
    folder = photo_folder(tmp_path / "in", 3)
    full, maps_only = tmp_path / "full", tmp_path / "maps"
    assert explain(capsys, folder, tiny, full, "--methods", FAST)[0] == 0
    code, _, err = explain(capsys, folder, tiny, maps_only, "--methods", FAST, "--save", "maps")
    assert code == 0, err
    assert sorted(p.name for p in maps_only.iterdir()) == ["manifest.json", "maps", "records", "run.json"]
    for image in manifest_of(maps_only)["images"]:
        assert image["original"] is None
        assert all(set(o) == {"method", "target", "map"} for o in image["outputs"])
    for path in (full / "maps").rglob("*.npy"):
        assert (maps_only / path.relative_to(full)).read_bytes() == path.read_bytes()
    code, stdout, _ = explain(capsys, folder, tiny, maps_only, "--methods", FAST, "--save", "maps")
    assert code == 0 and stdout.startswith("explained 0 image(s), 3 already done")


def test_overlays_are_capped_at_1024_pixels_unless_asked_otherwise(tmp_path, capsys, tiny):
    from .test_cli import noise_image

    folder = tmp_path / "in"
    folder.mkdir()
    noise_image((3000, 2000), 4).save(folder / "large.png")  # a PNG is always decoded whole: the same maps
    sizes = {}
    for name, option in (("default", []), ("small", ["--overlay-max-side", "300"]),
                         ("full", ["--overlay-max-side", "full"])):
        out = tmp_path / name
        code, _, err = explain(capsys, folder, tiny, out, "--methods", "rollout,attnlrp", *option)
        assert code == 0, err
        image = manifest_of(out)["images"][0]
        assert image["size"] == [3000, 2000]
        for entry in image["outputs"]:
            with Image.open(out / entry["overlay"]) as overlay:
                sizes.setdefault(name, set()).add(overlay.size)
        assert manifest_of(out)["overlay"]["max_side"] == {"default": 1024, "small": 300, "full": None}[name]
    assert sizes == {"default": {(1024, 683)}, "small": {(300, 200)}, "full": {(3000, 2000)}}
    # the maps keep the model's resolution whatever the overlays' size
    for method in ("rollout", "attnlrp"):
        maps = [np.load(next((tmp_path / name / "maps" / method).glob("*.npy"))) for name in sizes]
        assert all(np.array_equal(maps[0], other) for other in maps[1:])


def test_io_workers_do_not_change_a_single_byte(tmp_path, capsys, tiny):
    folder = photo_folder(tmp_path / "in", 7)
    write_truncated_jpeg(folder / "broken.jpg")
    outs = {n: tmp_path / f"w{n}" for n in (1, 4)}
    for workers, out in outs.items():
        code, _, _ = explain(capsys, folder, tiny, out, "--methods", "rollout,gradcam,attnlrp", "--batch-size", "3",
                             "--io-workers", str(workers))
        assert code == 1  # the broken image
    one, four = (sorted(p.relative_to(o) for p in o.rglob("*") if p.is_file()) for o in outs.values())
    assert one == four and len(one) > 30
    for relative in one:
        assert (outs[1] / relative).read_bytes() == (outs[4] / relative).read_bytes(), relative


def test_a_failed_write_stops_the_run_in_one_line_and_the_rerun_completes(tmp_path, capsys, tiny, monkeypatch):
    """A write that fails in a background writer (disk full...) is raised in the model loop: exit 2, one line; every
    record on disk has all its files, and the next run finishes the rest."""
    import vitlens.outputs as outputs
    from vitlens.errors import OutputError

    folder = photo_folder(tmp_path / "in", 8)
    out = tmp_path / "out"
    real_save = outputs.save_png_atomic
    calls = []

    def failing(image, path, **options):
        calls.append(path)
        if len(calls) == 5:
            raise OutputError(f"cannot write '{path}': No space left on device")
        return real_save(image, path, **options)

    monkeypatch.setattr(outputs, "save_png_atomic", failing)
    code, _, err = explain(capsys, folder, tiny, out, "--methods", FAST, "--batch-size", "2")
    assert code == 2
    assert_one_line_error(err, "No space left on device")
    records = sorted((out / "records").glob("*.json"))
    assert len(records) < 8
    for path in records:
        record = json.loads(path.read_text())
        for entry in record["outputs"]:
            assert (out / entry["overlay"]).is_file() and (out / entry["map"]).is_file()
    assert temp_files(out) == []
    monkeypatch.setattr(outputs, "save_png_atomic", real_save)
    code, stdout, err = explain(capsys, folder, tiny, out, "--methods", FAST, "--batch-size", "2")
    assert code == 0, err
    assert manifest_of(out)["summary"] == {"images": 8, "ok": 8, "failed": 0}


def test_the_write_backlog_is_bounded():
    """The model loop waits once `backlog` writes are pending: results never pile up in memory."""
    import threading

    from vitlens.runner import _Writes

    release = threading.Event()
    started = []
    writes = _Writes(workers=2, backlog=3)

    def slow(index):
        started.append(index)
        release.wait(5)

    submitted = []

    def producer():
        for index in range(6):
            writes.submit(slow, index)
            submitted.append(index)

    thread = threading.Thread(target=producer)
    thread.start()
    time.sleep(0.3)
    assert submitted == [0, 1, 2] and sorted(started) == [0, 1]  # the 4th submit waits for the oldest write
    release.set()
    thread.join(5)
    writes.close()
    assert submitted == list(range(6)) and sorted(started) == list(range(6))


@requires_shared
def test_a_huge_jpeg_is_decoded_small_and_recorded_at_its_own_size(tmp_path, capsys, tiny):
    """Default overlays (1024 px): a 6000 x 4500 JPEG is decoded at 1/4 scale. The record still gives the file's
    size and the crop box in its pixels, and the maps are those of the full decode up to resampling."""
    from .data.test_images import _large_photo

    folder = tmp_path / "in"
    folder.mkdir()
    _large_photo(folder / "huge.jpg", size=(6000, 4500))
    outs = {}
    for name, option in (("reduced", []), ("full", ["--overlay-max-side", "full"])):
        outs[name] = tmp_path / name
        code, _, err = explain(capsys, folder, tiny, outs[name], "--methods", "rollout,gradcam", *option)
        assert code == 0, err
    reduced, full = (manifest_of(outs[n])["images"][0] for n in ("reduced", "full"))
    assert reduced["size"] == full["size"] == [6000, 4500]
    np.testing.assert_allclose(reduced["crop_box"], full["crop_box"], atol=2.0)
    with Image.open(outs["reduced"] / reduced["outputs"][0]["overlay"]) as overlay:
        assert overlay.size == (1024, 768)
    for method in ("rollout", "gradcam"):
        a, b = (np.load(next((outs[n] / "maps" / method).glob("*.npy"))).ravel() for n in ("reduced", "full"))
        assert np.corrcoef(a, b)[0, 1] > 0.99, method


def test_a_bf16_run_writes_maps_close_to_fp32_and_says_so(tmp_path, capsys, tiny):
    folder = photo_folder(tmp_path / "in", 4)
    for precision in ("fp32", "bfloat16"):
        code, _, err = explain(capsys, folder, tiny, tmp_path / precision, "--methods", "rollout,gradcam,attnlrp",
                               "--precision", precision)
        assert code == 0, err
    assert manifest_of(tmp_path / "bfloat16")["precision"] == "bf16"  # one name whatever the spelling
    for path in (tmp_path / "fp32" / "maps").rglob("*.npy"):
        single, half = np.load(path).ravel(), np.load(tmp_path / "bfloat16" / path.relative_to(tmp_path / "fp32"))
        if path.parent.name == "attnlrp":  # LRP always runs in fp32
            assert np.array_equal(single, half.ravel())
        else:
            assert np.corrcoef(single, half.ravel())[0, 1] > 0.98, path
