"""badfiles: the reports of several processes merged into one, each entry once, in rank order."""

from __future__ import annotations

import json
from pathlib import Path

from simclr_cli.engine import badfiles
from simclr_cli.engine.rundir import RunDir


def _lines(*entries: tuple[str, str]) -> str:
    return "".join(json.dumps({"path": path, "reason": "not an image", "kind": kind}) + "\n" for kind, path in entries)


def test_merge_makes_one_report_in_rank_order_each_entry_once(tmp_path):
    run = RunDir(tmp_path)
    run.bad_files(0).write_text(_lines(("file", "/d/a.png"), ("folder", "/d/locked")))
    run.bad_files(2).write_text(_lines(("file", "/d/c.png"), ("folder", "/d/locked")))
    run.bad_files(1).write_text(_lines(("file", "/d/b.png"), ("file", "/d/a.png")) + '{"path": "/d/cut')  # crashed mid-line
    run.bad_files(10).write_text(_lines(("file", "/d/k.png")))
    parts = run.other_ranks_bad_files()
    assert [p.name for p in parts] == ["bad_files.rank1.jsonl", "bad_files.rank2.jsonl", "bad_files.rank10.jsonl"]

    assert badfiles.merge(run.bad_files(), parts) == (4, 1)
    merged = [(e["kind"], e["path"]) for e in map(json.loads, run.bad_files().read_text().splitlines())]
    assert merged == [("file", "/d/a.png"), ("folder", "/d/locked"), ("file", "/d/b.png"), ("file", "/d/c.png"), ("file", "/d/k.png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_files.jsonl"]
    assert badfiles.summary(files=4, folders=1, report=run.bad_files()) == (
        f"4 bad file(s) skipped, 1 folder(s) skipped; listed in {run.bad_files()}")


def test_merge_of_a_run_without_bad_files_writes_nothing(tmp_path):
    assert badfiles.merge(tmp_path / "bad_files.jsonl", []) == (0, 0)
    assert list(tmp_path.iterdir()) == []


def test_merge_drops_what_a_resumed_process_listed_again(tmp_path):
    report = Path(tmp_path / "bad_files.jsonl")
    report.write_text(_lines(("file", "/d/a.png"), ("file", "/d/a.png")))
    assert badfiles.merge(report, []) == (1, 0)
    assert report.read_text() == _lines(("file", "/d/a.png"))
