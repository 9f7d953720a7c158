"""Token Recycling's warm start: the base matrix (shipped or built once), what a model
learned saved at the end of every request (cancelled ones too) and loaded by the next
process, and the modes that keep timings reproducible (base) or start empty (cold)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tokenlean.lm import LM
from tokenlean.spec_decode import warm_start
from tokenlean.zoo import zoo_path

PROMPT = "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"


def fresh(lm: LM) -> LM:
    """A new process, as far as drafters go."""
    return LM(lm.name, lm.folder, lm.model, lm.tokenizer)


class ScriptedModel:
    """A 'model' over 6 tokens whose next-token distribution depends only on the position
    (so the test knows the exact sums build_matrix must find)."""

    class config:
        vocab_size = 6
        max_position_embeddings = 4  # windows of 4 tokens

    device = torch.device("cpu")

    def __call__(self, ids):
        T = ids.shape[1]
        probs = torch.full((T, 6), 0.01)
        for t in range(T):
            probs[t, (ids[0, t] + 1 + t % 2) % 6] = 0.6  # even positions: +1, odd: +2
            probs[t, (ids[0, t] + 3) % 6] = 0.3
        return probs.log()[None]


def test_build_matrix_ranks_by_summed_probability():
    # token 0 occurs at positions 0, 2 (next: 1 at 0.6) and 1 (next: 2 at 0.6); 3 at 0.3 each
    matrix = warm_start.build_matrix(ScriptedModel(), [0, 0, 0, 5], k=3, progress=False)
    assert matrix.shape == (6, 3) and matrix.dtype == np.int32
    assert matrix[0].tolist()[:2] == [1, 3]  # 1.2 for token 1, 0.9 for token 3, 0.6 for 2
    assert matrix[0, 2] == 2
    assert matrix[5, 0] == 1 and matrix[5, 1] == 2  # position 3 (odd): 5 + 2 = 1, then 5 + 3 = 2
    assert (matrix[1:5] == -1).all()  # tokens that never occur have no candidates


def test_first_use_builds_the_base_matrix_once_and_keeps_it(tiny_lm, monkeypatch):
    path = warm_start.base_path(tiny_lm)
    path.unlink(missing_ok=True)
    drafter = fresh(tiny_lm).drafter("recycling", {"warm": "base"})
    assert path.is_file()  # built on first use, kept in the state directory
    assert (drafter.matrix >= 0).any(axis=1).sum() > 20  # rows filled before any request
    assert np.array_equal(drafter.matrix, np.load(path))

    def no_build(*args, **kwargs):
        raise AssertionError("the base matrix was rebuilt")

    monkeypatch.setattr(warm_start, "build_matrix", no_build)
    again = fresh(tiny_lm).drafter("recycling", {"warm": "base"})
    assert np.array_equal(again.matrix, drafter.matrix)


def test_warm_base_never_saves_and_cold_starts_empty(tiny_lm):
    learned = warm_start.learned_path(tiny_lm)
    learned.unlink(missing_ok=True)
    lm = fresh(tiny_lm)
    lm.generate(PROMPT, 12, method="recycling", method_args={"warm": "base"}, stop_token_ids=[])
    assert not learned.exists()
    cold = fresh(tiny_lm).drafter("recycling", {"warm": "cold"})
    assert (cold.matrix == -1).all()


def test_what_was_learned_is_saved_on_cancel_and_loaded_by_the_next_process(tiny_lm):
    learned = warm_start.learned_path(tiny_lm)
    learned.unlink(missing_ok=True)
    lm = fresh(tiny_lm)
    stream = lm.stream(PROMPT, 40, method="recycling", stop_token_ids=[])
    deltas = iter(stream)
    for _ in range(6):  # a few verification steps
        next(deltas)
    deltas.close()  # the client went away mid-generation
    assert stream.result is None  # it did not run to the end
    assert learned.is_file()  # saved anyway
    saved = np.load(learned)
    assert np.array_equal(saved, lm.drafter("recycling").matrix)
    assert not np.array_equal(saved, warm_start.base_matrix(tiny_lm, 8))  # it learned
    assert np.array_equal(fresh(tiny_lm).drafter("recycling").matrix, saved)
    # hybrid shares the same learned state
    assert np.array_equal(fresh(tiny_lm).drafter("hybrid").recycling.matrix, saved)


def test_saves_are_spaced_and_the_owed_one_is_flushed(tiny_lm, monkeypatch):
    """The first request's end saves at once; ends within SAVE_EVERY_S of a save put theirs
    off (one exit hook), and the next end after the interval saves what they learned."""
    from tokenlean.spec_decode.drafters import recycling

    clock, writes, hooks = [100.0], [], []
    monkeypatch.setattr(recycling.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(recycling.atexit, "register", hooks.append)
    monkeypatch.setattr(warm_start, "save_atomic", lambda path, m: writes.append(m.copy()))
    drafter = fresh(tiny_lm).drafter("recycling")
    drafter.end()
    assert len(writes) == 1 and not drafter.owed
    drafter.matrix[0, 0] = 3
    clock[0] += 1
    drafter.end()
    drafter.end()
    assert len(writes) == 1 and drafter.owed and hooks == [drafter.flush_owed]  # put off
    clock[0] += recycling.SAVE_EVERY_S
    drafter.end()
    assert len(writes) == 2 and writes[-1][0, 0] == 3 and not drafter.owed
    drafter.matrix[0, 0] = 4
    clock[0] += 1
    drafter.end()
    assert len(hooks) == 1  # one hook for the drafter's life, however many put-off saves
    hooks[0]()  # the interpreter exits: the owed save is written
    assert len(writes) == 3 and writes[-1][0, 0] == 4
    hooks[0]()  # nothing owed: nothing written
    assert len(writes) == 3


def test_matrix_path_overrides_the_warm_start(tiny_lm, tmp_path):
    path = tmp_path / "mine.npy"
    mine = np.full_like(warm_start.base_matrix(tiny_lm, 8), 7)
    np.save(path, mine)
    drafter = fresh(tiny_lm).drafter("recycling", {"matrix_path": str(path)})
    assert np.array_equal(drafter.matrix, mine)


def test_a_state_file_is_written_whole(tmp_path):
    path = tmp_path / "sub" / "m.npy"
    warm_start.save_atomic(path, np.arange(6, dtype=np.int32).reshape(3, 2))
    assert np.load(path).tolist() == [[0, 1], [2, 3], [4, 5]]
    assert [p.name for p in path.parent.iterdir()] == ["m.npy"]  # no temporary left behind


@pytest.mark.skipif(zoo_path("tl-code") is None or
                    not (zoo_path("tl-code") / warm_start.SHIPPED_NAME).is_file(),
                    reason="tl-code's shipped matrix is not present")
def test_tl_code_ships_its_matrix():
    from tokenlean.lm import load

    lm = load("tl-code")
    shipped = np.load(zoo_path("tl-code") / warm_start.SHIPPED_NAME)
    assert shipped.shape == (lm.model.config.vocab_size, 8)
    assert (shipped[:, 0] >= 0).mean() > 0.5  # most of the vocabulary has candidates
    drafter = lm.drafter("recycling", {"warm": "base"})
    assert np.array_equal(drafter.matrix, shipped)


def test_zoo_matrix_command_builds_the_matrix(tiny_model_dir, capsys, monkeypatch, tmp_path):
    """`tokenlean zoo matrix NAME`: a model outside the zoo gets its built matrix in the
    state directory, where the next process starts from it."""
    from cli_run import assert_user_error, run_cli

    monkeypatch.setenv("TOKENLEAN_STATE", str(tmp_path))
    rc, out, err = run_cli(capsys, "zoo", "matrix", tiny_model_dir, "--tokens", 300, "--k", 4)
    assert rc == 0, err
    path = Path(out.strip())
    assert path.is_file() and path.is_relative_to(tmp_path)
    matrix = np.load(path)
    assert matrix.shape[1] == 4 and (matrix >= 0).any()
    from tokenlean.lm import load

    assert path == warm_start.base_path(load(str(tiny_model_dir), device="cpu", dtype="fp32"))
    assert_user_error(*run_cli(capsys, "zoo", "matrix", tmp_path / "nowhere"), "nowhere")
