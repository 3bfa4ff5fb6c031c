import hashlib
import json
import os
import struct

import pytest
import torch

from gutout import CacheSnapshotError, SaliencyCache, bytes_per_member, dataset_fingerprint


def filled_cache(K=3, N=10, hw=(7, 7)):
    fp = dataset_fingerprint([f"img{i}.jpg" for i in range(N)], list(range(N)))
    cache = SaliencyCache(K, N, hw, fingerprint=fp, layer="layer4", target="label")
    g = torch.Generator().manual_seed(0)
    for k in range(K):
        cache.update(k, torch.arange(N), torch.rand(N, *hw, generator=g))
    cache.publish(epoch=4)
    return cache


def test_update_is_invisible_until_publish():
    cache = SaliencyCache(2, 5, (3, 3))
    idx = torch.tensor([1, 3])
    cache.update(0, idx, torch.ones(2, 3, 3, dtype=torch.float64))  # any float dtype
    maps, valid = cache.lookup(0, idx)
    assert not valid.any() and float(maps.abs().max()) == 0
    cache.publish()
    maps, valid = cache.lookup(0, torch.arange(5))
    assert valid.tolist() == [False, True, False, True, False] and maps.dtype == torch.float16
    assert bool((maps[idx] == 1).all()) and cache.epoch == 0
    # Writes of the next epoch stay pending; readers keep epoch 0's maps.
    cache.update(0, idx, torch.full((2, 3, 3), 0.5))
    assert bool((cache.lookup(0, idx)[0] == 1).all())
    cache.publish()
    assert bool((cache.lookup(0, idx)[0] == 0.5).all()) and cache.epoch == 1


def test_partial_update_with_coverage_keeps_unseen_cells():
    cache = SaliencyCache(1, 2, (2, 2))
    cache.update(0, torch.tensor([0]), torch.ones(1, 2, 2))
    covered = torch.tensor([[[True, False], [False, False]]])
    cache.update(0, torch.tensor([0]), torch.zeros(1, 2, 2), covered=covered)
    cache.publish()
    assert cache.lookup(0, torch.tensor([0]))[0][0].tolist() == [[0, 1], [1, 1]]


def test_peer_rules():
    cache = filled_cache(K=4, N=10)
    g = torch.Generator().manual_seed(0)
    picks = cache.peer_members("others", 2, 4000, g)
    assert not bool((picks == 2).any()) and set(picks.tolist()) == {0, 1, 3}
    counts = torch.bincount(picks, minlength=4)[[0, 1, 3]].float()
    assert float(counts.min() / counts.max()) > 0.9  # uniform over the other members
    idx = torch.tensor([0, 5, 9])
    maps, valid = cache.lookup("self", idx, member=1)
    assert torch.equal(maps, cache.maps[1, idx]) and bool(valid.all())
    maps, _ = cache.lookup("max", idx)
    assert torch.equal(maps, cache.maps[:, idx].amax(0))
    maps, _ = cache.lookup(torch.tensor([0, 3, 1]), idx)
    assert torch.equal(maps, torch.stack([cache.maps[0, 0], cache.maps[3, 5], cache.maps[1, 9]]))
    with pytest.raises(ValueError, match="at least 2 members"):
        SaliencyCache(1, 3).lookup("others", torch.tensor([0]))
    with pytest.raises(ValueError, match="unknown peer rule 'peers'"):
        cache.lookup("peers", idx)


def test_max_ignores_invalid_members():
    cache = SaliencyCache(2, 2, (1, 1))
    cache.update(0, torch.tensor([0]), torch.full((1, 1, 1), 0.25))
    cache.publish()
    maps, valid = cache.lookup("max", torch.tensor([0, 1]))
    assert valid.tolist() == [True, False] and maps.flatten().tolist() == [0.25, 0.0]


def test_bad_updates_name_the_problem():
    cache = SaliencyCache(2, 5, (3, 3))
    with pytest.raises(IndexError, match="member 2 out of range"):
        cache.update(2, torch.tensor([0]), torch.zeros(1, 3, 3))
    with pytest.raises(IndexError, match=r"span \[0, 5\].*5 samples"):
        cache.update(0, torch.tensor([0, 5]), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match=r"expects \(1, 3, 3\)"):
        cache.update(0, torch.tensor([0]), torch.zeros(1, 7, 7))


