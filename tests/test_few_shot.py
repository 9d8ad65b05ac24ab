"""Few-shot (notebook 07): episodes, part crops, the EMD solver, branch weights, one tiny train/eval."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from pinpp_lib import few_shot as fs
from pinpp_lib import few_shot_data as fd
from pinpp_lib import few_shot_models as fm
from pinpp_lib.fileio import PinppError
from pinpp_lib.release import load_release

TARGETS = [c for c in range(8) for _ in range(9)]  # 8 classes × 9 images


def test_episodes_have_disjoint_support_and_query():
    eps = fd.draw_episodes(TARGETS, n_way=5, k_shot=2, n_query=3, n_episodes=30, seed=1)
    for ep in eps:
        assert len(ep["classes"]) == 5 and len(ep["support"]) == 10 and len(ep["query"]) == 15
        assert not set(ep["support"]) & set(ep["query"])
        assert {TARGETS[i] for i in ep["support"] + ep["query"]} == set(ep["classes"])
        for c in ep["classes"]:  # k per class in the support, q per class in the query
            assert sum(TARGETS[i] == c for i in ep["support"]) == 2 and sum(TARGETS[i] == c for i in ep["query"]) == 3
    assert len({tuple(ep["support"]) for ep in eps}) > 1  # episodes differ from each other


def test_stored_episodes_replay_identically(tmp_path):
    path = tmp_path / "ep.json"
    a = fd.episodes(path, TARGETS, 5, 1, 4, 12, seed=3)
    import random
    random.seed(999)
    before = random.getstate()
    assert fd.episodes(path, TARGETS, 5, 1, 4, 12, seed=3) == a
    assert random.getstate() == before  # the caller's RNG is untouched
    assert fd.draw_episodes(TARGETS, 5, 1, 4, 12, seed=3) == a  # and redrawing gives the same episodes
    assert fd.draw_episodes(TARGETS, 5, 1, 4, 12, seed=4) != a
    five = fd.episodes(path, TARGETS, 5, 5, 4, 12, seed=3)  # another request: drawn again, not the stored ones
    assert five == fd.draw_episodes(TARGETS, 5, 5, 4, 12, seed=3) != a
    relabelled = TARGETS[1:] + TARGETS[:1]
    assert fd.episodes(path, relabelled, 5, 5, 4, 12, seed=3) == fd.draw_episodes(relabelled, 5, 5, 4, 12, seed=3)
    with pytest.raises(PinppError, match="needs 5 classes with 20 images"):
        fd.draw_episodes(TARGETS, 5, 5, 15, 1, 0)


def test_part_boxes_largest_first_then_random_rectangles():
    rng = np.random.default_rng(0)
    boxes = [(0, 0, 4, 4), (10, 10, 20, 30), (5, 5, 10, 10)]
    out = fd.part_boxes(boxes, 2, 64, 48, rng)
    assert out == [(10, 10, 30, 40), (5, 5, 15, 15)]  # the two largest, as (x0, y0, x1, y1)
    out = fd.part_boxes(boxes[:1], 3, 64, 48, np.random.default_rng(0))
    assert out[0] == (0, 0, 4, 4) and len(out) == 3
    for x0, y0, x1, y1 in out[1:]:  # fewer parts than M: random rectangles inside the image
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48
    assert fd.part_boxes([], 3, 64, 48, np.random.default_rng(5)) == fd.part_boxes([], 3, 64, 48, np.random.default_rng(5))
    assert fd.part_boxes([(60.5, 40.2, 30, 30)], 1, 64, 48, rng) == [(60, 40, 64, 48)]  # clipped to the image


def test_dataset_crops_and_class_split(synth):
    rel = load_release(synth / "release")
    samples = fd.part_samples(rel, synth / "imagenet" / "train")
    assert all(s.path.exists() for s in samples) and any(s.boxes for s in samples)
    split = fd.class_split(sorted({s.wnid for s in samples}), (3, 1, 2), seed=0)
    assert sum(map(len, split.values())) == 6 and not set(split["train"]) & set(split["test"])
    ds = fd.PartImageDataset(samples, {w: i for i, w in enumerate(split["test"])}, size=24, m=3, seed=0)
    x, parts, y = ds[0]
    assert x.shape == (3, 24, 24) and parts.shape == (3, 3, 24, 24) and 0 <= y < 2
    assert torch.equal(ds[0][1], parts)  # random fill rectangles are seeded per image
    with pytest.raises(PinppError, match="class split"):
        fd.class_split(split["train"], (3, 1, 2))
    with pytest.raises(PinppError, match="fewer than the 50"):
        fd.part_samples(rel, synth / "imagenet" / "train", min_per_class=50)


def _lp_optimum(a, b, cost):
    n, m = cost.shape
    a_eq = np.vstack([np.kron(np.eye(n), np.ones(m)), np.kron(np.ones(n), np.eye(m))])
    return linprog(cost.ravel(), A_eq=a_eq, b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs").fun


def test_emd_flow_is_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    for n in (2, 3, 4):  # uniform weights: the optimum is a permutation (Birkhoff), enumerate them all
        cost = rng.random((n, n))
        flow = fm.emd_flow(np.full(n, 1 / n), np.full(n, 1 / n), cost)
        best = min(sum(cost[i, p[i]] for i in range(n)) / n for p in itertools.permutations(range(n)))
        assert (flow * cost).sum() == pytest.approx(best, abs=1e-9)
        assert np.allclose(flow.sum(1), 1 / n) and np.allclose(flow.sum(0), 1 / n)
    a, b = rng.random(3), rng.random(5)  # unequal weights and sizes: against a linear program
    a, b, cost = a / a.sum(), b / b.sum(), rng.random((3, 5))
    assert (fm.emd_flow(a, b, cost) * cost).sum() == pytest.approx(_lp_optimum(a, b, cost), abs=1e-7)


def test_emd_similarity_prefers_matching_sets_and_is_differentiable():
    torch.manual_seed(0)
    q = torch.rand(3, 8, requires_grad=True)
    same, other = q.detach() + 0.01 * torch.rand(3, 8), torch.rand(4, 8)
    s_same, s_other = fm.emd_similarity(q, same), fm.emd_similarity(q, other)
    assert s_same > s_other and s_same.item() == pytest.approx(1.0, abs=1e-2)
    s_other.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    logits = fm.emd_scores(torch.rand(10, 3, 8), torch.arange(5).repeat(2), torch.rand(4, 3, 8), 5)
    assert logits.shape == (4, 5)


def test_branch_weights_are_normalised():
    net = fm.FewShotNet((8, 8, 8, 16), m_parts=3, branch_channels=(4, 4, 4))
    assert torch.allclose(net.mix_weights(), torch.full((4,), 0.25))
    with torch.no_grad():
        net.mix_logits.copy_(torch.tensor([3.0, -1.0, 0.5, 2.0]))
    w = net.mix_weights()
    assert (w > 0).all() and w.sum().item() == pytest.approx(1.0)
    x, parts = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 3, 16, 16)
    f = net(x, parts)
    manual = w[0] * net.encoder(x) + sum(w[i + 1] * net.branches[i](parts[:, i]) for i in range(3))
    assert f.shape == (2, 16) and torch.allclose(f, manual, atol=1e-6)
    with pytest.raises(ValueError, match="needs 3 part crops"):
        net(x)


def test_centroid_scores_pick_the_nearest_centroid():
    support = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    s = fm.centroid_scores(support, torch.tensor([0, 0, 1, 1]), torch.tensor([[1.0, 0.2], [0.1, 1.0]]), 2, torch.tensor(10.0))
    assert s.argmax(1).tolist() == [0, 1]


def test_tiny_train_and_evaluate(synth, tmp_path):
    samples = fd.part_samples(load_release(synth / "release"), synth / "imagenet" / "train")
    cfg = fs.FewShotConfig(split=(3, 0, 3), channels=(4, 4, 4, 8), branch_channels=(4, 4, 4), size_meta_baseline=16,
                           size_deepemd=16, m_parts=2, emd_regions=2, n_way=3, shots=(1,), n_query=2, pretrain_epochs=1,
                           batch_size=8, meta_episodes=2, eval_episodes=3, workers=0, device="cpu")
    records, weights = fs.run(samples, cfg, tmp_path)
    assert len(records) == 2 * 2 * 3 and records.accuracy.between(0, 1).all()
    assert set(weights.input) == {"image", "part 1", "part 2"} and weights.weight.sum() == pytest.approx(1.0)
    again, _ = fs.run(samples, cfg, tmp_path)  # stages are loaded, episodes replayed: identical records
    assert again.equals(records)
    table = fs.summary_table(records, 1)
    assert list(table.columns[:3]) == ["method", "regions", "1-shot accuracy"] and len(table) == 4
    with pytest.raises(PinppError, match="class split"):
        fs.run(samples, dataclasses.replace(cfg, split=(5, 0, 3)), tmp_path / "x")
    with pytest.raises(PinppError, match=r"trained with another configuration or other samples \(changed: config.pretrain_lr"):
        fs.run(samples, dataclasses.replace(cfg, pretrain_lr=0.5), tmp_path)
