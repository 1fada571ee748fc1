"""Nearest-neighbour maths: weighted kNN votes (Wu et al. 2018) against hand-computed votes and a naive loop;
several k in one pass; chunking; top-k accuracy; cosine retrieval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from simclr_cli.engine import neighbours
from simclr_cli.engine.errors import ConfigError



def at(*degrees: float, radius: float = 1.0) -> torch.Tensor:
    """2-D points at these angles; the radius varies nothing once features are L2-normalised."""
    return torch.tensor([[radius * math.cos(math.radians(d)), radius * math.sin(math.radians(d))] for d in degrees])


def cos_deg(d: float) -> float:
    return math.cos(math.radians(d))


def normalised(scores: torch.Tensor) -> torch.Tensor:
    """Scores are votes up to a per-query factor: compare each row's share of the votes."""
    return scores / scores.sum(dim=1, keepdim=True)


# Training bank: angle -> class. Radii differ on purpose (cosine similarity ignores them).
BANK_ANGLES = (0.0, 30.0, 90.0, 60.0, 180.0)
BANK_LABELS = (0, 0, 1, 1, 2)


def test_votes_match_a_hand_computed_example():
    bank = torch.cat([at(0, radius=2.0), at(30), at(90, radius=0.5), at(60, radius=3.0), at(180)])
    queries = at(40, 170)
    scores = neighbours.knn_predict(bank, list(BANK_LABELS), queries, k=[1, 3, 5], temperature=0.1, num_classes=3)
    T = 0.1
    # Query at 40 deg: similarities 30 deg -> cos 10 (c0), 60 -> cos 20 (c1), 0 -> cos 40 (c0), 90 -> cos 50 (c1),
    # 180 -> cos 140 (c2), in that order.
    q40 = {
        1: [math.exp(cos_deg(10) / T), 0.0, 0.0],
        3: [math.exp(cos_deg(10) / T) + math.exp(cos_deg(40) / T), math.exp(cos_deg(20) / T), 0.0],
        5: [
            math.exp(cos_deg(10) / T) + math.exp(cos_deg(40) / T),
            math.exp(cos_deg(20) / T) + math.exp(cos_deg(50) / T),
            math.exp(cos_deg(140) / T),
        ],
    }
    # Query at 170 deg: 180 -> cos 10 (c2), 90 -> cos 80 (c1), 60 -> cos 110 (c1), 30 -> cos 140 (c0), 0 -> cos 170 (c0).
    q170 = {
        1: [0.0, 0.0, math.exp(cos_deg(10) / T)],
        3: [0.0, math.exp(cos_deg(80) / T) + math.exp(cos_deg(110) / T), math.exp(cos_deg(10) / T)],
        5: [
            math.exp(cos_deg(140) / T) + math.exp(cos_deg(170) / T),
            math.exp(cos_deg(80) / T) + math.exp(cos_deg(110) / T),
            math.exp(cos_deg(10) / T),
        ],
    }
    for k in (1, 3, 5):
        expected = torch.tensor([q40[k], q170[k]], dtype=torch.float64)
        assert scores[k].shape == (2, 3)
        torch.testing.assert_close(normalised(scores[k].double()), normalised(expected), rtol=1e-5, atol=1e-7)
        # The per-query factor is exp(-max sim / T): the nearest neighbour votes exactly 1.
        raw = scores[k].double() * math.exp(cos_deg(10) / T)
        torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-6)
    assert scores[3].argmax(dim=1).tolist() == [0, 2]


def test_temperature_decides_between_one_close_and_two_farther_neighbours():
    bank = at(0, 50, -50)
    labels = [0, 1, 1]
    query = at(5)
    # k=3: class 0 gets exp(cos 5 / T), class 1 gets exp(cos 45 / T) + exp(cos 55 / T).
    for T, winner in ((0.1, 0), (10.0, 1)):
        class0 = math.exp(cos_deg(5) / T)
        class1 = math.exp(cos_deg(45) / T) + math.exp(cos_deg(55) / T)
        assert (0 if class0 > class1 else 1) == winner  # the hand computation itself
        scores = neighbours.knn_predict(bank, labels, query, k=[3], temperature=T, num_classes=2)[3]
        assert scores.argmax(dim=1).item() == winner
        torch.testing.assert_close(normalised(scores.double()), normalised(torch.tensor([[class0, class1]], dtype=torch.float64)))


def naive_knn(bank: torch.Tensor, labels: list[int], queries: torch.Tensor, *, k: int, T: float, C: int) -> torch.Tensor:
    """Wu et al. 2018 with plain loops in float64: cosine similarity, sort, sum exp(sim / T) per class."""
    out = torch.zeros(len(queries), C, dtype=torch.float64)
    for q in range(len(queries)):
        sims = []
        for i in range(len(bank)):
            a, b = queries[q].double(), bank[i].double()
            sims.append((float(a @ b) / (float(a.norm()) * float(b.norm())), i))
        for sim, i in sorted(sims, reverse=True)[:k]:
            out[q, labels[i]] += math.exp(sim / T)
    return out


@pytest.fixture
def random_problem():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(40, 6, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g).tolist()
    queries = torch.randn(11, 6, generator=g)
    return bank, labels, queries


def test_matches_a_naive_loop_on_random_features(random_problem):
    bank, labels, queries = random_problem
    for T in (0.1, 0.5):
        scores = neighbours.knn_predict(bank, labels, queries, k=[7], temperature=T, num_classes=4)[7]
        expected = naive_knn(bank, labels, queries, k=7, T=T, C=4)
        torch.testing.assert_close(normalised(scores.double()), normalised(expected), rtol=1e-5, atol=1e-7)


