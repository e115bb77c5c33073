"""data_prep: determinism, atomicity, formats read back by stock tools, and bad-input errors.

Source fixtures (CIFAR pickles, ImageFolder/TinyImageNet trees, IDX files) are tiny
replicas of the real on-disk formats, built in tmp dirs.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # data_prep is a top-level dir; until pyproject packages it
    sys.path.insert(0, str(REPO))

from data_prep import SourceError, SourceMissing, prepare  # noqa: E402
from data_prep.make_shards import main as cli_main  # noqa: E402
from data_prep.sources import FASHION_MNIST_DIR  # noqa: E402

pytestmark = pytest.mark.unit


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def read_back(out: Path, split: str) -> list[tuple[str, np.ndarray, int]]:
    """(key, image, label) of a split, via stock webdataset (no pce_dist code)."""
    import webdataset as wds

    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["name"]) for s in manifest["splits"][split]["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("l8" if manifest["channels"] == 1 else "rgb8")
    ext = manifest["image_format"]
    return [(s["__key__"], s[ext], int(s["cls"])) for s in ds]


# ----------------------------------------------------------------------------- digits / writer


def test_digits_manifest_and_stock_readers(tmp_path):
    out = tmp_path / "digits"
    m = prepare("digits", out, shard_size=500)
    assert m["splits"]["train"]["num_samples"] + m["splits"]["test"]["num_samples"] == 1797
    assert m["splits"]["test"]["num_samples"] == 359  # stratified 20%, rounded per class
    assert [s["num_samples"] for s in m["splits"]["train"]["shards"]] == [500, 500, 438]
    assert m["image_size"] == [8, 8] and m["channels"] == 1 and m["num_classes"] == 10
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == m
    for split in ("train", "test"):
        for shard in m["splits"][split]["shards"]:
            listing = subprocess.run(["tar", "-tvf", str(out / shard["name"])], check=True,
                                     capture_output=True, text=True).stdout.splitlines()
            assert len(listing) == 2 * shard["num_samples"]
            assert all(" 0/0 " in line and "1970-01-01" in line for line in listing)
            # what the loader checks each shard against (sha256sum is the independent digest)
            assert shard["size"] == (out / shard["name"]).stat().st_size
            digest = subprocess.run(["sha256sum", str(out / shard["name"])], check=True,
                                    capture_output=True, text=True).stdout.split()[0]
            assert shard["sha256"] == digest
    samples = read_back(out, "train")
    assert len(samples) == 1438 and len({k for k, _, _ in samples}) == 1438
    assert all(img.shape == (8, 8) and img.dtype == np.uint8 for _, img, _ in samples[:10])
    assert {label for _, _, label in samples} == set(range(10))
    # Round trip of pixel values: 0..16 scaled to 0..255.
    from sklearn.datasets import load_digits
    digits, (key, img, label) = load_digits(), samples[0]
    src = int(key.split("_")[1])
    np.testing.assert_array_equal(img, np.rint(digits.images[src] * 255 / 16).astype(np.uint8))
    assert label == digits.target[src]


def test_same_input_same_bytes(tmp_path):
    a = prepare("digits", tmp_path / "a", shard_size=400, val_fraction=0.1, seed=3)
    b = prepare("digits", tmp_path / "b", shard_size=400, val_fraction=0.1, seed=3)
    assert a == b
    assert shard_files(tmp_path / "a") == shard_files(tmp_path / "b")
    c = prepare("digits", tmp_path / "c", shard_size=400, val_fraction=0.1, seed=4)
    assert c["splits"]["train"]["shards"][0]["sha256"] != a["splits"]["train"]["shards"][0]["sha256"]


def test_val_fraction_is_stratified_and_disjoint(tmp_path):
    out = tmp_path / "d"
    m = prepare("digits", out, val_fraction=0.25, seed=1)
    train, val = read_back(out, "train"), read_back(out, "val")
    assert m["splits"]["train"]["num_samples"] + m["splits"]["val"]["num_samples"] == 1438
    assert not {k for k, _, _ in train} & {k for k, _, _ in val}
    per_class = np.bincount([lbl for _, _, lbl in val], minlength=10)
    totals = per_class + np.bincount([lbl for _, _, lbl in train], minlength=10)
    assert np.all(np.abs(per_class - 0.25 * totals) <= 0.5 + 1e-9)
    # The train order is shuffled (sources are often sorted by class); eval order is not.
    assert [int(k.split("_")[1]) for k, _, _ in train] != sorted(int(k.split("_")[1]) for k, _, _ in train)


def test_rerun_replaces_output_cleanly(tmp_path):
    out = tmp_path / "d"
    prepare("digits", out, shard_size=100)  # 15 train shards
    (out / ".train-000003.tar.tmp").write_bytes(b"left by a killed run")
    (out / "notes.txt").write_text("not ours")
    prepare("digits", out, shard_size=1000)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "notes.txt", "test-000000.tar", "train-000000.tar", "train-000001.tar"]


def test_killed_run_leaves_no_partial_shard_and_no_manifest(tmp_path):
    """SIGKILL mid-write: only whole shards under shard names, no manifest; a re-run is clean."""
    out = tmp_path / "killed"
    slow = (
        "import sys, time; sys.path.insert(0, sys.argv[1])\n"
        "import data_prep.dataset as p\n"
        "encode = p.encode_image\n"
        "def slow(img, fmt):\n"
        "    time.sleep(0.003)\n"
        "    return encode(img, fmt)\n"
        "p.encode_image = slow\n"
        "p.prepare('digits', sys.argv[2], shard_size=50)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", slow, str(REPO), str(out)])
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            done = list(out.glob("train-*.tar")) if out.exists() else []
            if len(done) >= 3 and list(out.glob(".*.tmp")):
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"prepare exited (rc={proc.poll()}) or stalled before 3 shards were written")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "manifest.json").exists()
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:  # raises on a truncated archive
            assert len(tar.getmembers()) == 100, shard
    assert all(p.name.endswith(".tar") or p.name.endswith(".tmp") for p in out.iterdir())

    prepare("digits", out, shard_size=50)
    prepare("digits", tmp_path / "fresh", shard_size=50)
    assert shard_files(out) == shard_files(tmp_path / "fresh")


def test_cli_runs_as_a_script_from_the_repo_root(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, "data_prep/make_shards.py", "--source", "digits", "--out", str(out),
                          "--format", "jpg", "--no-progress"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "manifest.json").read_text())["image_format"] == "jpg"
    assert len(read_back(out, "test")) == 359

    res = subprocess.run([sys.executable, "data_prep/make_shards.py", "--source", "cifar10", "--input",
                          str(tmp_path / "nope.tar.gz"), "--out", str(tmp_path / "x")],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "nope.tar.gz" in res.stderr


# ----------------------------------------------------------------------------- Fashion-MNIST (IDX)


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_gz_or_raw(tmp_path, gz):
    src, rng = tmp_path / "fm", np.random.default_rng(0)
    src.mkdir()
    suffix = ".gz" if gz else ""
    data = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        write_idx(src / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(src / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
        data[prefix] = images, labels
    m = prepare("fashion-mnist", tmp_path / "out", input=str(src))
    assert m["splits"]["train"]["num_samples"] == 12 and m["class_names"][9] == "Ankle boot"
    for key, img, label in read_back(tmp_path / "out", "test"):
        i = int(key.split("_")[1])
        np.testing.assert_array_equal(img, data["t10k"][0][i])
        assert label == data["t10k"][1][i]


def test_idx_errors_name_the_file(tmp_path):
    src = tmp_path / "fm"
    src.mkdir()
    with pytest.raises(SourceMissing, match="train-images-idx3-ubyte"):
        prepare("fashion-mnist", tmp_path / "out", input=str(src))
    write_idx(src / "train-images-idx3-ubyte", np.zeros((3, 28, 28)), gz=False)
    write_idx(src / "train-labels-idx1-ubyte", np.array([0, 1, 12]), gz=False)
    write_idx(src / "t10k-images-idx3-ubyte", np.zeros((1, 28, 28)), gz=False)
    (src / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(SourceError, match=r"train-labels-idx1-ubyte: label 12"):
        prepare("fashion-mnist", tmp_path / "out", input=str(src))
    write_idx(src / "train-labels-idx1-ubyte", np.array([0, 1, 2]), gz=False)
    with pytest.raises(SourceError, match=r"t10k-labels-idx1-ubyte: not an IDX file"):
        prepare("fashion-mnist", tmp_path / "out", input=str(src))
    assert not (tmp_path / "out").exists()  # validated before anything was written


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_debian_fashion_mnist_files_are_read():
    from data_prep.sources import load_fashion_mnist

    data = load_fashion_mnist(None)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 60000, "test": 10000}
    labels = data.splits["train"].labels
    assert np.bincount(labels).tolist() == [6000] * 10
    assert data.splits["test"].image_at(0).shape == (28, 28)


@pytest.mark.slow
@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_debian_fashion_mnist_full_prepare(tmp_path):
    m = prepare("fashion-mnist", tmp_path / "fm", shard_size=5000, val_fraction=0.1)
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {"train": 54000, "val": 6000, "test": 10000}
    assert len(read_back(tmp_path / "fm", "test")) == 10000


# ----------------------------------------------------------------------------- CIFAR


def cifar_pattern(n: int, offset: int) -> np.ndarray:
    """N x 32 x 32 x 3 images whose R, G, B planes differ, to catch a wrong reshape."""
    img = np.zeros((n, 32, 32, 3), np.uint8)
    for i in range(n):
        img[i, :, :, 0] = (offset + i) % 256
        img[i, :, :, 1] = np.arange(32, dtype=np.uint8)[None, :]
        img[i, :, :, 2] = np.arange(32, dtype=np.uint8)[:, None] * 2
    return img


def to_rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # the CIFAR row layout


def make_cifar(tmp_path: Path, fine: bool) -> tuple[Path, dict]:
    top = "cifar-100-python" if fine else "cifar-10-batches-py"
    num_classes, label_key = (100, b"fine_labels") if fine else (10, b"labels")
    d = tmp_path / "extracted" / top
    d.mkdir(parents=True)
    names = ["train", "test"] if fine else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    truth = {}
    for j, name in enumerate(names):
        images, labels = cifar_pattern(3, 10 * j), [(7 * j + i) % num_classes for i in range(3)]
        truth[name] = images, labels
        batch = {b"data": to_rows(images), label_key: labels, b"batch_label": name.encode()}
        if fine:
            batch[b"coarse_labels"] = [0, 0, 0]
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)]} if fine else \
        {b"label_names": [f"c{i}".encode() for i in range(10)]}
    (d / ("meta" if fine else "batches.meta")).write_bytes(pickle.dumps(meta, protocol=2))
    archive = tmp_path / f"{top}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(d, arcname=top)
    return archive, truth


@pytest.mark.parametrize("fine", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_archive_and_directory(tmp_path, fine):
    archive, truth = make_cifar(tmp_path, fine)
    source = "cifar100" if fine else "cifar10"
    m = prepare(source, tmp_path / "from_tar", input=str(archive))
    prepare(source, tmp_path / "from_dir", input=str(tmp_path / "extracted"))
    from_tar, from_dir = shard_files(tmp_path / "from_tar"), shard_files(tmp_path / "from_dir")
    assert {k: v for k, v in from_tar.items() if k.endswith(".tar")} == \
        {k: v for k, v in from_dir.items() if k.endswith(".tar")}  # manifests differ only in args.input
    assert m["channels"] == 3 and m["image_size"] == [32, 32] and m["num_classes"] == (100 if fine else 10)
    test_name = "test" if fine else "test_batch"
    for key, img, label in read_back(tmp_path / "from_tar", "test"):
        i = int(key.split("_")[1])
        np.testing.assert_array_equal(img, truth[test_name][0][i])
        assert label == truth[test_name][1][i]


def test_cifar_errors(tmp_path):
    archive, _ = make_cifar(tmp_path, fine=False)
    with pytest.raises(SourceError, match="not a readable tar archive"):
        (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
        prepare("cifar10", tmp_path / "o", input=str(tmp_path / "junk.tar.gz"))
    batch3 = tmp_path / "extracted" / "cifar-10-batches-py" / "data_batch_3"
    batch3.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")  # a pickle that would run a command
    with pytest.raises(SourceError, match=r"data_batch_3: not a CIFAR pickle.*os.system is not allowed"):
        prepare("cifar10", tmp_path / "o", input=str(tmp_path / "extracted"))
    batch3.unlink()
    with pytest.raises(SourceMissing, match="data_batch_3"):
        prepare("cifar10", tmp_path / "o", input=str(tmp_path / "extracted"))
    with pytest.raises(SourceMissing, match="needs --input"):
        prepare("cifar10", tmp_path / "o")


# ----------------------------------------------------------------------------- ImageFolder / TinyImageNet


def save(path: Path, rgb: tuple[int, int, int], size=(6, 5), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, rgb if mode == "RGB" else rgb[0]).save(path)


def test_imagefolder_tree(tmp_path):
    root = tmp_path / "tree"
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for c, colour in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
            for i in range(n):
                save(root / split / c / f"{i}.{'png' if i % 2 else 'jpg'}", colour)
    save(root / "train" / "dog" / "gray.png", (90, 0, 0), mode="L")
    m = prepare("imagefolder", tmp_path / "out", input=str(root))
    assert m["class_names"] == ["cat", "dog"] and m["image_size"] == [5, 6] and m["channels"] == 3
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {"train": 7, "val": 2, "test": 4}
    for _, img, label in read_back(tmp_path / "out", "test"):
        assert img.shape == (5, 6, 3) and img[2, 2].argmax() == label  # red cats, green dogs

    m = prepare("imagefolder", tmp_path / "small", input=str(root), image_size=4, channels=1)
    assert m["image_size"] == [4, 4] and m["channels"] == 1
    assert read_back(tmp_path / "small", "train")[0][1].shape == (4, 4)


def test_imagefolder_errors_name_the_file_and_leave_nothing(tmp_path):
    root = tmp_path / "tree"
    for i in range(5):
        save(root / "train" / "a" / f"{i}.png", (1, 2, 3))
        save(root / "train" / "b" / f"{i}.png", (1, 2, 3))
    save(root / "val" / "zebra" / "0.png", (1, 2, 3))
    with pytest.raises(SourceError, match=r"val/zebra: class 'zebra' does not exist"):
        prepare("imagefolder", tmp_path / "out", input=str(root))
    (root / "val" / "zebra" / "0.png").unlink()
    (root / "val" / "zebra").rmdir()
    (root / "val").rmdir()

    save(root / "train" / "b" / "big.png", (1, 2, 3), size=(9, 9))
    with pytest.raises(SourceError, match=r"big.png: image is 9x9 .* --image-size"):
        prepare("imagefolder", tmp_path / "out", input=str(root), shard_size=2)
    (root / "train" / "b" / "big.png").unlink()
    (root / "train" / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(SourceError, match=r"bad.png: cannot decode image"):
        prepare("imagefolder", tmp_path / "out", input=str(root), shard_size=2)
    assert list((tmp_path / "out").iterdir()) == []  # whole shards of the failed run removed too

    rc = cli_main(["--source", "imagefolder", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert rc == 2


def make_tiny_imagenet(root: Path, wnids=("n01", "n02", "n03")) -> None:
    (root).mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # class order from the file
    for j, w in enumerate(wnids):
        for i in range(2):
            save(root / "train" / w / "images" / f"{w}_{i}.JPEG", (40 * j, 0, 0), size=(8, 8))
        (root / "train" / w / f"{w}_boxes.txt").write_text("ignored\n")
    lines = []
    for i, w in enumerate(wnids):
        save(root / "val" / "images" / f"val_{i}.JPEG", (40 * i, 0, 0), size=(8, 8))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t8\t8")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    save(root / "test" / "images" / "test_0.JPEG", (0, 0, 0), size=(8, 8))  # unlabelled


def test_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    make_tiny_imagenet(root)
    m = prepare("imagefolder", tmp_path / "out", input=str(root))
    assert m["class_names"] == ["n03", "n02", "n01"]
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {"train": 6, "val": 3}
    val = sorted(read_back(tmp_path / "out", "val"))
    assert [label for _, _, label in val] == [2, 1, 0]  # val_0 is n01, which is class 2


def test_tiny_imagenet_unknown_wnid(tmp_path):
    root = tmp_path / "tiny"
    make_tiny_imagenet(root)
    ann = root / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_9.JPEG\tn99\t0\t0\t8\t8\n")
    with pytest.raises(SourceError, match=r"val_annotations.txt: line 4: class 'n99'"):
        prepare("imagefolder", tmp_path / "out", input=str(root))
    assert not (tmp_path / "out").exists()


def test_unknown_source_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        prepare("mnist", tmp_path)
    with pytest.raises(ValueError, match="--val-fraction"):
        prepare("digits", tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match="--shard-size"):
        prepare("digits", tmp_path, shard_size=0)
    with pytest.raises(ValueError, match="takes no --input"):
        prepare("digits", tmp_path, input="x")
