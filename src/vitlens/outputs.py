"""Writing a run to disk: overlays, raw maps, per-image records and the manifest.

Layout of a run directory::

    run.json                          settings of the run (model, weights hash, methods, target)
    manifest.json                     everything, assembled from the records (see render.report)
    originals/<key>.jpg               a small copy of each input, for the report
    overlays/<method>/<key>__<class>.png   overlay at the image's original resolution
    maps/<method>/<key>__<class>.npy       the raw (h, w) patch map, float32, un-normalised
    records/<key>.json                one per finished image, written last

Every file is written atomically (temp file + rename). An image counts as done only when its
record exists, and the record is written after all of its files, so a run killed at any moment
and started again redoes exactly the unfinished images and ends with the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitlens.errors import OutputError
from vitlens.models import describe
from vitlens.methods import get_method
from vitlens.render import overlay, save_png_atomic, signed_overlay, write_atomic, write_text_atomic
from vitlens.render.atomic import ensure_dir
from vitlens.version import __version__

ORIGINAL_MAX_SIDE = 512
SETTINGS_FILE = "run.json"
MANIFEST_FILE = "manifest.json"


def crop_box_pixels(crop_box, original_size) -> tuple[int, int, int, int]:
    """The crop box rounded to whole pixels inside the image (never empty)."""
    width, height = original_size
    x0, y0, x1, y1 = (int(round(v)) for v in crop_box)
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    return x0, y0, min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)


def overlay_on_original(image: Image.Image, pixel_map: np.ndarray, crop_box, cmap: str = "jet",
                        alpha: float = 0.5) -> Image.Image:
    """Overlay a [0, 1] map of the model input onto the original image, at its full resolution.

    The map covers ``crop_box`` (the region the model saw, see ``Preprocess.geometry``); the
    margin a centre crop cut away keeps the original pixels, so nobody mistakes it for
    "no relevance".
    """
    box = crop_box_pixels(crop_box, image.size)
    region = overlay(image.crop(box), pixel_map, cmap=cmap, alpha=alpha)
    canvas = image.convert("RGB").copy()
    canvas.paste(region, box[:2])
    return canvas


def tensor_to_image(x: torch.Tensor, preprocess) -> Image.Image:
    """A preprocessed (3, H, W) input back to a viewable RGB image."""
    pixels = preprocess.denormalize(x.unsqueeze(0).float())[0].clamp(0, 1)
    return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


class RunWriter:
    """Writes one run directory; knows which images are already done.

    Parameters
    ----------
    out_dir : path
    model : ExplainableModel
    methods : dict
        method -> parameters used.
    settings : dict, optional
        Further settings that define the run's results (target request, data spec...).
        Resuming a directory written with other settings is refused.
    resume : bool
        Keep finished images of a previous run with the same settings (default).
    cmap, alpha : overlay colormap and opacity.
    """

    def __init__(self, out_dir, model, methods: dict, settings: dict | None = None, resume: bool = True,
                 cmap: str = "jet", alpha: float = 0.5):
        self.out = ensure_dir(out_dir)
        self.model = model
        self.methods = methods
        self.cmap, self.alpha = cmap, alpha
        self.settings = {
            "vitlens_version": __version__,
            "model": describe(model),
            "methods": methods,
            "overlay": {"cmap": cmap, "alpha": alpha},
            **(settings or {}),
        }
        self.records_dir = self.out / "records"
        self._prepare(resume)
        self.order: list[str] = []

    # --- settings and resume -----------------------------------------------------------------
    def _prepare(self, resume: bool) -> None:
        self._remove_stale_temp_files()
        path = self.out / SETTINGS_FILE
        normalized = json.loads(json.dumps(self.settings, default=str))
        if path.is_file():
            try:
                previous = json.loads(path.read_text())
            except (OSError, ValueError):
                previous = None
            has_records = self.records_dir.is_dir() and any(self.records_dir.glob("*.json"))
            if previous is not None and previous != normalized and has_records:
                if resume:
                    changed = sorted(k for k in set(previous) | set(normalized) if previous.get(k) != normalized.get(k))
                    raise OutputError(
                        f"'{self.out}' holds a run with different settings ({', '.join(changed)}): "
                        "choose another --out, or pass --force to replace it"
                    )
            if not resume or previous != normalized:
                self._clear_records()
        # a directory that holds no vitlens run is never cleared: its files are not ours
        write_text_atomic(path, json.dumps(normalized, indent=2, sort_keys=True) + "\n")
        ensure_dir(self.records_dir)

    def _clear_records(self) -> None:
        """Forget a previous run: its records and every file it wrote (``--force``)."""
        import shutil

        for name in ("records", "overlays", "maps", "originals"):
            folder = self.out / name
            if folder.is_dir():
                shutil.rmtree(folder)
        for name in (MANIFEST_FILE, "report.html"):
            (self.out / name).unlink(missing_ok=True)

    def _remove_stale_temp_files(self) -> None:
        # a process killed during an atomic write leaves its temp file behind: never a result
        for stale in self.out.rglob(".*.tmp"):
            if stale.is_file():
                stale.unlink(missing_ok=True)

    def done(self, key: str, path: str | None = None) -> bool:
        """True when ``key`` was finished (explained or recorded as failed) by this run's settings.

        With ``path``, the record must also be of that file: another folder's ``IMG_0001.png``
        written into the same output directory is not the same image.
        """
        record = self.read_record(key)
        if record is None or (path is not None and record.get("path") != path):
            return False
        files = [record.get("original")] + [o.get(k) for o in record.get("outputs", [])
                                            for k in ("overlay", "map", "signed_overlay")]
        return all(f is None or (self.out / f).is_file() for f in files)

    def read_record(self, key: str) -> dict | None:
        path = self.records_dir / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    # --- writing -------------------------------------------------------------------------------
    def write_image(self, key: str, path: str | None, image: Image.Image | None, crop_box, result, index: int,
                    label: int | None = None, label_name: str | None = None, extra: dict | None = None) -> dict:
        """Write overlays, maps and the record of image ``index`` of an ``ExplainResult``."""
        if image is None:
            image = tensor_to_image(result_input(result, index), self.model.preprocess)
            crop_box = (0, 0, image.width, image.height)
        original = f"originals/{key}.jpg"
        thumb = image.copy()
        thumb.thumbnail((ORIGINAL_MAX_SIDE, ORIGINAL_MAX_SIDE))
        write_atomic(self.out / original, lambda fh: thumb.save(fh, format="JPEG", quality=90))
        outputs = []
        for method in self.methods:
            for slot, target in enumerate(result.targets[index].tolist()):
                stem = f"{key}__{target}"
                raw = result.patch_maps[method][index, slot].numpy().astype(np.float32)
                map_file = f"maps/{method}/{stem}.npy"
                write_atomic(self.out / map_file, lambda fh, a=raw: np.save(fh, a))
                pixel_map = result.maps[method][index, slot].numpy()
                overlay_file = f"overlays/{method}/{stem}.png"
                drawn = overlay_on_original(image, pixel_map, crop_box, cmap=self.cmap, alpha=self.alpha)
                save_png_atomic(drawn, self.out / overlay_file)
                entry = {"method": method, "target": int(target), "overlay": overlay_file, "map": map_file}
                if get_method(method).signed:
                    # red positive, blue negative, zero transparent-ish white
                    signed_file = f"overlays/{method}/{stem}__signed.png"
                    box = crop_box_pixels(crop_box, image.size)
                    region = signed_overlay(image.crop(box), raw)
                    canvas = image.convert("RGB").copy()
                    canvas.paste(region, box[:2])
                    save_png_atomic(canvas, self.out / signed_file)
                    entry["signed_overlay"] = signed_file
                for extra_name, values in result.extras.get(method, {}).items():
                    entry[extra_name] = round(float(values[index, slot]), 6)
                outputs.append(entry)
        prediction = result.predictions[index]
        record = {
            "key": key,
            "path": path,
            "label": label,
            "label_name": label_name,
            "status": "ok",
            "error": None,
            "size": list(image.size),
            "crop_box": [round(float(v), 3) for v in crop_box],
            "prediction": prediction.to_dict(),
            "targets": [p.to_dict() for p in result.target_predictions(index)],
            "original": original,
            "outputs": outputs,
            **(extra or {}),
        }
        self._write_record(key, record)
        return record

    def write_failure(self, key: str, path: str | None, error: str, label=None, label_name=None) -> dict:
        record = {"key": key, "path": path, "label": label, "label_name": label_name, "status": "failed",
                  "error": error, "prediction": None, "targets": [], "outputs": []}
        self._write_record(key, record)
        return record

    def _write_record(self, key: str, record: dict) -> None:
        write_text_atomic(self.records_dir / f"{key}.json", json.dumps(record, indent=1) + "\n")
        if key not in self.order:
            self.order.append(key)

    def finish(self, order: list[str] | None = None, metrics: dict | None = None) -> Path:
        """Assemble ``manifest.json`` from the records, in ``order`` (default: writing order)."""
        images = []
        for key in order if order is not None else self.order:
            record = self.read_record(key)
            if record is not None:
                images.append(record)
        manifest = {**self.settings, "images": images}
        manifest["summary"] = {
            "images": len(images),
            "ok": sum(1 for r in images if r["status"] == "ok"),
            "failed": sum(1 for r in images if r["status"] != "ok"),
        }
        if metrics is not None:
            manifest["metrics"] = metrics
        path = self.out / MANIFEST_FILE
        write_text_atomic(path, json.dumps(manifest, indent=1) + "\n")
        return path


def result_input(result, index: int) -> torch.Tensor:
    """The preprocessed input tensor an ExplainResult kept for inputs given as tensors."""
    tensor = getattr(result, "input_tensors", None)
    if tensor is None:
        raise OutputError("this result has no image to draw overlays on")
    return tensor[index]
