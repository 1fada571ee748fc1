"""One decoded-image cache per machine: a /dev/shm segment filled by the local processes together, validated before it
is read, gone from /dev/shm once mapped, and a per-process cache where there is no shared memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import write_images
from multiprocess import run_on_two_processes
from simclr_cli.engine import distributed, pipeline, sharedcache
from simclr_cli.engine.distributed import Node, World
from simclr_cli.engine.images import ImageFiles

BUDGET = 1 << 24


class CountedFiles(ImageFiles):
    """ImageFiles that remembers which images it decoded."""

    def __init__(self, paths) -> None:
        super().__init__(paths)
        self.decoded: list[int] = []

    def __getitem__(self, index):
        self.decoded.append(index)
        return super().__getitem__(index)


def _folder(root: Path) -> list[Path]:
    paths = write_images(root / "a", 7, size=12) + write_images(root / "b", 6, size=20, seed=1, suffix=".jpg")
    return sorted(paths)


def _sharing(shm: Path, *, node: Node = Node(index=0, local_rank=0, local_size=1), key: str = "run|data") -> pipeline.Sharing:
    return pipeline.Sharing(key=key, node=node, device=torch.device("cpu"), shm_dir=shm)


def _mapped_segments() -> set[int]:
    """Inodes of the segments this process maps (their names are gone from /dev/shm by then)."""
    with open("/proc/self/maps", encoding="utf-8") as handle:
        return {int(line.split()[4]) for line in handle if sharedcache.PREFIX in line}


def _two_process_worker(world: World, folder: str, shm: str, nodes: int) -> None:
    # torchrun's variables for 2 processes on one node, or 1 process on each of 2 nodes
    os.environ.update(LOCAL_WORLD_SIZE=str(2 // nodes), GROUP_RANK=str(world.rank if nodes == 2 else 0))
    node = distributed.node(world)
    assert node == (Node(0, world.rank, 2) if nodes == 1 else Node(world.rank, 0, 1))
    paths = _folder(Path(folder))
    images = CountedFiles(paths)
    cache = pipeline.build_cache(pipeline.PixelDataset(images, max_side=None), budget=BUDGET, workers=0,
                                 sharing=_sharing(Path(shm), node=node))
    assert cache is not None and cache.complete and cache.segment is not None
    distributed.barrier()  # each node's first process has unlinked its segment, once every process had mapped it
    assert list(Path(shm).iterdir()) == []
    # which images each process decoded: its node's share, each image once per node
    counts = torch.zeros(len(paths), dtype=torch.int64)
    counts[images.decoded] += 1
    mine = distributed.shard(len(paths), World(rank=node.local_rank, world_size=node.local_size))
    assert sorted(images.decoded) == list(mine)
    dist.all_reduce(counts)
    assert counts.tolist() == [nodes] * len(paths)
    # one segment per node: the same file mapped by both processes of a node, two files for two nodes
    (inode,) = _mapped_segments()
    inodes = torch.tensor([inode, -inode])
    dist.all_reduce(inodes, op=dist.ReduceOp.MAX)
    assert (inodes[0] == -inodes[1]) == (nodes == 1)
    # the same pixels as one process's own cache
    alone = pipeline.build_cache(pipeline.PixelDataset(ImageFiles(paths), max_side=None), budget=BUDGET, workers=0)
    assert cache.nbytes == alone.nbytes
    for i in range(len(paths)):
        assert torch.equal(cache.get(i), alone.get(i)), i


@pytest.mark.parametrize("nodes", [1, 2])
def test_two_processes_fill_one_cache_per_node_each_decoding_its_share(tmp_path, nodes):
    _folder(tmp_path / "img")
    (tmp_path / "shm").mkdir()
    run_on_two_processes(_two_process_worker, str(tmp_path / "img"), str(tmp_path / "shm"), nodes, timeout_s=90)


def test_one_process_reads_the_same_pixels_from_a_segment_that_is_gone_from_dev_shm(tmp_path, caplog):
    paths = _folder(tmp_path / "img")
    (tmp_path / "shm").mkdir()
    dataset = pipeline.PixelDataset(ImageFiles(paths), max_side=8)
    with caplog.at_level("INFO", logger="simclr"):
        cache = pipeline.build_cache(dataset, budget=BUDGET, workers=1, sharing=_sharing(tmp_path / "shm"))
    assert list((tmp_path / "shm").iterdir()) == [] and len(_mapped_segments()) >= 1
    assert "cached 13 images in " in caplog.text
    assert "shared by this machine's 1 process(es)" in caplog.text
    for i in range(len(paths)):
        assert torch.equal(cache.get(i), pipeline.to_pixels(dataset.images[i], max_side=8))
    dataset.cache = cache
    for path in paths:
        path.unlink()  # only the cache can answer now
    assert torch.equal(dataset[5][0], cache.get(5))


def _killed_while_filling(shm: Path, key: str, *, node: int = 0) -> Path:
    """A segment as a run killed (kill -9) while filling it leaves it: incomplete, its creator gone."""
    path = sharedcache.segment_path(key, node=node, shm_dir=shm)
    code = ("import os, sys; from pathlib import Path; from simclr_cli.engine import sharedcache; "
            "sharedcache.create(Path(sys.argv[1]), key=sys.argv[2], count=13, slots=1, slot_bytes=4096); "
            "os.kill(os.getpid(), 9)")
    result = subprocess.run([sys.executable, "-c", code, str(path), key], env={**os.environ, "PYTHONPATH": os.getcwd()},
                            check=False, timeout=120)
    assert result.returncode == -9 and path.exists()
    return path


def test_a_segment_left_by_a_killed_run_is_removed_and_never_read(tmp_path, caplog):
    paths = _folder(tmp_path / "img")
    shm = tmp_path / "shm"
    shm.mkdir()
    ours = _killed_while_filling(shm, "run|data")
    other = _killed_while_filling(shm, "another run")
    with pytest.raises(sharedcache.StaleSegment, match="never completed"):
        sharedcache.open_segment(ours, key="run|data", count=13)
    with caplog.at_level("INFO", logger="simclr"):
        cache = pipeline.build_cache(pipeline.PixelDataset(ImageFiles(paths), max_side=None), budget=BUDGET, workers=0,
                                     sharing=_sharing(shm))
    assert f"removed {ours}, left in shared memory by a stopped run" in caplog.text
    assert f"removed {other}" in caplog.text and list(shm.iterdir()) == []
    for i in range(len(paths)):
        assert torch.equal(cache.get(i), pipeline.to_pixels(ImageFiles(paths)[i], max_side=None))


def test_a_segment_is_read_only_when_complete_and_made_for_this_run(tmp_path):
    path = tmp_path / "segment"
    sharedcache.create(path, key="run", count=2, slots=1, slot_bytes=64)
    with pytest.raises(sharedcache.StaleSegment, match="never completed"):
        sharedcache.open_segment(path, key="run", count=2)
    writer = sharedcache.Writer(path, key="run", slot=0, share=range(2))
    assert writer.put(1, torch.full((3, 2, 2), 7, dtype=torch.uint8))
    assert not writer.put(0, torch.zeros((3, 5, 5), dtype=torch.uint8)) and writer.full == "budget"  # 75 > 64 - 12
    writer.close()
    sharedcache.seal(path, key="run")
    with pytest.raises(sharedcache.StaleSegment, match="another run's or another dataset's"):
        sharedcache.open_segment(path, key="other run", count=2)
    with pytest.raises(sharedcache.StaleSegment, match="another run's or another dataset's"):
        sharedcache.open_segment(path, key="run", count=3)
    mapped = sharedcache.open_segment(path, key="run", count=2)
    assert mapped.index.tolist() == [[-1, -1, -1], [0, 2, 2]]
    cache = pipeline.PixelCache.shared(mapped)
    assert cache.cached == 1 and 1 in cache and 0 not in cache and (cache.get(1) == 7).all()
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 1)
    with pytest.raises(sharedcache.StaleSegment, match="its header says"):
        sharedcache.open_segment(path, key="run", count=2)
    path.write_bytes(b"x" * 4096)
    with pytest.raises(sharedcache.StaleSegment, match="no valid header"):
        sharedcache.open_segment(path, key="run", count=2)


def test_sweep_keeps_the_segments_of_live_processes(tmp_path):
    live = sharedcache.segment_path("live", node=0, shm_dir=tmp_path)
    sharedcache.create(live, key="live", count=1, slots=1, slot_bytes=8)  # this process made it
    dead = _killed_while_filling(tmp_path, "dead")
    (tmp_path / f"{sharedcache.PREFIX}not-a-segment").write_bytes(b"hello")
    sharedcache.sweep(tmp_path)
    assert live.exists() and not dead.exists() and (tmp_path / f"{sharedcache.PREFIX}not-a-segment").exists()


def test_the_cache_stops_at_the_budget_in_shared_memory_too(tmp_path, monkeypatch, caplog):
    write_images(tmp_path / "img", 1, size=8)  # img_000: the only image the estimate looks at
    write_images(tmp_path / "img", 4, size=12, suffix=".bmp")[0].unlink()  # img_001..img_003.bmp, larger
    dataset = pipeline.PixelDataset(ImageFiles(sorted((tmp_path / "img").iterdir())), max_side=None)
    monkeypatch.setattr(pipeline, "SAMPLE_FOR_ESTIMATE", 1)  # estimate 4 x 192 bytes: too low
    (tmp_path / "shm").mkdir()
    with caplog.at_level("INFO", logger="simclr"):
        cache = pipeline.build_cache(dataset, budget=800, workers=0, sharing=_sharing(tmp_path / "shm"))
    assert (cache.offsets >= 0).tolist() == [True, True, False, False]  # 192 + 432 fit, a third image would not
    assert "outgrew the 0.0 GB budget after 2 of 4 images; the rest are decoded every epoch" in caplog.text
    assert torch.equal(dataset[3][0], pipeline.to_pixels(dataset.images[3], max_side=None))


def test_without_shared_memory_each_process_keeps_its_own_cache(tmp_path, monkeypatch, caplog):
    paths = _folder(tmp_path / "img")
    dataset = pipeline.PixelDataset(ImageFiles(paths), max_side=None)
    with caplog.at_level("INFO", logger="simclr"):
        cache = pipeline.build_cache(dataset, budget=BUDGET, workers=0, sharing=_sharing(tmp_path / "no-shm"))
    notes = [r.getMessage() for r in caplog.records if "no shared memory" in r.getMessage()]
    assert notes == [f"no shared memory at {tmp_path / 'no-shm'}: each of this machine's 1 process(es) decodes and "
                     "caches its own copy of the images"]
    assert cache.segment is None and cache.complete
    (tmp_path / "shm").mkdir()
    monkeypatch.setattr(sharedcache, "free_bytes", lambda shm_dir: 1000)  # e.g. a container's small /dev/shm
    caplog.clear()
    with caplog.at_level("INFO", logger="simclr"):
        small = pipeline.build_cache(dataset, budget=BUDGET, workers=0, sharing=_sharing(tmp_path / "shm"))
    assert "has 1.0 KB free, less than the decoded images need" in caplog.text and "--shm-size" in caplog.text
    assert small.segment is None and list((tmp_path / "shm").iterdir()) == []
    for i in range(len(paths)):
        assert torch.equal(small.get(i), cache.get(i))


def test_node_of_a_world():
    world = World(rank=5, world_size=8, local_rank=1)
    assert distributed.node(world, {"LOCAL_WORLD_SIZE": "4"}) == Node(index=1, local_rank=1, local_size=4)
    assert distributed.node(world, {"LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "3"}).index == 3
    assert distributed.node(world, {"LOCAL_WORLD_SIZE": "4", "SLURM_NODEID": "2"}).index == 2
    # a launcher that does not say how many processes share the machine: each process is a node of its own
    assert distributed.node(world, {}) == Node(index=5, local_rank=0, local_size=1)
    assert distributed.node(World(), {"LOCAL_WORLD_SIZE": "4"}) == Node(index=0, local_rank=0, local_size=1)
