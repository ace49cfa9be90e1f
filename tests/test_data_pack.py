"""Packing loses nothing and converts faithfully: overwrite, failed re-packs, image modes, options, CLI errors."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import srdd_lightning.data.pack as pack_mod
from srdd_lightning.cli import main
from srdd_lightning.data import PackError, ShardIndex, pack_digits, pack_image_folder
from srdd_lightning.data.stream import decode_image, read_shard

SMALL = dict(resolution=16, shard_size=8, val_fraction=0.2, val_shards=2)


def _flat(folder: Path, n: int, ext: str = "png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 7 % 256, 100, 200)).save(folder / f"{i:03d}.{ext}")
    return folder


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _samples(index: ShardIndex, split: str) -> list[tuple[str, bytes, int]]:
    return [s for p in index.shard_paths(split) for s in read_shard(p)]


# ----------------------------------------------------------------------------- nothing lost


def test_overwrite_removes_only_what_the_pack_wrote(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "mine.tar").write_bytes(b"a user's own archive")
    (out / "notes.txt").write_text("keep me")
    (out / "sub").mkdir()
    (out / "sub" / "x.tar").write_bytes(b"x")
    first = pack_digits(out, resolution=8, shard_size=256, val_shards=2)
    assert len(first.split("train").shards) == 6
    pack_digits(out, resolution=8, shard_size=512, val_shards=2, overwrite=True)
    expected = ["index.json", "mine.tar", "notes.txt", "sub", "train-000000.tar", "train-000001.tar",
                "train-000002.tar", "val-000000.tar", "val-000001.tar"]  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == expected  # old train-000003..5 gone, no staging left
    assert (out / "mine.tar").read_bytes() == b"a user's own archive" and (out / "sub" / "x.tar").read_bytes() == b"x"
    assert ShardIndex.load(out).split("train").total == first.split("train").total


def test_a_users_file_with_a_shard_name_is_never_replaced(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"mine")
    with pytest.raises(PackError, match="train-000000.tar, which no index.json there lists"):
        pack_digits(out, resolution=8, shard_size=512, val_shards=2)
    assert _snapshot(out) == {"train-000000.tar": b"mine"}


def _fail_after(n: int, exc: BaseException):
    calls = 0
    real = pack_mod.encode_png

    def encode(img):
        nonlocal calls
        calls += 1
        if calls > n:
            raise exc
        return real(img)

    return encode


@pytest.mark.parametrize("failure", ["disk_full", "interrupt", "empty_source", "only_non_images"])
def test_failed_repack_leaves_the_old_pack_intact(tmp_path, monkeypatch, failure):
    src, out = _flat(tmp_path / "src", 30), tmp_path / "out"
    pack_image_folder(src, out, **SMALL)
    (out / "mine.txt").write_text("unrelated")
    before = _snapshot(out)
    samples_before = {s: _samples(ShardIndex.load(out), s) for s in ("train", "val")}
    for p in src.iterdir():  # the new source differs, so a partial swap would show
        Image.new("RGB", (16, 16), (0, 0, 0)).save(p)
    if failure == "disk_full":
        monkeypatch.setattr(pack_mod, "encode_png", _fail_after(12, OSError(28, "No space left on device")))
        expected = OSError
    elif failure == "interrupt":
        monkeypatch.setattr(pack_mod, "load_image", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        expected = KeyboardInterrupt
    else:
        for p in src.iterdir():
            p.unlink()
        if failure == "only_non_images":
            (src / "a.txt").write_text("x")
        expected = PackError
    with pytest.raises(expected):
        pack_image_folder(src, out, overwrite=True, **SMALL)
    assert _snapshot(out) == before, "the old index, shards and unrelated files are untouched; no staging left"
    index = ShardIndex.load(out)
    assert {s: _samples(index, s) for s in ("train", "val")} == samples_before


def test_failed_pack_into_a_new_folder_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(pack_mod, "encode_png", _fail_after(3, OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space"):
        pack_image_folder(_flat(tmp_path / "src", 30), tmp_path / "out", **SMALL)
    assert not (tmp_path / "out").exists()


def test_stale_staging_folder_is_cleaned_and_files_are_shareable(tmp_path):
    out = tmp_path / "d"
    (out / f"{pack_mod.STAGE_PREFIX}dead").mkdir(parents=True)
    (out / f"{pack_mod.STAGE_PREFIX}dead" / "train-000000.tar").write_bytes(b"half")
    pack_digits(out, resolution=8, shard_size=512, val_shards=2)
    assert not list(out.glob(".*"))
    umask = os.umask(0)
    os.umask(umask)
    for p in out.iterdir():  # not the 0600 of a temporary file: datasets are read by other users and jobs
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


def test_overwrite_refuses_an_unreadable_old_index(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "index.json").write_text("{ not json")
    (out / "train-000000.tar").write_bytes(b"?")
    before = _snapshot(out)
    with pytest.raises(PackError, match="cannot be read.*nothing is replaced"):
        pack_digits(out, resolution=8, shard_size=512, val_shards=2, overwrite=True)
    assert _snapshot(out) == before


# ----------------------------------------------------------------------------- faithful conversion

V16 = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)  # a full 16-bit gradient
PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30)]
IDX = (np.arange(256).reshape(16, 16) % 4).astype(np.uint8)
ALPHA = np.array([0, 64, 128, 255], np.uint8)[np.arange(256).reshape(16, 16) // 64]
WHITE = np.full((16, 16, 3), 255.0)


def _gray3(a: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(a, np.float64)[..., None], 3, axis=2)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None] / 255.0
    return rgb * a + 255.0 * (1 - a)


def _palette_image() -> Image.Image:
    img = Image.frombytes("P", (16, 16), IDX.tobytes())
    img.putpalette([c for rgb in PALETTE for c in rgb])
    return img


def _cmyk() -> tuple[Image.Image, np.ndarray]:
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[:8] = (0, 128, 255, 64)
    cmyk[8:] = (200, 10, 0, 0)
    rgb = 255.0 * (1 - cmyk[..., :3] / 255.0) * (1 - cmyk[..., 3:] / 255.0)
    return Image.fromarray(cmyk, mode="CMYK"), rgb


def _case(name: str) -> tuple[Image.Image, str, dict, np.ndarray, float]:
    """(image, file suffix, save options, expected RGB pixels, tolerance) for one source mode."""
    pal = np.array(PALETTE, np.float64)[IDX]
    if name == "png_I;16":
        return Image.fromarray(V16), "png", {}, _gray3(np.round(V16 / 257)), 0
    if name == "png_I;16_transparent":
        return Image.fromarray(V16), "png", {"transparency": int(V16[0, 5])}, \
            np.where((V16 == V16[0, 5])[..., None], WHITE, _gray3(np.round(V16 / 257))), 0  # fmt: skip
    if name == "tiff_I":
        return Image.fromarray(V16.astype(np.int32)), "tif", {}, _gray3(np.round(V16 / 257)), 0
    if name == "tiff_F":
        f = (V16 / 65535.0).astype(np.float32)
        return Image.fromarray(f), "tif", {}, _gray3(np.round(f.astype(np.float64) * 255)), 0
    if name == "png_P":
        return _palette_image(), "png", {}, pal, 0
    if name in ("png_P_transparent", "gif_P_transparent"):
        return _palette_image(), name[:3], {"transparency": 3}, np.where((IDX == 3)[..., None], WHITE, pal), 0
    if name == "png_LA":
        la = Image.merge("LA", (Image.fromarray((V16 >> 8).astype(np.uint8)), Image.fromarray(ALPHA)))
        return la, "png", {}, _over_white(_gray3(V16 >> 8), ALPHA), 1
    if name == "png_RGBA":
        rgba = np.dstack([np.array(PALETTE, np.uint8)[IDX], ALPHA])
        return Image.fromarray(rgba), "png", {}, _over_white(pal, ALPHA), 1
    if name == "tiff_CMYK":
        img, rgb = _cmyk()
        return img, "tif", {}, rgb, 1
    if name == "jpeg_CMYK":
        img, rgb = _cmyk()
        return img, "jpg", {"quality": 100}, rgb, 6  # lossy; the halves differ by >100 levels
    if name == "png_1":
        bits = (np.indices((16, 16)).sum(0) % 2).astype(bool)
        return Image.fromarray(bits), "png", {}, _gray3(bits * 255.0), 0
    raise KeyError(name)


CASES = ["png_I;16", "png_I;16_transparent", "tiff_I", "tiff_F", "png_P", "png_P_transparent", "gif_P_transparent",
         "png_LA", "png_RGBA", "tiff_CMYK", "jpeg_CMYK", "png_1"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_image_modes_pack_faithfully(tmp_path, case):
    img, ext, save, expected, atol = _case(case)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        img.save(src / f"{i}.{ext}", **save)
    source_mode = Image.open(src / f"0.{ext}").mode
    assert source_mode == {"png_I;16": "I;16", "png_I;16_transparent": "I;16", "tiff_I": "I", "tiff_F": "F",
                           "png_LA": "LA", "png_RGBA": "RGBA", "tiff_CMYK": "CMYK", "jpeg_CMYK": "CMYK",
                           "png_1": "1"}.get(case, "P"), "the test builds the mode it claims"  # fmt: skip
    index = pack_image_folder(src, tmp_path / "out", resolution=16, shard_size=8, val_fraction=0.34, val_shards=2)
    key, png, _ = _samples(index, "train")[0]
    stored = np.asarray(Image.open(io.BytesIO(png)), np.float64)
    assert stored.shape == (16, 16, 3)
    np.testing.assert_allclose(stored, expected, atol=atol + 1e-9)
    decoded = (decode_image(png, 16, flip=False) + 1) * 127.5  # what training sees
    np.testing.assert_allclose(decoded.permute(1, 2, 0).numpy(), stored, atol=1e-3)
    if case in ("png_I;16", "tiff_I", "tiff_F"):
        assert stored.min() <= 1 and len(np.unique(stored)) > 200, "a 16-bit gradient must not pack as white"


def test_exif_orientation_is_applied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    stored = np.zeros((8, 16, 3), np.uint8)
    stored[:, :8] = (255, 0, 0)  # left half red, right half blue as stored
    stored[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the stored left half ends up on top
    for i in range(6):
        Image.fromarray(stored).save(src / f"{i}.jpg", exif=exif, quality=95)
    index = pack_image_folder(src, tmp_path / "out", resolution=8, shard_size=8, val_fraction=0.34, val_shards=2)
    px = np.asarray(Image.open(io.BytesIO(_samples(index, "train")[0][1])), np.int32)
    assert px[0, :, 0].min() > 200 and px[-1, :, 2].min() > 200  # red on top, blue at the bottom


# ----------------------------------------------------------------------------- what goes in


def test_non_images_and_hidden_files_are_skipped_and_counted(tmp_path):
    src = _flat(tmp_path / "src", 6)
    (src / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (src / "notes.txt").write_text("not an image")
    (src / ".thumbs").mkdir()
    Image.new("RGB", (16, 16)).save(src / ".thumbs" / "t.png")  # a hidden folder's images are not data
    (src / "gone.png").symlink_to(tmp_path / "nowhere.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    for i in range(8):  # truncated: opens and "verifies", fails only when decoded; some land in validation
        (src / f"z{i}.jpg").write_bytes(buf.getvalue()[:-20])
    assert sum(i >= 6 for i in np.random.default_rng(1).permutation(14)[:4]) == 3, "bad images picked for val"
    index = pack_image_folder(src, tmp_path / "out", resolution=16, shard_size=8, val_fraction=0.3, val_shards=2,
                              seed=1)
    assert index.split("val").total == 4 and {s.count for s in index.split("val").shards} == {2}
    assert index.split("train").total == 2  # the 6 good images, nothing else
    assert index.extra["skipped_files"] == 12
    every = {".DS_Store", "notes.txt", ".thumbs", "gone.png"} | {f"z{i}.jpg" for i in range(8)}
    assert len(index.extra["skipped_examples"]) == 5 and set(index.extra["skipped_examples"]) <= every
    assert "skipped 12 file(s) that are not readable images" in index.summary()


def test_empty_class_folders_are_an_error_unless_skipped(tmp_path, caplog):
    src = tmp_path / "src"
    for cls in ("cat", "dog"):
        _flat(src / cls, 6)
    (src / "bird").mkdir()
    (src / "bird" / "notes.txt").write_text("no images here")
    (src / "fish").mkdir()
    with pytest.raises(PackError, match="bird, fish .*--skip_empty_classes true"):
        pack_image_folder(src, tmp_path / "out", **SMALL)
    with caplog.at_level(logging.WARNING):
        index = pack_image_folder(src, tmp_path / "out", skip_empty_classes=True, **SMALL)
    assert index.classes == ["cat", "dog"] and index.extra["skipped_classes"] == ["bird", "fish"]
    assert {lbl for s in ("train", "val") for _, _, lbl in _samples(index, s)} == {0, 1}
    assert "bird, fish" in caplog.text and "skipped empty class folder(s): bird, fish" in index.summary()


def test_top_level_images_beside_classes_are_an_error_but_a_readme_is_skipped(tmp_path):
    src = tmp_path / "src"
    for cls in ("cat", "dog"):
        _flat(src / cls, 6)
    (src / "README.txt").write_text("about this dataset")
    index = pack_image_folder(src, tmp_path / "out", **SMALL)
    assert index.classes == ["cat", "dog"] and index.extra["skipped_files"] == 1
    Image.new("RGB", (16, 16)).save(src / "stray.png")
    with pytest.raises(PackError, match=r"mixes images \(stray.png, ...\) and class subfolders"):
        pack_image_folder(src, tmp_path / "out2", **SMALL)


@pytest.mark.parametrize("option, value", [
    ("resolution", 0), ("resolution", -16), ("resolution", 2.5), ("resolution", True), ("shard_size", 0),
    ("val_fraction", 0.0), ("val_fraction", 1.0), ("val_fraction", 1.5), ("val_fraction", float("nan")),
    ("val_shards", 0), ("seed", -1),
])  # fmt: skip
def test_options_that_cannot_be_honoured_are_refused(tmp_path, option, value):
    with pytest.raises(PackError, match=f"^--{option} must"):
        pack_image_folder(tmp_path / "src", tmp_path / "out", **{option: value})
    with pytest.raises(PackError, match=f"^--{option} must"):
        pack_digits(tmp_path / "out", **{option: value})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("resolution, expected", [
    (100, "resolution 100 is not a multiple of 16 (the downsampling of var-vae-f16, var-vae-f16-512, var-vae-f16-1024): "),
    (15, "resolution 15 is not a multiple of 16 (the downsampling of var-vae-f16, var-vae-f16-512, var-vae-f16-1024) / 4 (the downsampling of tiny, "
         "tiny-16) / 2 (the downsampling of digits)"),
    (96, None),
])  # fmt: skip
def test_resolution_the_tokenizers_cannot_use_warns_at_pack_time(tmp_path, caplog, resolution, expected):
    with caplog.at_level(logging.WARNING), pytest.raises(PackError, match="does not exist"):
        pack_image_folder(tmp_path / "missing", tmp_path / "out", resolution=resolution)
    if expected is None:
        assert "not a multiple" not in caplog.text
    else:
        assert expected in caplog.text


# ----------------------------------------------------------------------------- the index


def _raw_index(digits_root: Path) -> dict:
    return json.loads((digits_root / "index.json").read_text())


def _dup(raw):
    raw["splits"]["val"]["shards"].append(dict(raw["splits"]["train"]["shards"][0]))
    raw["splits"]["val"]["total"] += raw["splits"]["train"]["shards"][0]["count"]


@pytest.mark.parametrize("mangle, match", [
    (lambda raw: "{ not json", "is not valid JSON"),
    (lambda raw: [1, 2], "has format 'list'"),
    (lambda raw: raw.pop("classes") and None, "lacks the entry 'classes'"),
    (lambda raw: raw["splits"]["train"]["shards"][0].update(file="../elsewhere.tar"), "not a plain file name"),
    (lambda raw: raw["splits"]["train"]["shards"][0].update(count=0), "has count 0"),
    (lambda raw: raw["splits"]["train"].update(total=5), "not the sum of its shard counts"),
    (lambda raw: raw.update(resolution="16"), "resolution '16' is not a positive integer"),
    (_dup, "lists shard train-000000.tar twice"),
])  # fmt: skip
def test_corrupt_index_gets_a_clear_error(tmp_path, digits_root, mangle, match):
    raw = _raw_index(digits_root)
    result = mangle(raw)
    text = result if isinstance(result, str) else json.dumps(result if isinstance(result, list) else raw)
    (tmp_path / "index.json").write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        ShardIndex.load(tmp_path)
    assert str(tmp_path / "index.json") in str(e.value)


# ----------------------------------------------------------------------------- srdd data


def test_cli_readme_syntax_packs_and_reports_skips(tmp_path, capsys):
    src = _flat(tmp_path / "pictures", 20)
    (src / ".DS_Store").write_bytes(b"x")
    (src / "notes.txt").write_text("x")
    main(["data", "folder", "--src", str(src), "--out", str(tmp_path / "mine"), "--resolution", "16",
          "--val_fraction", "0.2", "--val_shards", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert "train: 16 samples" in out and "skipped 2 file(s) that are not readable images" in out


def _cli_case(tmp_path: Path, case: str) -> tuple[list[str], str]:
    src, out = tmp_path / "src", tmp_path / "out"
    if case == "src_missing":
        return ["--src", str(src), "--out", str(out)], f"--src {src} does not exist"
    if case == "src_is_file":
        src.write_text("x")
        return ["--src", str(src), "--out", str(out)], f"--src {src} is a file"
    src.mkdir()
    if case == "src_empty":
        return ["--src", str(src), "--out", str(out)], f"--src {src} is empty"
    _flat(src, 20)
    if case == "out_not_writable":
        (tmp_path / "f").write_text("a file, so nothing can be created below it")
        return ["--src", str(src), "--out", str(tmp_path / "f" / "out")], "cannot write into --out"
    if case == "existing_pack":
        pack_image_folder(src, out, **SMALL)
        return ["--src", str(src), "--out", str(out), "--resolution", "16", "--val_fraction", "0.2",
                "--val_shards", "2"], "pass --overwrite true"  # fmt: skip
    if case == "out_missing":
        return ["--src", str(src)], "the following arguments are required: --out"
    if case == "bad_resolution":
        return ["--src", str(src), "--out", str(out), "--resolution", "big"], "--resolution: expected int, got big"
    raise KeyError(case)


@pytest.mark.parametrize("case", ["src_missing", "src_is_file", "src_empty", "out_not_writable", "existing_pack",
                                  "out_missing", "bad_resolution"])  # fmt: skip
def test_cli_mistakes_are_one_line_not_a_traceback(tmp_path, capsys, case):
    args, expected = _cli_case(tmp_path, case)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["data", "folder", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[0].startswith("srdd data: error: ") and expected in err[0]
    assert len(err) <= 2 and "Traceback" not in "\n".join(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_read_only_out_folder(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(SystemExit):
            main(["data", "digits", "--out", str(out)])
    finally:
        out.chmod(0o700)
    assert "cannot write into --out" in capsys.readouterr().err


def test_cli_help_lists_option_docs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "digits" in out and "folder" in out and "Pack a folder of images" in out
    with pytest.raises(SystemExit):
        main(["data", "folder", "--help"])
    out = capsys.readouterr().out
    assert "--src SRC" in out and "Image folder: files directly inside" in out and "--skip_empty_classes" in out


def test_console_script_error_exit_code(tmp_path):
    srdd = Path(sys.executable).parent / "srdd"
    proc = subprocess.run([str(srdd), "data", "folder", "--src", str(tmp_path / "pictures"), "--out",
                           str(tmp_path / "mine")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"srdd data: error: --src {tmp_path / 'pictures'} does not exist"
