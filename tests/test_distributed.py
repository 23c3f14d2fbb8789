"""Distributed runs: ``torchrun --nproc-per-node 2 -m vitlens explain|evaluate`` on this CPU (gloo).

What the runner promises for several processes (runner.py, distributed.py): every batch holds the
same images whatever the world size, each rank writes its own images' files and records, the main
rank writes the manifest, tables and report from everybody's records. So a two-process run writes
the same bytes as a one-process run, a run whose rank was killed loses only unfinished images, and a
rerun with any world size completes it with the same files.

torchrun gives each process one intra-op thread (OMP_NUM_THREADS=1); the one-process references run
with one thread too, because a float sum split over two threads may round differently in the last
bit (LRP maps differ by ~1e-12 otherwise). Real ImageNet images, the tiny random timm ``test_vit``.

The same checks at full size (64 images, every method, the real ImageNet ViT-Tiny; evaluate: 32 images, every
method, the faithfulness metrics; about 15 minutes on 2 cores)::

    VITLENS_DISTRIBUTED_FULL=1 python -m pytest tests/test_distributed.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vitlens.distributed import Group

from .conftest import SHARED_DATA, VIT_TINY_SPEC, VIT_TINY_WEIGHTS, requires_shared

IMAGES = SHARED_DATA / "imagenet_val_1300" / "images"
LABELS = SHARED_DATA / "imagenet_val_1300" / "labels.csv"
FULL = os.environ.get("VITLENS_DISTRIBUTED_FULL") == "1"
COUNT = 64 if FULL else 32
METHODS = "all" if FULL else "rollout,gradcam,attnlrp,legrad"

pytestmark = requires_shared


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(processes: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "-m", "vitlens", *map(str, args)]


def one_process(*args) -> list[str]:
    return [sys.executable, "-m", "vitlens", *map(str, args)]


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=timeout)
    return done


def files(out: Path, *folders: str) -> dict:
    """relative path -> bytes of every file under the given folders of ``out`` (no temp files allowed)."""
    found = {}
    for folder in folders:
        for path in sorted((out / folder).rglob("*")):
            if path.is_file():
                assert not path.name.endswith(".tmp"), path
                found[path.relative_to(out).as_posix()] = path.read_bytes()
    return found


def model_args(weights: Path) -> list:
    return ["--model", VIT_TINY_SPEC, "--weights", VIT_TINY_WEIGHTS] if FULL else ["--model", "timm:test_vit",
                                                                                    "--weights", weights]


def explain_args(out: Path, weights: Path, methods: str = METHODS) -> list:
    return ["explain", IMAGES, "--labels", LABELS, "--limit", COUNT, *model_args(weights), "--methods", methods,
            "--batch-size", 4, "--out", out, "--quiet"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_weights):
    """A one-process run: what every distributed run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("dist") / "reference"
    done = run(one_process(*explain_args(out, tiny_weights)))
    assert done.returncode == 0, done.stderr
    return out


def test_two_processes_write_the_bytes_of_one(tmp_path, tiny_weights, reference):
    out = tmp_path / "two"
    done = run(torchrun(2, *explain_args(out, tiny_weights)))
    assert done.returncode == 0, done.stderr
    # the summary counts both ranks' images and is printed once
    assert done.stdout.count(f"explained {COUNT} image(s), 0 already done, 0 failed") == 1, done.stdout
    assert files(out, "maps", "records", "overlays", "originals") == files(reference, "maps", "records", "overlays",
                                                                            "originals")
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    assert (out / "run.json").read_bytes() == (reference / "run.json").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"] == {"images": COUNT, "ok": COUNT, "failed": 0}
    assert len(list((out / "maps" / "attnlrp").glob("*.npy"))) == COUNT


def _kill_rank_once_records_appear(command: list[str], records: Path, rank: str, at_least: int) -> int:
    """Start ``command`` (torchrun), SIGKILL the worker of ``rank`` once ``at_least`` records exist."""
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=environment())
    killed = False
    deadline = time.monotonic() + 240
    try:
        while launcher.poll() is None and time.monotonic() < deadline:
            count = len(list(records.glob("*.json"))) if records.is_dir() else 0
            if not killed and count >= at_least:
                worker = _worker_of_rank(launcher.pid, rank)
                if worker is not None:
                    os.kill(worker, signal.SIGKILL)
                    killed = True
            time.sleep(0.01)
        launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert killed, "the run finished before a rank could be killed: give it more images"
    return launcher.returncode


