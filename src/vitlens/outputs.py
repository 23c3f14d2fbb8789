"""Writing a run to disk: overlays, raw maps, per-image records and the manifest.

Layout of a run directory::

    run.json                          settings of the run (model, weights hash, methods, target, save)
    manifest.json                     everything, assembled from the records (see render.report)
    originals/<key>.jpg               a small copy of each input, for the report
    overlays/<method>/<key>__<class>.png   overlay on the original image, at most OVERLAY_MAX_SIDE px
    maps/<method>/<key>__<class>.npy       the raw (h, w) patch map, float32, un-normalised
    records/<key>.json                one per finished image, written last

``save`` chooses which of originals, overlays and maps are written (all three by default; maps
alone for large runs). Records are always written: they are the unit of resume and what the
manifest, the report and ``vitlens evaluate`` are assembled from.

Every file is written atomically (temp file + rename). An image counts as done only when its
record exists, and the record is written after all of its files, so a run killed at any moment
and started again redoes exactly the unfinished images and ends with the same files. The record
lists the size of each of its files (``files``), and an image also counts as done only when every
one of them has that size: per-image files are not flushed to the disk one by one (an ``fsync`` per
file cost more than drawing and encoding it), so a power cut or a kernel crash may leave the newest
files, or their records, empty, and a resumed run redoes those images. ``run.json`` and the manifest
are flushed. Different
images may be written by different threads (or ranks of a distributed run) at the same time: an
image's files are written by one thread, in order, the record last.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitlens.cliargs import OVERLAY_MAX_SIDE, SIGNED_CMAP, check_signed_display, parse_save
from vitlens.diagnostics import summarise
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
                        alpha: float = 0.5, signed: bool = False) -> Image.Image:
    """Overlay a map of the model input onto the original image, at its full resolution.

    The map covers ``crop_box`` (the region the model saw, see ``Preprocess.geometry``); the
    margin a centre crop cut away keeps the original pixels, so nobody mistakes it for
    "no relevance". ``pixel_map`` is in [0, 1], or with ``signed`` signed relevance drawn by
    :func:`~vitlens.render.signed_overlay` (``cmap`` then a diverging colormap).
    """
    box = crop_box_pixels(crop_box, image.size)
    draw = signed_overlay if signed else overlay
    region = draw(image.crop(box), pixel_map, cmap=cmap, alpha=alpha)
    canvas = image.convert("RGB").copy()
    canvas.paste(region, box[:2])
    return canvas


def overlay_size(size, max_side: int | None) -> tuple[int, int]:
    """The size of an overlay of an image of ``size``: scaled down to a longest side of ``max_side``."""
    width, height = size
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit_within(image: Image.Image, crop_box, max_side: int | None):
    """``image`` scaled down so that its longest side is at most ``max_side``, and ``crop_box`` with it."""
    size = overlay_size(image.size, max_side)
    if size == image.size:
        return image, crop_box
    # reducing_gap: a fast integer box reduction first, then an antialiased resize (Pillow's advice)
    small = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    sx, sy = size[0] / image.width, size[1] / image.height
    x0, y0, x1, y1 = crop_box
    return small, (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def tensor_to_image(x: torch.Tensor, preprocess) -> Image.Image:
    """A preprocessed (3, H, W) input back to a viewable RGB image."""
    pixels = preprocess.denormalize(x.unsqueeze(0).float())[0].clamp(0, 1)
    return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


_MISSING = object()


def settings_difference(before: dict, after: dict, limit: int = 3) -> str:
    """The settings that differ between two runs, each named down to the value that changed.

    ``methods.rollout.discard_ratio 0.9 -> 0.5``, ``methods.gradcam (new)``, ``target 'pred' -> 'top2'``:
    at most ``limit`` of them, then how many more.
    """
    found: list[str] = []

    def walk(old, new, path: str) -> None:
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new), key=str):
                walk(old.get(key, _MISSING), new.get(key, _MISSING), f"{path}.{key}" if path else str(key))
        elif old is _MISSING:
            found.append(f"{path} (new)")
        elif new is _MISSING:
            found.append(f"{path} (not in this run)")
        elif old != new:
            found.append(f"{path} {json.dumps(old)} -> {json.dumps(new)}")

    walk(before, after, "")
    more = f", and {len(found) - limit} more" if len(found) > limit else ""
    return "; ".join(found[:limit]) + more


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
    save : what to write besides the records (see :func:`parse_save`; default all).
    overlay_max_side : int or None
        Longest side of the overlays (None: the original resolution). Maps keep the model's resolution.
    signed_display : ``'signed'`` or ``'positive'``
        How the overlays of signed methods (AttnLRP, CP-LRP) are drawn: their signed relevance with
        ``SIGNED_CMAP`` centred at zero (default), or the positive part over its maximum with ``cmap``
        like every other map. Their ``.npy`` maps are the signed relevance either way.
    prepare : bool
        Check and write ``run.json`` (and clear a replaced run). Ranks of a distributed run other
        than the main one pass False: the main rank prepared the directory for all of them.
    """

    def __init__(self, out_dir, model, methods: dict, settings: dict | None = None, resume: bool = True,
                 cmap: str = "jet", alpha: float = 0.5, save=None, overlay_max_side: int | None = OVERLAY_MAX_SIDE,
                 prepare: bool = True, signed_display: str = "signed"):
        self.model = model
        self.methods = methods
        self.cmap, self.alpha = cmap, alpha
        self.save = parse_save(save)
        self.overlay_max_side = overlay_max_side
        self.signed_display = check_signed_display(signed_display)
        self.settings = {
            "vitlens_version": __version__,
            "model": describe(model),
            "methods": methods,
            "overlay": {"cmap": cmap, "alpha": alpha, "max_side": overlay_max_side, "signed": self.signed_display},
            "save": list(self.save),
            **(settings or {}),
        }
        self.out = ensure_dir(out_dir) if prepare else Path(out_dir)
        self.records_dir = self.out / "records"
        if prepare:
            self._prepare(resume)
        self.order: list[str] = []
        self._order_lock = threading.Lock()
        self.warnings: list[str] = []  # about degenerate maps, set by finish()

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
                    changed = settings_difference(previous, normalized)
                    raise OutputError(f"'{self.out}' holds a run with different settings ({changed}): "
                                      "choose another --out, or pass --force to replace it")
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
        files = record.get("files")
        if not isinstance(files, dict):
            return False
        return all(_file_size(self.out / name) == size for name, size in files.items())

    def read_record(self, key: str) -> dict | None:
        path = self.records_dir / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    # --- writing -------------------------------------------------------------------------------
    def write_image(self, key: str, path: str | None, image: Image.Image | None, crop_box, result, index: int,
                    label: int | None = None, label_name: str | None = None, extra: dict | None = None,
                    original_size=None) -> dict:
        """Write overlays, maps and the record of image ``index`` of an ``ExplainResult``.

        ``original_size`` is the size of the file when ``image`` was decoded smaller than it (its
        ``crop_box`` is in ``image``'s pixels); the record states the file's size.
        """
        if image is None:
            image = tensor_to_image(result_input(result, index), self.model.preprocess)
            crop_box = (0, 0, image.width, image.height)
        original = None
        if "originals" in self.save:
            original = f"originals/{key}.jpg"
            thumb = image.copy()
            thumb.thumbnail((ORIGINAL_MAX_SIDE, ORIGINAL_MAX_SIDE))
            write_atomic(self.out / original, lambda fh: thumb.save(fh, format="JPEG", quality=90), durable=False)
        # one downscaled canvas for every overlay of the image, not a full-resolution copy per method
        canvas, canvas_box = fit_within(image, crop_box, self.overlay_max_side) if "overlays" in self.save \
            else (None, None)
        outputs = []
        # maps that show nothing are written like the others but say so (the manifest sums them up)
        degenerate = {(d["method"], d["slot"]): d for d in result.degenerate_maps(index)}
        for method in self.methods:
            for slot, target in enumerate(result.targets[index].tolist()):
                stem = f"{key}__{target}"
                entry = {"method": method, "target": int(target)}
                raw = result.patch_maps[method][index, slot].numpy().astype(np.float32)
                if "overlays" in self.save:
                    overlay_file = f"overlays/{method}/{stem}.png"
                    if self.signed_display == "signed" and get_method(method).signed:
                        # red positive, blue negative, the photo untouched where the relevance is zero
                        drawn = overlay_on_original(canvas, raw, canvas_box, cmap=SIGNED_CMAP, alpha=self.alpha,
                                                    signed=True)
                    else:
                        pixel_map = result.maps[method][index, slot].numpy()
                        drawn = overlay_on_original(canvas, pixel_map, canvas_box, cmap=self.cmap, alpha=self.alpha)
                    save_png_atomic(drawn, self.out / overlay_file, photo=True, durable=False)
                    entry["overlay"] = overlay_file
                if "maps" in self.save:
                    map_file = f"maps/{method}/{stem}.npy"
                    write_atomic(self.out / map_file, lambda fh, a=raw: np.save(fh, a), durable=False)
                    entry["map"] = map_file
                flagged = degenerate.get((method, slot))
                if flagged is not None:
                    entry["warning"] = {"kind": flagged["kind"], "cause": flagged["cause"]}
                for extra_name, values in result.extras.get(method, {}).items():
                    entry[extra_name] = round(float(values[index, slot]), 6)
                outputs.append(entry)
        if original_size is not None and tuple(original_size) != tuple(image.size):
            sx, sy = original_size[0] / image.width, original_size[1] / image.height
            crop_box = (crop_box[0] * sx, crop_box[1] * sy, crop_box[2] * sx, crop_box[3] * sy)
            size = list(original_size)
        else:
            size = list(image.size)
        prediction = result.predictions[index]
        record = {
            "key": key,
            "path": path,
            "label": label,
            "label_name": label_name,
            "status": "ok",
            "error": None,
            "size": size,
            "crop_box": [round(float(v), 3) for v in crop_box],
            "prediction": prediction.to_dict(),
            "targets": [p.to_dict() for p in result.target_predictions(index)],
            "original": original,
            "outputs": outputs,
            "files": self._sizes([original] + [o.get(k) for o in outputs for k in ("overlay", "map")]),
            **(extra or {}),
        }
        self._write_record(key, record)
        return record

    def _sizes(self, names) -> dict:
        """Relative path -> size in bytes of the files just written (what :meth:`done` checks)."""
        return {name: (self.out / name).stat().st_size for name in names if name is not None}

    def write_failure(self, key: str, path: str | None, error: str, label=None, label_name=None) -> dict:
        record = {"key": key, "path": path, "label": label, "label_name": label_name, "status": "failed",
                  "error": error, "prediction": None, "targets": [], "outputs": [], "files": {}}
        self._write_record(key, record)
        return record

    def _write_record(self, key: str, record: dict) -> None:
        write_text_atomic(self.records_dir / f"{key}.json", json.dumps(record, indent=1) + "\n", durable=False)
        with self._order_lock:
            if key not in self.order:
                self.order.append(key)

    def finish(self, order: list[str] | None = None, metrics: dict | None = None, records: dict | None = None) -> Path:
        """Assemble ``manifest.json`` from the records, in ``order`` (default: writing order).

        ``records`` (key -> record) are used instead of reading ``records/`` where given: the
        main rank of a distributed run writes the manifest from the records every rank sent it.
        """
        images = []
        for key in order if order is not None else self.order:
            record = records.get(key) if records is not None else self.read_record(key)
            if record is not None:
                images.append(record)
        manifest = {**self.settings, "images": images}
        self.warnings = summarise((o["method"], o["warning"]["kind"], o["warning"]["cause"],
                                   r.get("path") or r.get("key")) for r in images for o in r.get("outputs", [])
                                  if isinstance(o.get("warning"), dict))
        manifest["warnings"] = self.warnings
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


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def result_input(result, index: int) -> torch.Tensor:
    """The preprocessed input tensor an ExplainResult kept for inputs given as tensors."""
    tensor = getattr(result, "input_tensors", None)
    if tensor is None:
        raise OutputError("this result has no image to draw overlays on")
    return tensor[index]
