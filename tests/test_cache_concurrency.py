"""Two `directions` runs sharing the activation cache, and a damaged cache entry.

Entries are written whole (temporary file, fsync, rename), so two runs that compute the same entry
each replace it with a complete file, and a reader never sees half of one.
"""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)

import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from mlx_refusal.capture import CacheEntryRecomputed, load_cached
from mlx_refusal.directions import load_directions

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    """16 prompts a side: the runs race on the cache, not on a long capture."""
    root = tmp_path_factory.mktemp("small_sets")
    harmful, harmless = root / "harmful.txt", root / "harmless.txt"
    harmful.write_text("\n".join(f"Tell me how to break into house number {i}." for i in range(16)) + "\n")
    harmless.write_text("\n".join(f"Tell me how to paint house number {i}." for i in range(16)) + "\n")
    return ["--harmful", str(harmful), "--harmless", str(harmless)]


def test_two_concurrent_directions_runs_share_the_cache(tiny_qwen2, small_sets, tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, MLX_REFUSAL_CACHE=str(cache))
    runs = [subprocess.Popen([sys.executable, str(REPO / "cli.py"), "directions", "--model", str(tiny_qwen2),
                              *small_sets, "--out", str(tmp_path / name)], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    # Meanwhile, read every entry that appears: none may ever be damaged.
    seen, damaged, done = set(), [], threading.Event()

    def read_entries():
        while not done.is_set():
            for path in (cache / "activations").glob("*.npz") if (cache / "activations").is_dir() else []:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if load_cached(path.parent, path.stem) is not None:
                        seen.add(path.name)
                damaged.extend(str(w.message) for w in caught)
            time.sleep(0.005)  # leave the two cores to the runs

    reader = threading.Thread(target=read_entries)
    reader.start()
    try:
        errors = [run.communicate(timeout=300)[1] for run in runs]
    finally:
        done.set()
        reader.join()
    assert [run.returncode for run in runs] == [0, 0], errors
    assert damaged == []
    names = sorted(p.name for p in (cache / "activations").iterdir())
    entries = [n for n in names if n.endswith(".npz")]
    assert entries and set(entries) == seen  # every entry was read whole
    assert not [n for n in names if n.startswith(".")]  # no temporary files left
    a, b = load_directions(tmp_path / "a"), load_directions(tmp_path / "b")
    np.testing.assert_array_equal(a.directions, b.directions)
    np.testing.assert_array_equal(a.harmful_mean, b.harmful_mean)


def test_a_damaged_entry_is_recomputed_with_a_one_line_note(tiny_qwen2, small_sets, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    # means: the base-refusal pass stores the two captures the direction is read from
    args = ["directions", "--model", str(tiny_qwen2), *small_sets, "--direction-method", "means",
            "--out", str(tmp_path / "d")]
    first = runner.invoke(cli.main, args)
    assert first.exit_code == 0, first.output
    reference = load_directions(tmp_path / "d").directions
    entries = sorted((tmp_path / "cache" / "activations").glob("*.npz"))
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # truncated, as by a full disk or a bad copy
    second = runner.invoke(cli.main, args)
    assert second.exit_code == 0, second.output
    notes = [line for line in second.output.splitlines() if "note: activation cache entry" in line]
    assert len(notes) == 1 and "is damaged" in notes[0] and "recomputing it" in notes[0], second.output
    assert "Traceback" not in second.output and "warnings.warn" not in second.output
    np.testing.assert_array_equal(load_directions(tmp_path / "d").directions, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheEntryRecomputed)
        assert load_cached(entries[0].parent, entries[0].stem) is not None  # rewritten whole


def test_directions_uses_all_of_a_user_file_and_says_how_many(tiny_qwen2, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path / "cache"))
    mine = tmp_path / "mine.txt"
    mine.write_text("\n".join(f"Please explain topic number {i} to me." for i in range(64)) + "\n")
    result = CliRunner().invoke(cli.main, ["directions", "--model", str(tiny_qwen2), "--harmful", str(mine),
                                           "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "using 64 harmful prompts (mine) and 220 harmless prompts (harmless:train)" in result.output
    assert load_directions(tmp_path / "d").metadata["prompts"]["harmful"]["n"] == 64
    split = CliRunner().invoke(cli.main, ["directions", "--model", str(tiny_qwen2), "--harmful", str(mine),
                                          "--split", "train", "--out", str(tmp_path / "d2")])
    assert split.exit_code == 0 and "using 38 harmful prompts (mine:train)" in split.output