def test_snapshot_roundtrip(tmp_path):
    cache = filled_cache()
    path = tmp_path / "cache.gsc"
    cache.save(path)
    assert os.listdir(tmp_path) == ["cache.gsc"]  # the temporary file is gone
    loaded = SaliencyCache.load(path, expect={"fingerprint": cache.fingerprint, "members": 3, "map_size": (7, 7)})
    assert torch.equal(loaded.maps, cache.maps) and torch.equal(loaded.valid, cache.valid)
    assert loaded.header() == cache.header() and loaded.epoch == 4
    # The pending buffer resumes from the snapshot too.
    loaded.publish(epoch=5)
    assert torch.equal(loaded.maps, cache.maps)


def test_snapshot_mismatch_names_both_sides(tmp_path):
    cache = filled_cache()
    path = tmp_path / "cache.gsc"
    cache.save(path)
    other = dataset_fingerprint([f"img{i}.jpg" for i in range(10)], [0] * 10)
    with pytest.raises(
        CacheSnapshotError, match=rf"fingerprint: snapshot has '{cache.fingerprint}', this run expects '{other}'"
    ):
        SaliencyCache.load(path, expect={"fingerprint": other})
    with pytest.raises(CacheSnapshotError, match="members: snapshot has 3, this run expects 4.*map_size"):
        SaliencyCache.load(path, expect={"members": 4, "map_size": (4, 4)})
    with pytest.raises(CacheSnapshotError, match="layer: snapshot has 'layer4', this run expects 'layer3'"):
        SaliencyCache.load(path, expect={"layer": "layer3"})


def test_truncated_corrupted_and_foreign_files_are_clear_errors(tmp_path):
    cache = filled_cache()
    path = tmp_path / "cache.gsc"
    cache.save(path)
    data = path.read_bytes()
    (tmp_path / "short").write_bytes(data[:-7])
    with pytest.raises(CacheSnapshotError, match="truncated"):
        SaliencyCache.load(tmp_path / "short")
    (tmp_path / "header-cut").write_bytes(data[:20])
    with pytest.raises(CacheSnapshotError, match="truncated or corrupted"):
        SaliencyCache.load(tmp_path / "header-cut")
    flipped = bytearray(data)
    flipped[-100] ^= 0x10
    (tmp_path / "flipped").write_bytes(bytes(flipped))
    with pytest.raises(CacheSnapshotError, match="corrupted"):
        SaliencyCache.load(tmp_path / "flipped")
    (tmp_path / "foreign").write_bytes(b"PK\x03\x04 not a snapshot")
    with pytest.raises(CacheSnapshotError, match="not a gutout cache snapshot"):
        SaliencyCache.load(tmp_path / "foreign")
    with pytest.raises(CacheSnapshotError, match="no cache snapshot at"):
        SaliencyCache.load(tmp_path / "missing")
    newer = data.replace(b'"format_version": 2', b'"format_version": 9')
    (tmp_path / "newer").write_bytes(newer)
    with pytest.raises(CacheSnapshotError, match="format version 9, this gutout reads versions 1, 2"):
        SaliencyCache.load(tmp_path / "newer")


def _rewrite_header(data: bytes, edit) -> bytes:
    """The snapshot with its JSON header replaced by edit(header), the payload untouched."""
    (length,) = struct.unpack("<I", data[8:12])
    header = json.loads(data[12 : 12 + length])
    raw = json.dumps(edit(header), sort_keys=True).encode()
    return data[:8] + struct.pack("<I", len(raw)) + raw + data[12 + length :]


