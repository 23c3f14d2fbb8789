import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vitlens.errors import OutputError
from vitlens.render import GridRow, RenderError, compare_grid

NA_GRAY = (238, 238, 238)  # background of an "n/a" cell


def _rows(n, columns, size=(40, 40), title="tiger cat 0.62", color=(0, 0, 0)):
    img = Image.new("RGB", size, color)
    heat = np.tile(np.linspace(0, 1, 14), (14, 1))
    return [GridRow(image=img, title=title, maps={c: heat for c in columns}) for _ in range(n)]


def test_returns_rgb_image_and_writes_png(tmp_path):
    out = compare_grid(_rows(2, ["rollout"]), ["rollout"], path=tmp_path / "g" / "grid.png")
    assert out.mode == "RGB"
    with Image.open(tmp_path / "g" / "grid.png") as back:
        assert back.size == out.size
        np.testing.assert_array_equal(np.asarray(back.convert("RGB")), np.asarray(out))
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["grid.png"]


def test_size_grows_with_rows_and_columns():
    one = compare_grid(_rows(1, ["a"]), ["a"])
    more_rows = compare_grid(_rows(3, ["a"]), ["a"])
    more_cols = compare_grid(_rows(1, ["a", "b", "c"]), ["a", "b", "c"])
    assert more_rows.size[0] == one.size[0] and more_rows.size[1] > one.size[1]
    assert more_cols.size[1] == one.size[1] and more_cols.size[0] > one.size[0]
    # Each extra square row / column adds one 2.6 in cell (plus a small gap) at 100 dpi.
    assert 260 <= (more_rows.size[1] - one.size[1]) / 2 <= 275
    assert 260 <= (more_cols.size[0] - one.size[0]) / 2 <= 275


def test_cell_size_scales_the_figure():
    small = compare_grid(_rows(2, ["a"]), ["a"], cell_size=1.5)
    big = compare_grid(_rows(2, ["a"]), ["a"], cell_size=3.0)
    assert big.size[0] > small.size[0] and big.size[1] > small.size[1]


def test_eight_by_eight():
    cols = [f"method-{i}" for i in range(7)]
    out = compare_grid(_rows(8, cols), cols)
    # 8 columns (original + 7) and 8 rows of 2.6 in cells at 100 dpi.
    assert out.size[0] > 8 * 260 and out.size[1] > 8 * 260


def test_hostile_and_unicode_titles_do_not_crash():
    cols = ["<script>alert(1)</script>", "GMAR $\\alpha$ l2", "猫 — 🐱"]
    rows = _rows(2, cols, title="<script>alert(1)</script> tabby 猫 $x_1$ " + "very long " * 20)
    rows.append(GridRow(Image.new("RGB", (30, 20)), title="", maps={}))
    out = compare_grid(rows, cols)
    assert out.size[0] > 0


def test_missing_map_is_a_blank_na_cell():
    rows = _rows(1, ["a", "b"])
    with_all = np.asarray(compare_grid(rows, ["a", "b"], alpha=1.0).convert("RGB"))
    rows[0].maps = {"a": rows[0].maps["a"]}  # "b" missing now
    with_missing = np.asarray(compare_grid(rows, ["a", "b"], alpha=1.0).convert("RGB"))
    assert with_all.shape == with_missing.shape

    def gray(arr):
        return int(np.all(arr == NA_GRAY, axis=-1).sum())

    assert gray(with_all) < 50  # a few antialiased text pixels may hit the value
    # Most of a ~260x260 px cell is the n/a background.
    assert gray(with_missing) > 0.8 * 260 * 260


def test_signed_columns_use_diverging_colormap():
    img = Image.new("RGB", (40, 40), (255, 255, 255))
    rel = np.full((4, 4), 2.0)  # all positive -> fully red with bwr
    row = GridRow(image=img, maps={"lrp": rel}, signed={"lrp"})
    out = np.asarray(compare_grid([row], ["lrp"], alpha=1.0)).astype(int)
    h, w, _ = out.shape
    # Centre of the second (and last) cell; the figure has no title band.
    r, g, b = out[h - int(0.1 * 100) - 130, w - int(0.1 * 100) - 130]
    assert r > 200 and g < 40 and b < 40
    # Same data as an unsigned jet map: value 2 clips to 1 -> dark red, not the bwr red.
    row = GridRow(image=img, maps={"lrp": rel})
    out2 = np.asarray(compare_grid([row], ["lrp"], alpha=1.0)).astype(int)
    assert out2[h - 140, w - 140][0] < 160
    # Zero relevance in a signed column leaves the (white) photo as it is.
    row = GridRow(image=img, maps={"lrp": np.zeros((4, 4))}, signed={"lrp"})
    out3 = np.asarray(compare_grid([row], ["lrp"], alpha=1.0)).astype(int)
    assert out3[h - 140, w - 140].min() == 255


def test_grid_level_signed_argument():
    img = Image.new("RGB", (40, 40), (0, 0, 0))
    row = GridRow(image=img, maps={"lrp": np.full((4, 4), -1.0)})
    out = np.asarray(compare_grid([row], ["lrp"], alpha=1.0, signed={"lrp"})).astype(int)
    h, w, _ = out.shape
    r, g, b = out[h - 140, w - 140]
    assert b > 200 and r < 40


def test_portrait_images_get_taller_rows():
    square = compare_grid(_rows(1, ["a"], size=(40, 40)), ["a"])
    tall = compare_grid(_rows(1, ["a"], size=(40, 60)), ["a"])
    assert tall.size[0] == square.size[0]
    assert 120 <= tall.size[1] - square.size[1] <= 140  # 2.6 in * 0.5 * 100 dpi


def test_invalid_arguments():
    with pytest.raises(RenderError):
        compare_grid([], ["a"])
    with pytest.raises(RenderError):
        compare_grid(_rows(1, ["a"]), ["a"], cell_size=0)


def test_unwritable_path_is_output_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError) as info:
        compare_grid(_rows(1, ["a"]), ["a"], path=tmp_path / "afile" / "grid.png")
    assert "\n" not in str(info.value)


def test_rendering_never_imports_pyplot():
    # pyplot would pick a global (possibly interactive) backend inside the user's process.
    code = (
        "import sys; import vitlens.render; from PIL import Image;"
        "vitlens.render.compare_grid([vitlens.render.GridRow(Image.new('RGB',(8,8)))], []);"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
