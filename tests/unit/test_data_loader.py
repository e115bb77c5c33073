"""pce_dist.data: exact-once coverage, equal step counts, determinism, resume, corruption.

Ranks are simulated in one process (``rank=0..R-1``); workers are real DataLoader
processes. Every fixture image carries its sample id in two pixels, so a batch can be
mapped back to ids after decoding and normalisation (mean 0, std 1, no augmentation).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pce_dist.config import DataConfig
from pce_dist.data import CorruptDataError, build_eval_loader, build_train_loader, read_manifest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # data_prep is a top-level dir; until pyproject packages it
    sys.path.insert(0, str(REPO))

from data_prep.writer import encode_image, sha256_file, write_manifest, write_shard  # noqa: E402

pytestmark = [pytest.mark.unit,  # more workers than this CI box has cores is deliberate here
              pytest.mark.filterwarnings("ignore:This DataLoader will create")]
NUM_CLASSES = 5


def id_image(i: int) -> np.ndarray:
    img = np.full((4, 4), 77, np.uint8)
    img[0, 0], img[0, 1] = i // 256, i % 256
    return img


def make_dataset(root: Path, sizes: dict[str, list[int]], bad: dict[int, bytes] | None = None) -> Path:
    """Shards ``{split}-NNNNNN.tar`` of the given sizes; ids run on across shards and splits."""
    root.mkdir(parents=True, exist_ok=True)
    bad, next_id, splits = bad or {}, 0, {}
    for split, shard_sizes in sizes.items():
        shards = []
        for j, n in enumerate(shard_sizes):
            ids = range(next_id, next_id + n)
            samples = ((f"s{i:06d}", bad.get(i, encode_image(id_image(i), "png")), i % NUM_CLASSES) for i in ids)
            name = f"{split}-{j:06d}.tar"
            write_shard(root / name, samples, "png")
            shards.append({"name": name, "num_samples": n, "size": (root / name).stat().st_size,
                           "sha256": sha256_file(root / name)})
            next_id += n
        splits[split] = {"num_samples": sum(shard_sizes), "shards": shards}
    write_manifest(root, {"format_version": 1, "source": "test", "num_classes": NUM_CLASSES,
                          "class_names": [str(c) for c in range(NUM_CLASSES)], "image_size": [4, 4],
                          "channels": 1, "image_format": "png", "splits": splits})
    return root


def ids_of(images_BCHW: torch.Tensor) -> list[int]:
    px = torch.round(images_BCHW[:, 0, 0, :2] * 255).long()
    return (px[:, 0] * 256 + px[:, 1]).tolist()


def cfg_for(root: Path, **kw) -> DataConfig:
    base = dict(root=str(root), batch_size=8, num_workers=2, shuffle_buffer=16, mean=[0.0], std=[1.0])
    return DataConfig(**{**base, **kw})


def train_ids(cfg, rank=0, world_size=1, seed=0, epoch=0, start_step=0):
    loader = build_train_loader(cfg, rank=rank, world_size=world_size, seed=seed, epoch=epoch, start_step=start_step)
    batches = [ids_of(x) for x, y in loader]
    return batches, loader


UNEVEN = {"train": [37, 5, 23, 1, 40, 14], "test": [9, 17, 2]}  # 120 train, 28 test


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("uneven"), UNEVEN)


# ----------------------------------------------------------------------------- train


def test_exactly_once_across_two_ranks_and_two_workers(uneven):
    cfg = cfg_for(uneven, num_workers=2)
    seen, lengths, dropped = [], [], 0
    for rank in range(2):
        batches, loader = train_ids(cfg, rank=rank, world_size=2)
        assert len(batches) == len(loader)
        lengths.append(len(loader))
        seen += [i for b in batches for i in b]
        stats = loader.stats()
        assert stats["samples_seen"] == len(loader) * 8 and stats["samples_skipped"] == 0
        dropped += stats["samples_dropped"]
    assert lengths == [7, 7]  # 60 samples per rank -> 7 full batches of 8
    assert len(seen) == len(set(seen)) == 112 and set(seen) <= set(range(120))
    assert dropped == 120 - 112


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (3, 1), (4, 3), (2, 4)])
def test_equal_batch_counts_with_uneven_shards(uneven, world_size, num_workers):
    cfg = cfg_for(uneven, num_workers=num_workers, batch_size=5)
    counts, seen = [], []
    for rank in range(world_size):
        batches, loader = train_ids(cfg, rank=rank, world_size=world_size)
        counts.append((len(loader), len(batches)))
        seen += [i for b in batches for i in b]
    expected = (120 // world_size) // 5
    assert counts == [(expected, expected)] * world_size
    assert len(seen) == len(set(seen)) == expected * 5 * world_size


def test_order_is_deterministic_per_seed_and_epoch(uneven):
    cfg = cfg_for(uneven, num_workers=2)
    a, _ = train_ids(cfg, world_size=2, epoch=3)
    assert train_ids(cfg, world_size=2, epoch=3)[0] == a
    assert train_ids(cfg, world_size=2, epoch=4)[0] != a
    assert train_ids(cfg, world_size=2, epoch=3, seed=1)[0] != a
    one = cfg_for(uneven, num_workers=1)
    assert train_ids(one, epoch=3)[0] == train_ids(cfg_for(uneven, num_workers=0), epoch=3)[0]


@pytest.mark.parametrize("num_workers,start_step", [(0, 4), (2, 3), (3, 5)])
def test_resume_continues_without_repeats(uneven, num_workers, start_step):
    cfg = cfg_for(uneven, num_workers=num_workers, batch_size=4)
    full, _ = train_ids(cfg, world_size=2, rank=1, epoch=2)
    rest, loader = train_ids(cfg, world_size=2, rank=1, epoch=2, start_step=start_step)
    assert rest == full[start_step:]
    assert len(loader) == len(full) and loader.stats()["samples_resumed_over"] == start_step * 4


def test_resume_does_not_decode_the_skipped_samples(tmp_path):
    """A corrupt sample inside the resumed-over range is not decoded, so it raises nothing."""
    sizes = {"train": [20, 20]}
    clean = make_dataset(tmp_path / "clean", sizes)
    first = train_ids(cfg_for(clean, num_workers=0, batch_size=4))[0][0]
    broken = make_dataset(tmp_path / "broken", sizes, bad={first[0]: b"not a png"})
    cfg = cfg_for(broken, num_workers=0, batch_size=4)
    rest, _ = train_ids(cfg, start_step=1)
    assert len(rest) == 9
    with pytest.raises(CorruptDataError):
        train_ids(cfg)


def test_resampled_mode_has_a_nominal_length(uneven):
    cfg = cfg_for(uneven, num_workers=2, resampled=True, samples_per_epoch=200)
    batches, loader = train_ids(cfg, world_size=2, rank=1)
    assert len(loader) == len(batches) == 12  # 100 samples per rank / 8
    assert all(0 <= i < 120 for b in batches for i in b)
    assert train_ids(cfg, world_size=2, rank=1)[0] == batches
    assert train_ids(cfg, world_size=2, rank=1, start_step=5)[0] == batches[5:]


def test_augmentation_is_seeded_per_sample(uneven):
    cfg = cfg_for(uneven, num_workers=2, random_crop_padding=2, hflip=True, shuffle_buffer=0)
    runs = [[x for x, _ in build_train_loader(cfg, rank=0, world_size=1, seed=0, epoch=e)] for e in (0, 0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert runs[0][0].shape == (8, 1, 4, 4)
    plain = [x for x, _ in build_train_loader(cfg_for(uneven, shuffle_buffer=0), rank=0, world_size=1,
                                                seed=0, epoch=0)]
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], plain))


def test_train_shards_subset_and_pipe_urls(uneven):
    subset = cfg_for(uneven, train_shards="train-{000000..000002}.tar", num_workers=1)
    batches, loader = train_ids(subset)
    assert len(loader) == 65 // 8 and set(i for b in batches for i in b) <= set(range(65))
    piped = cfg_for(f"pipe:cat {uneven}/{{name}}", num_workers=1)
    assert train_ids(piped, epoch=1)[0] == train_ids(cfg_for(uneven, num_workers=1), epoch=1)[0]


def test_refuses_a_rank_without_a_batch(uneven):
    with pytest.raises(ValueError, match="data.batch_size=64"):
        build_train_loader(cfg_for(uneven, batch_size=64), rank=0, world_size=2, seed=0, epoch=0)
    with pytest.raises(ValueError, match="need 1 entries"):
        build_train_loader(cfg_for(uneven, mean=[0.5, 0.5, 0.5], std=[1.0] * 3), rank=0, world_size=1,
                           seed=0, epoch=0)


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize("world_size,num_workers", [(3, 2), (2, 0), (5, 1)])
def test_eval_exactly_once_with_equal_lengths(uneven, world_size, num_workers):
    cfg = cfg_for(uneven, num_workers=num_workers, batch_size=4)
    seen, lengths = [], set()
    for rank in range(world_size):
        loader = build_eval_loader(cfg, "test", rank=rank, world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader)
        lengths.add(len(loader))
        for images, labels, valid in batches:
            seen += [i for i, v in zip(ids_of(images), valid.tolist()) if v]
            assert torch.all(images[~valid] == 0) and labels.dtype == torch.int64
    assert len(lengths) == 1
    assert sorted(seen) == list(range(120, 148))  # test ids follow the 120 train ids


# ----------------------------------------------------------------------------- corruption


def test_corrupt_sample_is_skipped_counted_and_named_under_a_tolerance(tmp_path, caplog):
    root = make_dataset(tmp_path / "d", {"train": [10, 10], "test": [6]}, bad={3: b"\x89PNG\r\n\x1a\ngarbage", 22: b""})
    cfg = cfg_for(root, num_workers=0, batch_size=4, max_skipped_fraction=0.25)
    with caplog.at_level(logging.WARNING, logger="pce_dist.data"):
        batches, loader = train_ids(cfg)
    assert len(batches) == len(loader) == 5
    stats = loader.stats()
    assert stats["samples_skipped"] == 1 and stats["samples_padded"] == 1
    assert 3 not in {i for b in batches for i in b}
    assert "'s000003'" in caplog.text and "train-000000.tar" in caplog.text

    eval_loader = build_eval_loader(cfg, "test", rank=0, world_size=1)
    batches = list(eval_loader)
    valid = torch.cat([v for _, _, v in batches])
    assert valid.tolist() == [True] * 5 + [False] * 3  # 6 planned + 2 padding, one of 6 unreadable
    assert [i for x, _, v in batches for i, ok in zip(ids_of(x), v.tolist()) if ok] == [20, 21, 23, 24, 25]
    assert eval_loader.stats()["samples_skipped"] == 1

    with pytest.raises(CorruptDataError, match=r"'s000003' in shard .*train-000000.tar"):
        train_ids(cfg_for(root, num_workers=2, batch_size=4))  # the default: no tolerance


@pytest.mark.parametrize("verify", ["sha256", "off"])
def test_truncated_and_missing_shards_keep_step_counts_equal_under_a_tolerance(tmp_path, caplog, verify):
    root = make_dataset(tmp_path / "d", {"train": [12, 12, 12, 12]})
    shard = root / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])  # cut inside a member
    (root / "train-000003.tar").unlink()
    cfg = cfg_for(root, num_workers=0, batch_size=4, shuffle_buffer=0, max_skipped_fraction=0.9, verify=verify)
    total = Counter()
    with caplog.at_level(logging.WARNING, logger="pce_dist.data"):
        for rank in range(2):
            batches, loader = train_ids(cfg, rank=rank, world_size=2)
            assert len(batches) == len(loader) == 6
            total.update(loader.stats())
    assert total["shards_failed"] == 2
    if verify == "off":  # the readable head of the truncated shard is used
        assert 12 < total["samples_skipped"] < 24
    else:  # its size does not match the manifest: none of it is trusted
        assert total["samples_skipped"] == 24
    assert total["samples_padded"] == total["samples_skipped"]
    assert "train-000001.tar" in caplog.text and "train-000003.tar" in caplog.text

    with pytest.raises(CorruptDataError, match=r"shard .*train-00000[13].tar"):
        for rank in range(2):
            train_ids(cfg_for(root, num_workers=2, batch_size=4, verify=verify), rank=rank, world_size=2)


# ----------------------------------------------------------------------------- manifest


def test_manifest_errors_name_the_path(tmp_path, uneven):
    with pytest.raises(FileNotFoundError, match=r"nowhere/manifest.json.*make_shards.py"):
        read_manifest(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad/manifest.json: invalid manifest"):
        read_manifest(bad)
    (bad / "manifest.json").write_text(json.dumps({"format_version": 1, "splits": {}}))
    with pytest.raises(ValueError, match=r"missing field 'image_size'"):
        read_manifest(bad)
    m = read_manifest(uneven)
    assert m.num_samples("train") == 120 and m.image_size == (4, 4) and m.channels == 1
    with pytest.raises(ValueError, match=r"no split 'val'"):
        m.shards("val")
    with pytest.raises(ValueError, match="model.in_channels=3"):
        m.check_model(in_channels=3, image_size=4, num_classes=NUM_CLASSES)


@pytest.mark.parametrize("edit, culprit", [
    (lambda s: s.update(name="train-000000.tar; rm -rf ~"), r"shard name 'train-000000.tar; rm -rf ~'"),
    (lambda s: s.update(name="test-000000.tar"), r"split 'train' lists shard name 'test-000000.tar'"),
    (lambda s: s.update(name="train-0.tar"), r"shard name 'train-0.tar'"),
    (lambda s: s.update(num_samples=-1), r"train-000000.tar: num_samples must be an integer >= 0"),
    (lambda s: s.update(size="12"), r"train-000000.tar: size must be an integer"),
    (lambda s: s.update(sha256="abc"), r"train-000000.tar: sha256 must be 64 lowercase hex digits"),
])
def test_manifest_shard_entries_are_validated(tmp_path, edit, culprit):
    root = make_dataset(tmp_path / "d", {"train": [5, 5]})
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest["splits"]["train"]["shards"][0])
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"d/manifest.json: invalid manifest: .*{culprit}"):
        read_manifest(root)


def test_duplicate_shard_names_are_refused(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": [5, 5]})
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1] = manifest["splits"]["train"]["shards"][0]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="shard train-000000.tar is listed twice"):
        read_manifest(root)


def test_old_manifest_without_sizes_is_read_and_verified_by_digest(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": [12, 12], "test": [6]})
    manifest = json.loads((root / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["size"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    batches, _ = train_ids(cfg_for(root, num_workers=0, batch_size=4))  # data.verify=sha256, the default
    assert len(batches) == 6
    with pytest.raises(ValueError, match=r"d/manifest.json: data.verify=size needs a 'size' for every shard.*"
                                         r"data.verify=sha256 or data.verify=off"):
        train_ids(cfg_for(root, verify="size"))
    manifest["splits"]["test"]["shards"][0]["sha256"] = ""
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"data.verify=sha256 needs a 'sha256' for every shard.*test-000000.tar"):
        build_eval_loader(cfg_for(root), "test", rank=0, world_size=1)
    assert len(list(build_eval_loader(cfg_for(root, verify="off"), "test", rank=0, world_size=1))) == 1


def test_shard_digests_are_computed_once_per_rank_and_keyed_by_mtime(tmp_path):
    """Loader processes send the digests they compute to the rank's main process, so the
    processes of later epochs (forked from it) hash nothing again -- unless the file changed.

    Measured by the cache's one blind spot: a byte flipped in place with size and mtime kept
    passes in epoch 1 (cached digest), and fails once the mtime moves on.
    """
    from pce_dist import integrity

    root = make_dataset(tmp_path / "d", {"train": [12, 12, 12]})
    cfg = cfg_for(root, num_workers=2, batch_size=4)
    train_ids(cfg, epoch=0)
    cached = {key[0] for key in integrity._DIGESTS}
    assert {str(root / f"train-00000{i}.tar") for i in range(3)} <= cached  # computed in the workers
    shard = root / "train-000001.tar"
    before = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # tar padding: no reader parses it, only the digest sees it
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    train_ids(cfg, epoch=1)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns + 1))
    with pytest.raises(CorruptDataError, match=r"train-000001.tar: sha256"):
        train_ids(cfg, epoch=2)