def test_an_edited_header_is_caught_and_version_1_snapshots_still_load(tmp_path):
    cache = filled_cache()
    path = tmp_path / "cache.gsc"
    cache.save(path)
    data = path.read_bytes()
    cases = {
        "epoch": (lambda h: h | {"epoch": 9}, "corrupted \\(checksum mismatch\\)"),
        "layer": (lambda h: h | {"layer": "layer3"}, "corrupted \\(checksum mismatch\\)"),
        "samples": (lambda h: h | {"samples": h["samples"] + 2}, "payload_bytes .* which take"),
        "map_size": (lambda h: h | {"map_size": [4]}, "sizes missing or malformed"),
        "list": (lambda h: [h], "not a JSON object"),
    }
    for name, (edit, message) in cases.items():
        (tmp_path / name).write_bytes(_rewrite_header(data, edit))
        with pytest.raises(CacheSnapshotError, match=message):
            SaliencyCache.load(tmp_path / name)

    def as_version_1(header):  # what gutout wrote before the digest covered the header
        payload = data[-header["payload_bytes"] :]
        core = {k: v for k, v in header.items() if k != "sha256"}
        return core | {"format_version": 1, "payload_sha256": hashlib.sha256(payload).hexdigest()}

    (tmp_path / "v1").write_bytes(_rewrite_header(data, as_version_1))
    old = SaliencyCache.load(tmp_path / "v1")
    assert torch.equal(old.maps, cache.maps) and torch.equal(old.valid, cache.valid) and old.epoch == cache.epoch


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    from gutout.atomic import atomic_write_bytes

    fresh = tmp_path / "fresh"
    atomic_write_bytes(fresh, b"x")
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    assert fresh.stat().st_mode == plain.stat().st_mode  # not mkstemp's 0600
    os.chmod(fresh, 0o640)
    atomic_write_bytes(fresh, b"y")
    assert fresh.stat().st_mode & 0o777 == 0o640 and fresh.read_bytes() == b"y"  # a replaced file keeps its mode


def test_the_replaced_file_is_kept_only_once_its_successor_is_complete(tmp_path):
    from gutout.atomic import atomic_writer

    latest, previous = tmp_path / "latest", tmp_path / "previous"
    latest.write_bytes(b"2")
    previous.write_bytes(b"1")
    with atomic_writer(latest, keep_replaced_as=previous) as f:
        f.write(b"3")
        assert (latest.read_bytes(), previous.read_bytes()) == (b"2", b"1")  # a kill here leaves two checkpoints
    assert (latest.read_bytes(), previous.read_bytes()) == (b"3", b"2")
    with pytest.raises(RuntimeError), atomic_writer(latest, keep_replaced_as=previous) as f:
        f.write(b"4")
        raise RuntimeError("the write failed")
    assert (latest.read_bytes(), previous.read_bytes()) == (b"3", b"2")  # a failed write rotates nothing
    fresh = tmp_path / "fresh"
    with atomic_writer(fresh, keep_replaced_as=tmp_path / "none") as f:
        f.write(b"x")
    assert fresh.read_bytes() == b"x" and not (tmp_path / "none").exists()  # nothing replaced, nothing kept


def test_failed_write_leaves_the_previous_snapshot(tmp_path, monkeypatch):
    cache = filled_cache()
    path = tmp_path / "cache.gsc"
    cache.save(path)
    before = path.read_bytes()
    cache.update(0, torch.tensor([0]), torch.zeros(1, 7, 7))
    cache.publish()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["cache.gsc"]


def test_memory_figures():
    assert bytes_per_member(1_281_167, (7, 7)) == 125_554_366  # ImageNet at 7 x 7: ~125.6 MB
    cache = SaliencyCache(2, 100, (7, 7))
    assert cache.nbytes == 2 * (2 * 100 * 49 * 2 + 2 * 100)


def test_fingerprint_depends_on_order_names_and_labels():
    a = dataset_fingerprint(["a", "b"], [0, 1])
    assert a.startswith("n=2:") and a == dataset_fingerprint(["a", "b"], [0, 1])
    assert a != dataset_fingerprint(["b", "a"], [0, 1]) != dataset_fingerprint(["a", "b"], [1, 1])
    images = torch.zeros(3, 4, 4, dtype=torch.uint8)
    assert dataset_fingerprint(images, [0, 1, 2]) != dataset_fingerprint(images + 1, [0, 1, 2])
    with pytest.raises(ValueError, match="2 samples but 3 labels"):
        dataset_fingerprint(["a", "b"], [0, 1, 2])
