"""Two local ranks (`mlx.launch -n 2 --backend ring`) give what one process gives: directions
(data and tensor parallel), evaluation verdicts and answers, first-token log-probs, and
tensor-parallel ablation and steering edits."""
import mlx_refusal  # noqa: F401

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import distributed_worker as worker
from conftest import REPO
from mlx_refusal import distributed
from mlx_refusal.loading import load


def launch(*args, ranks: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """`mlx.launch -n RANKS --backend ring` with this interpreter, importing this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    launcher = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]
    proc = subprocess.run([*launcher, "-n", str(ranks), "--backend",
                           "ring", "--python", sys.executable, *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"mlx.launch {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


# --------------------------------------------------------------------------- one process: the plumbing


@given(st.lists(st.integers(), max_size=40), st.integers(1, 5))
def test_round_robin_shares_gather_back_in_prompt_order(items, n):
    class Group:
        def __init__(self, r):
            self.r = r

        def rank(self):
            return self.r

        def size(self):
            return n

    parts = [distributed.share(items, Group(r)) for r in range(n)]
    assert sorted(sum(parts, [])) == sorted(items)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert distributed._interleave(parts, len(items)) == items


def test_one_process_is_a_pass_through(tiny_qwen2):
    model, _, _ = load(str(tiny_qwen2))
    assert distributed.size() == 1 and distributed.is_writer()
    assert distributed.data_group(model) is None and distributed.describe(model) is None
    assert distributed.map_prompts(model, lambda ps: [p * 2 for p in ps], [1, 2, 3], gather="json") == [2, 4, 6]
    assert distributed.everyone(True, distributed.world()) and not distributed.everyone(False, distributed.world())


# --------------------------------------------------------------------------- two ranks vs one process


@pytest.fixture(scope="module")
def tiny_q4(tiny_qwen2, tmp_path_factory):
    from test_stream_edit import quantized_folder

    return quantized_folder(tiny_qwen2, tmp_path_factory.mktemp("tiny_q4") / "q4")


@pytest.fixture(scope="module")
def two_ranks(tiny_qwen2, tiny_q4, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    launch(Path(worker.__file__), tiny_qwen2, out, tiny_q4)
    assert json.loads((out / "ranks.json").read_text()) == 2
    return out


@pytest.fixture(scope="module")
def one_process(tiny_qwen2):
    model, tok, _ = load(str(tiny_qwen2))
    return worker.single_process_results(model, tok)


def cosines(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b) if np.linalg.norm(y) > 0]


@pytest.mark.parametrize("mode", ["data", "tensor"])
def test_directions_equal_a_single_process_run(two_ranks, one_process, mode):
    got = np.load(two_ranks / f"{mode}.npz")
    ref = one_process["directions"]
    assert [i for i, r in enumerate(got["directions"]) if not r.any()] == [i for i, r in enumerate(ref) if not r.any()]
    assert min(cosines(got["directions"], ref)) >= 0.99999
    np.testing.assert_allclose(got["mean_norm"], one_process["mean_norm"], rtol=1e-5)


@pytest.mark.parametrize("mode", ["data", "tensor"])
def test_evaluation_verdicts_and_answers_are_identical(two_ranks, one_process, mode):
    got = json.loads((two_ranks / f"{mode}_records.json").read_text())
    assert got == [list(r) for r in one_process["records"]]
    got_lp = np.load(two_ranks / f"{mode}.npz")
    np.testing.assert_allclose(got_lp["logprobs"], one_process["logprobs"], atol=1e-5)
    np.testing.assert_allclose(got_lp["gen_logprobs"], one_process["logprobs"], atol=1e-5)


@pytest.mark.parametrize("how", ["ablate", "steer", "ablate_q4"])
def test_tensor_parallel_edit_equals_the_unsharded_edit(two_ranks, tiny_qwen2, tiny_q4, how):
    """Orthogonalising each rank's column slice of o_proj/down_proj is the whole edit (quantized
    slices too: groups never straddle ranks); the steering bias sits whole on every rank
    (ShardedToAllLinear adds it after the all_sum)."""
    model, _, _ = load(str(tiny_q4 if how == "ablate_q4" else tiny_qwen2))
    weights, logits = worker.edited(model, how.removesuffix("_q4"))
    got = np.load(two_ranks / f"{how}.npz")
    assert set(got.files) - {"__logits__"} == set(weights)
    for name, value in weights.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(got["__logits__"], logits, atol=1e-5)
    if how == "steer":
        bias = f"model.layers.{worker.STEER_LAYER - 1}.mlp.down_proj.bias"
        assert np.linalg.norm(got[bias]) == pytest.approx(3.0, rel=1e-5)  # the full vector, not 1/N of it


def test_cli_directions_on_two_ranks(tiny_qwen2, tmp_path):
    """`mlx.launch -n 2 ... cli.py directions`: rank 0 alone writes, provenance says so, and the
    directions are the single-process ones."""
    files = {}
    for name, prompts in (("harmful", worker.HARMFUL), ("harmless", worker.HARMLESS)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(prompts) + "\n")
    launch(REPO / "cli.py", "directions", "--model", tiny_qwen2, "--out", tmp_path / "two", "--no-cache",
           "--harmful", files["harmful"], "--harmless", files["harmless"], "--split", "all")
    prov = json.loads((tmp_path / "two" / "provenance.json").read_text())
    assert prov["distributed"]["ranks"] == 2 and prov["distributed"]["mode"] == "data"
    from mlx_refusal.directions import load_directions
    from mlx_refusal.prompts import resolve_prompts
    from mlx_refusal.workflow import compute_directions

    model, tok, info = load(str(tiny_qwen2))
    ref, _ = compute_directions(model, tok, info, resolve_prompts(str(files["harmful"])),
                                resolve_prompts(str(files["harmless"])), use_cache=False)
    got = load_directions(tmp_path / "two")
    assert got.degenerate == ref.degenerate
    assert min(cosines(got.directions, ref.directions)) >= 0.99999


def test_cli_tensor_parallel_ablate_saves_the_unsharded_edit(tiny_qwen2, tmp_path):
    """`mlx.launch -n 2 ... cli.py ablate --tensor-parallel`: evaluated on the sharded model, saved
    by rank 0 (rewritten from the source): the folder one process writes, tensor for tensor."""
    from test_stream_edit import assert_bit_identical

    from conftest import run_cli
    from mlx_refusal.directions import Directions, save_directions

    rows = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
    from mlx_refusal.loading import weight_fingerprint
    meta = {"model": {"spec": str(tiny_qwen2), "fingerprint": weight_fingerprint(tiny_qwen2)}}
    save_directions(Directions(rows, rows, 0 * rows, np.ones(5, np.float32), [], meta), tmp_path / "d")
    common = ["ablate", "--model", tiny_qwen2, "--directions", tmp_path / "d", "--layer", "2", "--max-memory", "1TB"]
    launch(REPO / "cli.py", *common, "--tensor-parallel", "--eval-limit", "2", "--max-tokens", "4",
           "--out", tmp_path / "two")
    run_cli(*common, "--eval-limit", "0", "--out", tmp_path / "one")
    assert json.loads((tmp_path / "two" / "refusal_edit.json").read_text())["distributed"]["mode"] == "tensor"
    assert_bit_identical(tmp_path / "two", tmp_path / "one")


def test_a_rank_without_prompts_gets_a_one_line_error_where_rows_are_gathered():
    from mlx_refusal.errors import UserError

    class Group:
        def __init__(self, rank, size):
            self._rank, self._size = rank, size

        def rank(self):
            return self._rank

        def size(self):
            return self._size

    assert distributed.share_of_rows(["a", "b", "c"], Group(1, 2)) == ["b"]
    with pytest.raises(UserError, match="^2 prompts cannot be split across 3 ranks; use fewer ranks or more prompts$"):
        distributed.share_of_rows(["a", "b"], Group(2, 3))
    assert distributed.share(["a", "b"], Group(2, 3)) == []  # plain `share` leaves that rank idle