def test_several_k_in_one_pass_equal_separate_calls(random_problem):
    bank, labels, queries = random_problem
    together = neighbours.knn_predict(bank, labels, queries, k=[20, 1, 5], num_classes=4)
    assert list(together) == [20, 1, 5]
    for k in (1, 5, 20):
        alone = neighbours.knn_predict(bank, labels, queries, k=[k], num_classes=4)[k]
        torch.testing.assert_close(together[k], alone)


@pytest.mark.parametrize(("chunk", "bank_chunk"), [(1, 1), (3, 3), (1, 10_000), (10_000, 3), (4, 7)])
def test_chunked_equals_unchunked(random_problem, chunk, bank_chunk):
    bank, labels, queries = random_problem
    whole = neighbours.knn_predict(bank, labels, queries, k=[1, 5, 12], num_classes=4, chunk_size=10_000, bank_chunk_size=10_000)
    parts = neighbours.knn_predict(bank, labels, queries, k=[1, 5, 12], num_classes=4, chunk_size=chunk, bank_chunk_size=bank_chunk)
    for k in (1, 5, 12):
        torch.testing.assert_close(parts[k], whole[k])


def test_k_is_capped_at_the_number_of_training_samples(random_problem):
    bank, labels, queries = random_problem
    capped = neighbours.knn_predict(bank[:4], labels[:4], queries, k=[10], num_classes=4)[10]
    exact = neighbours.knn_predict(bank[:4], labels[:4], queries, k=[4], num_classes=4)[4]
    torch.testing.assert_close(capped, exact)
    torch.testing.assert_close(normalised(capped.double()), normalised(naive_knn(bank[:4], labels[:4], queries, k=4, T=0.1, C=4)))


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.06], [0.2, 0.3, 0.5]])
    labels = torch.tensor([2, 0, 0])
    # top-1 predictions 1, 0, 2: only row 1 is right; top-2 sets {1,2}, {0,2}, {2,1}: rows 0 and 1.
    assert neighbours.topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert neighbours.topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert neighbours.topk_accuracy(scores, labels, 3) == 1.0
    with pytest.raises(ValueError, match="at least k classes"):
        neighbours.topk_accuracy(scores, labels, 4)


def test_nearest_finds_a_query_already_in_the_index_first(tmp_path):
    rng = np.random.default_rng(0)
    index = rng.normal(size=(20, 8)).astype(np.float32)
    queries = torch.from_numpy(index[[3, 17]] * 5.0)  # scaled copies: cosine similarity 1
    sims, rows = neighbours.nearest(index, queries, k=4)
    assert sims.shape == rows.shape == (2, 4)
    assert rows[:, 0].tolist() == [3, 17]
    torch.testing.assert_close(sims[:, 0], torch.ones(2))
    assert bool((sims[:, :-1] >= sims[:, 1:]).all())  # most similar first
    unit = index / np.linalg.norm(index, axis=1, keepdims=True)
    brute = unit[[3, 17]] @ unit.T  # (2, 20)
    assert rows.tolist() == np.argsort(-brute, axis=1)[:, :4].tolist()

    np.save(tmp_path / "index.npy", index)  # a memory-mapped index read in small blocks gives the same answer
    mapped = np.load(tmp_path / "index.npy", mmap_mode="r")
    sims2, rows2 = neighbours.nearest(mapped, queries, k=4, chunk_size=1, bank_chunk_size=3)
    assert rows2.tolist() == rows.tolist()
    torch.testing.assert_close(sims2, sims)
    assert neighbours.nearest(index, queries, k=99)[1].shape == (2, 20)  # capped at the index size
    with pytest.raises(ConfigError, match="same checkpoint and --layer"):
        neighbours.nearest(index, torch.zeros(1, 5), k=1)


def test_rows_searched_where_they_lie_score_as_normalised_copies(tmp_path):
    """A NumPy index on the CPU is multiplied in place and divided by its row norms; a tensor index is normalised
    first: the same similarities, a zero row scoring 0 on both, and `unit_rows` skipping the norms of unit rows."""
    rng = np.random.default_rng(1)
    index = rng.normal(size=(50, 16)).astype(np.float32)
    index[7] = 0.0
    queries = torch.from_numpy(rng.normal(size=(3, 16)).astype(np.float32))
    sims, rows = neighbours.nearest(torch.from_numpy(index), queries, k=50, bank_chunk_size=8)
    for bank in (index, index.astype(np.float64)):
        sims2, rows2 = neighbours.nearest(bank, queries, k=50, bank_chunk_size=8)
        torch.testing.assert_close(sims2, sims)
        assert rows2[:, :5].tolist() == rows[:, :5].tolist()
    assert all(float(s[r.tolist().index(7)]) == 0.0 for s, r in zip(sims2, rows2))
    unit = index / np.maximum(np.linalg.norm(index, axis=1, keepdims=True), 1e-12)
    sims3, rows3 = neighbours.nearest(unit, queries, k=50, bank_chunk_size=8, unit_rows=True)
    torch.testing.assert_close(sims3, sims)
    assert rows3[:, :5].tolist() == rows[:, :5].tolist()


def test_default_k_is_200_or_20_for_small_training_sets():
    from simclr_cli.engine.neighbours import default_k

    assert (default_k(9_999), default_k(10_000), default_k(1_281_167)) == (20, 200, 200)
