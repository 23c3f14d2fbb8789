"""A fake run directory, as the runner would leave it, for the report tests.

A uniquely named module (not conftest) so test files can import it without clashing with
other packages' conftest modules.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

# Hostile strings: anything that reaches the HTML unescaped would break the page or run code.
EVIL_LABEL = "<script>alert(1)</script>"
EVIL_SPEC = "timm:vit</script><script>alert(2)</script>"
EVIL_FILE = "we\"ird&'<>#%.png"
EVIL_CLASS = "<b>bold</b> & co"
EVIL_ERROR = "cannot read image '/abs/bad.jpg': <truncated> & broken"


def _png(path: Path, color: tuple[int, int, int], size=(24, 16)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path.as_posix()


def build_run_dir(root: Path) -> SimpleNamespace:
    """Write images + manifest.json under ``root``; return the counts a report must show."""
    root.mkdir(parents=True, exist_ok=True)
    methods = {"rollout": {"head_fusion": "mean"}, "gmar-l2": {}}

    def outputs(key, targets, only=None):
        outs = []
        for method in methods:
            if only is not None and method not in only:
                continue
            for t in targets:
                rel = f"overlays/{method}/{key}__{t}.png"
                _png(root / rel, (200, 40 * len(outs) % 255, 30))
                outs.append({"method": method, "target": t, "overlay": rel, "map": f"maps/{method}/{key}__{t}.npy"})
        return outs

    _png(root / "originals/cats__img1.png", (10, 120, 200))
    _png(root / "originals" / EVIL_FILE, (90, 90, 90))
    _png(root / "originals/dog.png", (30, 160, 60))
    images = [
        {
            "key": "cats__img1", "path": "/abs/cats/img1.jpg", "label": 281, "label_name": "tabby cat",
            "status": "ok", "error": None,
            "prediction": {"index": 282, "name": "tiger cat", "prob": 0.61},
            "original": "originals/cats__img1.png",
            "targets": [{"index": 282, "name": "tiger cat", "prob": 0.61},
                        {"index": 281, "name": "tabby cat", "prob": 0.22}],
            "outputs": outputs("cats__img1", [282, 281]),
        },
        {
            "key": "evil", "path": "/abs/" + EVIL_FILE, "label": 5, "label_name": EVIL_LABEL,
            "status": "ok", "error": None,
            "prediction": {"index": 5, "name": EVIL_CLASS, "prob": 0.9},
            "original": "originals/" + EVIL_FILE,
            "targets": [{"index": 5, "name": EVIL_CLASS, "prob": 0.9}],
            "outputs": outputs("evil", [5]),
        },
        {
            "key": "dog", "path": "/abs/dog.jpg", "label": None, "label_name": None,
            "status": "ok", "error": None,
            "prediction": {"index": 207, "name": "golden retriever", "prob": 0.77},
            "original": "originals/dog.png",
            "targets": [{"index": 207, "name": "golden retriever", "prob": 0.77}],
            # gmar-l2 missing on purpose: the report must show "n/a", not a broken image.
            "outputs": outputs("dog", [207], only={"rollout"}),
        },
        {
            "key": "bad", "path": "/abs/bad.jpg", "status": "failed", "error": EVIL_ERROR,
            "label": None, "label_name": None, "prediction": None, "targets": [], "outputs": [],
        },
    ]
    manifest = {
        "vitlens_version": "0.1.0",
        "created": "2026-11-22T02:00:00Z",
        "model": {
            "spec": EVIL_SPEC, "weights": "/path/w.pth", "weights_sha256": "abc123",
            "preprocess": {"input_size": [224, 224], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                           "interpolation": "bicubic", "crop_pct": 0.9},
            "num_classes": 1000,
        },
        "methods": methods,
        "images": images,
        "metrics": {"columns": ["method", "deletion_auc", "insertion_auc"],
                    "rows": [["rollout", 0.2134567, 0.55], ["gmar-l2", 0.19, None]]},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return SimpleNamespace(
        root=root,
        manifest=manifest,
        # img.cell count: originals per (image, target) row + overlays that exist.
        n_cells=2 * 3 + 1 * 3 + (1 + 1),
        n_rows=4,
        n_na=1,
        rows_by_class={"tiger cat": 2, EVIL_CLASS: 1, "golden retriever": 1},
    )