def _worker_of_rank(parent: int, rank: str) -> int | None:
    """The pid of the torchrun worker of ``rank`` (a child of the launcher whose environment says RANK=rank)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            if ppid != parent:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration, ValueError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker process through /proc")
@pytest.mark.parametrize("rerun_processes", [1, 2])
def test_a_killed_rank_loses_only_its_unfinished_images(tmp_path, tiny_weights, reference, rerun_processes):
    out = tmp_path / "killed"
    code = _kill_rank_once_records_appear(torchrun(2, *explain_args(out, tiny_weights)), out / "records", rank="1",
                                          at_least=4)
    assert code != 0  # torchrun reports the dead worker (and stops the other one)
    finished = sorted(p.name for p in (out / "records").glob("*.json"))
    assert 4 <= len(finished) < COUNT
    # what was finished is already the reference's bytes
    for name in finished:
        assert (out / "records" / name).read_bytes() == (reference / "records" / name).read_bytes()
    command = torchrun(2, *explain_args(out, tiny_weights)) if rerun_processes == 2 \
        else one_process(*explain_args(out, tiny_weights))
    done = run(command)
    assert done.returncode == 0, done.stderr
    assert f"{len(finished)} already done" in done.stdout, done.stdout
    assert files(out, "maps", "records", "overlays", "originals") == files(reference, "maps", "records", "overlays",
                                                                            "originals")
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()


def test_evaluate_tables_are_those_of_one_process(tmp_path, tiny_weights):
    images = 32 if FULL else 12
    common = ["evaluate", IMAGES, "--labels", LABELS, "--limit", images, *model_args(tiny_weights), "--methods",
              "all" if FULL else "rollout,gradcam", "--metrics", "faithfulness" if FULL else
              "deletion,insertion,pos_perturbation", "--steps", 20 if FULL else 4, "--batch-size", 3, "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    first = run(one_process(*common, "--out", one), timeout=3600 if FULL else 300)
    assert first.returncode == 0, first.stderr
    second = run(torchrun(2, *common, "--out", two), timeout=3600 if FULL else 300)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("tables: ") == 1
    for name in ("metrics.csv", "metrics.json", "metrics.md", "manifest.json"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert files(two, "records", "maps") == files(one, "records", "maps")
    rows = json.loads((two / "metrics.json").read_text())["rows"]
    assert {r["n"] for r in rows} == {images}  # every image of both ranks is in every table row


def test_a_refused_output_directory_is_one_line_on_every_rank(tmp_path, tiny_weights, reference):
    """The main rank refuses --out (it holds a run with other settings); the other rank stops with the same line
    instead of waiting for it."""
    done = run(torchrun(2, *explain_args(reference, tiny_weights, methods="rollout")), timeout=120)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("vitlens: ")]
    assert len(ours) == 2 and all("different settings (methods." in line for line in ours), done.stderr
    # torchrun then reports the failed workers in its own words; no frame of vitlens is in it
    assert "vitlens/runner.py" not in done.stderr and "vitlens/cli.py" not in done.stderr


def test_a_group_of_one_shares_everything():
    group = Group()
    assert group.share(list(range(5))) == [0, 1, 2, 3, 4]
    assert Group(rank=1, world_size=3).share(list(range(8))) == [1, 4, 7]
    assert group.gather("x") == ["x"] and group.from_main(3) == 3 and group.run_on_main(lambda: 7) == 7


def test_under_torchrun_a_plain_cuda_device_is_the_local_rank_gpu(monkeypatch):
    import torch

    from vitlens.distributed import local_device

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert local_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # an explicit GPU is kept
    assert local_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert local_device(torch.device("cuda")) == torch.device("cuda")


def test_a_rank_that_fails_mid_run_stops_the_run_instead_of_hanging(tmp_path, tiny_weights):
    """Rank 1's second batch asks for a class the model does not have (a run-wide TargetError): that rank stops with
    one line and leaves at once; torchrun then stops rank 0, which would otherwise wait for rank 1 forever."""
    import csv

    rows = list(csv.reader(LABELS.read_text().splitlines()))
    rows[1 + 4 * 3][1] = "5000"  # first image of batch 3 (batches of 4): rank 1's second batch
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    out = tmp_path / "out"
    args = explain_args(out, tiny_weights, methods="rollout")
    args[args.index(LABELS)] = labels
    start = time.monotonic()
    done = run(torchrun(2, *args, "--target", "label"), timeout=240)
    assert done.returncode != 0 and time.monotonic() - start < 200
    ours = [line for line in done.stderr.splitlines() if line.startswith("vitlens: ")]
    assert len(ours) == 1 and "5000" in ours[0], done.stderr
    # what was finished stays finished: a rerun with the fixed labels resumes from it
    assert (out / "records").is_dir() and len(list((out / "records").glob("*.json"))) >= 4
