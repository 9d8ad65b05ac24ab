"""Few-shot (notebook 07): episodes, part crops, the EMD solver, branch weights, one tiny train/eval."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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
    # the authors' pre-training augmentation: RandomResizedCrop + flip drawn once per tensor (image, each crop)
    rrc = fd.PartImageDataset(samples, {w: i for i, w in enumerate(split["test"])}, size=24, m=3, seed=0, augment="rrc_flip")
    calls = []
    rrc._rrc_flip = lambda t, f=rrc._rrc_flip: calls.append(t.shape) or f(t)
    torch.manual_seed(0)
    xa, pa, _ = rrc[0]
    assert len(calls) == 1 + 3 and xa.shape == (3, 24, 24) and pa.shape == (3, 3, 24, 24)
    assert not torch.equal(xa, x)  # cropped: not the plain resize
    plain = fd.PartImageDataset(samples, {w: i for i, w in enumerate(split["test"])}, size=24, m=3, seed=0, train=True,
                                augment="none")
    assert torch.equal(plain[0][0], x) and plain.augment == "none" and ds.augment == "none"
    with pytest.raises(ValueError, match="augment='crop'"):
        fd.PartImageDataset(samples, {}, 24, 3, augment="crop")
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


def test_authors_part_cnn_and_p_mix_restate_their_resnet12_forward():
    """The authors' `ResNet12.forward`: `self.p * x + (1 - self.p) * part`, p a scalar parameter starting at 0; their
    part CNN's first linear layer takes 51,200 inputs at 80 px."""
    assert fm.AuthorsPartCNN(80, 512).mlp[0].in_features == 51200
    net = fm.FewShotNet((8, 8, 8, 16), m_parts=1, mix="p", size=16).eval()
    assert net.p.item() == 0.0 and isinstance(net.branches[0], fm.AuthorsPartCNN) and not hasattr(net, "mix_logits")
    x, parts = torch.rand(2, 3, 16, 16), torch.rand(2, 1, 3, 16, 16)
    assert torch.allclose(net(x, parts), net.branches[0](parts[:, 0]))  # p = 0: the part feature alone
    with torch.no_grad():
        net.p.fill_(1.7)  # unconstrained: not clipped to [0, 1]
    p = net.p
    assert torch.allclose(net(x, parts), p * net.encoder(x) + (1 - p) * net.branches[0](parts[:, 0]), atol=1e-6)
    assert net.mix_weights().tolist() == pytest.approx([1.7, -0.7])


def test_interval_restates_the_authors_mean_confidence_interval():
    """test_few_shot.py: va_lst holds one accuracy per batch of 4 episodes; h = sem(a) · t.ppf(0.975, n − 1)."""
    import scipy.stats
    acc = np.random.default_rng(0).uniform(20, 90, 40)
    batches = [np.mean(acc[i:i + 4]) for i in range(0, 40, 4)]
    a = 1.0 * np.array(batches)
    h = scipy.stats.sem(a) * scipy.stats.t.ppf((1 + 0.95) / 2.0, len(a) - 1)
    assert fs.interval(acc, 4) == pytest.approx(h) and np.isnan(fs.interval(acc[:7], 4))
    assert fs.milestones(fs.FewShotConfig()) == [90]  # train_classifier_pinpp.yaml: milestones [90] of 100 epochs


def test_few_shot_recipes_resolve_in_config(tmp_path):
    from pinpp_lib import config
    paper = config.resolve("full", data_root=tmp_path).few_shot
    code = config.resolve("full", data_root=tmp_path, overrides={"few_shot": {"recipe": "authors_code"}}).few_shot
    assert (paper.mix, paper.m_parts, code.mix, code.m_parts) == ("convex", 3, "p", 1)
    assert paper.channels == code.channels == (64, 128, 256, 512) and paper.channels_deepemd == (64, 160, 320, 640)
    assert "authors_code" in fs.recipe_note(paper) and "p · image" in fs.recipe_note(code)
    with pytest.raises(PinppError, match="few_shot.recipe 'x'"):
        config.resolve("full", data_root=tmp_path, overrides={"few_shot": {"recipe": "x"}})


@pytest.mark.parametrize("recipe", ["paper", "authors_code"])
def test_tiny_train_and_evaluate(synth, tmp_path, recipe):
    samples = fd.part_samples(load_release(synth / "release"), synth / "imagenet" / "train")
    cfg = fs.FewShotConfig(split=(3, 0, 3), channels=(4, 4, 4, 8), channels_deepemd=(4, 4, 4, 8), branch_channels=(4, 4, 4),
                           size_meta_baseline=16, size_deepemd=16, emd_regions=2, n_way=3, shots=(1,), n_query=2,
                           pretrain_epochs=1, batch_size=8, meta_shot=0, meta_episodes=2, pretrain_epochs_deepemd=1, meta_episodes_deepemd=2, eval_episodes=3, workers=0,
                           device="cpu", recipe=recipe, **{"m_parts": 2, **fs.RECIPES[recipe]})
    records, weights = fs.run(samples, cfg, tmp_path)
    assert len(records) == 2 * 2 * 3 and records.accuracy.between(0, 1).all()
    assert set(weights.input) == ({"image", "part 1", "part 2"} if recipe == "paper" else {"image", "part 1"})
    assert weights.weight.sum() == pytest.approx(1.0)
    again, _ = fs.run(samples, cfg, tmp_path)  # stages are loaded, episodes replayed: identical records
    assert again.equals(records)
    table = fs.summary_table(records, 1)
    assert list(table.columns[:3]) == ["method", "regions", "1-shot accuracy"] and len(table) == 4
    with pytest.raises(PinppError, match="class split"):
        fs.run(samples, dataclasses.replace(cfg, split=(5, 0, 3)), tmp_path / "x")
    with pytest.raises(PinppError, match=r"trained with another configuration or other samples \(changed: config.pretrain_lr"):
        fs.run(samples, dataclasses.replace(cfg, pretrain_lr=0.5), tmp_path)
    # Meta-Baseline meta-trained once at the meta shot: the 1-shot test uses the 2-shot model (no 1-shot stage);
    # DeepEMD at the test shot (its train_meta.py -shot), unless meta_shot_deepemd says otherwise
    once = dataclasses.replace(cfg, meta_shot=2, n_query=1)
    fs.run(samples, once, tmp_path / "once")
    stages = {d.name: sorted(p.name for p in d.glob("*.done.json")) for d in (tmp_path / "once").iterdir() if d.is_dir()}
    assert {k: v for k, v in stages.items() if k.startswith("meta_baseline")} == \
        {f"meta_baseline_{v}": ["meta_2shot.done.json", "pretrain.done.json"] for v in ("object", "object_part")}
    assert {k: v for k, v in stages.items() if k.startswith("deepemd")} == \
        {f"deepemd_{v}": ["meta_1shot.done.json", "pretrain.done.json"] for v in ("object", "object_part")}


@pytest.mark.slow
def test_pinpp_few_shot_runs_the_authors_recipe(tmp_path):
    """`pinpp few-shot --set recipe=authors_code`: notebook 07's job from the command line, the recipe in its note."""
    import subprocess
    import sys
    sets = ["recipe=authors_code", "channels=(4,4,4,8)", "channels_deepemd=(4,4,4,8)", "pretrain_epochs=1", "meta_episodes=1", "pretrain_epochs_deepemd=1", "meta_episodes_deepemd=1",
            "eval_episodes=8", "shots=(1,)", "meta_shot=0", "size_meta_baseline=16", "size_deepemd=16", "jobs=1"]
    out = subprocess.run([sys.executable, "-m", "pinpp_lib", "few-shot", "--profile", "smoke", "--data-root", str(tmp_path),
                          *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count('"1-shot accuracy"') == 4 and "Recipe: authors_code" in out.stdout


# --- DeepEMD as the authors' fork (Benchmark/fewshot/deepemd/Models/models/Network.py, emd_utils.py @e132f50) ---

def _fork_emd_forward_1shot(proto, query, temperature=12.5):
    """Their emd_forward_1shot, restated on tensors laid out as theirs: proto (P, C, N, 1), query (Q, C, N, 1); the
    OpenCV EMD replaced by the same exact solver (POT)."""
    def get_weight_vector(A, B):
        M, Nn = A.shape[0], B.shape[0]
        B = F.adaptive_avg_pool2d(B, [1, 1]).repeat(1, 1, A.shape[2], A.shape[3])
        A, B = A.unsqueeze(1).repeat(1, Nn, 1, 1, 1), B.unsqueeze(0).repeat(M, 1, 1, 1, 1)
        return F.relu((A * B).sum(2).view(M, Nn, -1)) + 1e-3

    def normalize_feature(x):
        return x - x.mean(1).unsqueeze(1)

    def get_similiarity_map(proto, query):
        way, num_query = proto.shape[0], query.shape[0]
        query, proto = query.view(num_query, query.shape[1], -1), proto.view(way, proto.shape[1], -1)
        proto = proto.unsqueeze(0).repeat([num_query, 1, 1, 1]).permute(0, 1, 3, 2)
        query = query.unsqueeze(1).repeat([1, way, 1, 1]).permute(0, 1, 3, 2)
        feature_size = proto.shape[-2]
        proto, query = proto.unsqueeze(-3), query.unsqueeze(-2).repeat(1, 1, 1, feature_size, 1)
        return F.cosine_similarity(proto, query, dim=-1)

    def emd_inference(cost, w1, w2):
        w1, w2 = F.relu(w1) + 1e-5, F.relu(w2) + 1e-5
        w1, w2 = w1 * (w1.shape[0] / w1.sum()), w2 * (w2.shape[0] / w2.sum())
        return fm.emd_flow(w1.detach().double().numpy() / w1.shape[0], w2.detach().double().numpy() / w2.shape[0],
                           cost.detach().double().numpy()) * w1.shape[0]  # the flow at total mass N (cv2.EMD's)

    weight_1, weight_2 = get_weight_vector(query, proto), get_weight_vector(proto, query)
    proto, query = normalize_feature(proto), normalize_feature(query)
    sim = get_similiarity_map(proto, query)
    out = torch.zeros(sim.shape[:2])
    for i in range(sim.shape[0]):
        for j in range(sim.shape[1]):
            flow = emd_inference(1 - sim[i, j], weight_1[i, j], weight_2[j, i])
            out[i, j] = (sim[i, j] * torch.from_numpy(flow).float()).sum()
    return out * temperature / weight_1.shape[-1]


def test_emd_logits_restate_the_authors_emd_forward():
    g = torch.Generator().manual_seed(3)
    query, protos = torch.randn(3, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)  # (sets, nodes, channels)
    as_fork = lambda t: t.permute(0, 2, 1).unsqueeze(-1)  # noqa: E731  (B, C, N, 1)
    want = _fork_emd_forward_1shot(as_fork(protos), as_fork(query))
    assert torch.allclose(fm.emd_logits(query, protos), want, atol=1e-4)
    # centring matters: uncentred features give other logits
    shifted = query + 3.0
    assert not torch.allclose(fm.emd_logits(shifted, protos), want, atol=1e-2)


def test_sfc_prototypes_restate_the_authors_get_sfc():
    """get_sfc: mean over shots per class, SGD(lr, momentum 0.9, dampening 0.9) over `steps` random permutations in
    batches of sfc_bs, CE of emd_forward_1shot(SFC, batch)."""
    g = torch.Generator().manual_seed(4)
    way, shot = 3, 2
    support = torch.randn(way * shot, 4, 6, generator=g)
    y = torch.arange(way).repeat(shot)  # their shot-major order
    as_fork = lambda t: t.permute(0, 2, 1).unsqueeze(-1)  # noqa: E731
    sfc = as_fork(support).view(shot, -1, 6, 4, 1).mean(0).clone().detach().requires_grad_(True)
    opt = torch.optim.SGD([sfc], lr=0.1, momentum=0.9, dampening=0.9, weight_decay=0)
    perm_gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        rand_id = torch.randperm(way * shot, generator=perm_gen)
        for j in range(0, way * shot, 4):
            sel = rand_id[j:min(j + 4, way * shot)]
            loss = F.cross_entropy(_fork_emd_forward_1shot(sfc, as_fork(support)[sel].detach()), y[sel])
            opt.zero_grad()
            loss.backward()
            opt.step()
    got = fm.sfc_prototypes(support, y, way, steps=3, lr=0.1, batch=4, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(got, sfc.detach().squeeze(-1).permute(0, 2, 1), atol=1e-4)
    assert not torch.allclose(got, torch.stack([support[y == c].mean(0) for c in range(way)]), atol=1e-3)  # it moved
    # k-shot scoring: SFC by default, the union of the supports' nodes on request; one shot: the support itself
    q = torch.randn(4, 4, 6, generator=g)
    assert fm.emd_scores(support, y, q, way, sfc={"steps": 0}).shape == (4, way)
    assert torch.allclose(fm.emd_scores(support, y, q, way, sfc={"steps": 0}),
                          fm.emd_logits(q, torch.stack([support[y == c].mean(0) for c in range(way)])))
    assert torch.allclose(fm.emd_scores(support, y, q, way, kshot="nodes"),
                          fm.emd_logits(q, torch.stack([support[y == c].flatten(0, 1) for c in range(way)])))
    one = fm.emd_scores(support[:way], y[:way], q, way)
    assert torch.allclose(one, fm.emd_logits(q, support[:way]))


def test_deepemd_random_patches_are_random_resized_crops():
    """The fork's sampling loader: RandomResizedCrop(84) (scale 0.08–1, ratio 3/4–4/3) + flip per patch, 9 per image."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        x0, y0, x1, y1 = fd.rrc_box(120, 80, rng)
        w, h = x1 - x0, y1 - y0
        assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 80
        if (w, h) != (107, 80):  # not the fallback centre crop (ratio clamped to 4/3)
            assert 0.08 * 9600 * 0.9 <= w * h <= 9600 * 1.02 and 0.7 <= w / h <= 1.42
    assert fd.rrc_box(200, 10, np.random.default_rng(0), scale=(0.99, 1.0)) == (93, 0, 106, 10)  # fallback: ratio clamped
    assert fs.FewShotConfig().emd_regions == 9 and fs.FewShotConfig().emd_patches == "rrc"
    boxes = fd.part_boxes([], 4, 120, 80, np.random.default_rng(1), fill="rrc")
    rng = np.random.default_rng(1)
    assert boxes == [fd.rrc_box(120, 80, rng) for _ in range(4)]


def test_deepemd_schedules_are_its_scripts_defaults():
    """train_pretrain.py: 120 epochs, lr 0.04, StepLR(30, 0.2), Nesterov, batch 128; train_meta.py: 100 epochs × 50
    episodes, lr 0.0005, StepLR(10 epochs, 0.5), Nesterov, 4 queries per class. Meta-Baseline keeps its own."""
    cfg = fs.FewShotConfig()
    emd, mb = fs.schedule(cfg, "deepemd"), fs.schedule(cfg, "meta_baseline")
    assert emd == {"pretrain_epochs": 120, "pretrain_lr": 0.04, "nesterov": True, "meta_episodes": 100 * 50,
                   "meta_lr": 0.0005, "meta_query": 4}
    assert (cfg.pretrain_step_deepemd, cfg.pretrain_gamma_deepemd, cfg.meta_step_deepemd, cfg.meta_gamma_deepemd) == (30, 0.2, 10 * 50, 0.5)
    x = torch.rand(2, 3, 16, 16)  # DeepEMD's encoder sees CIFAR-normalised pixels, Meta-Baseline's ImageNet-normalised
    emd_net, mb_net = fs.build("deepemd", "object", cfg), fs.build("meta_baseline", "object", cfg)
    mb_net.encoder.blocks = emd_net.encoder.blocks = torch.nn.Identity()
    cifar = (x - torch.tensor([125.3, 123.0, 113.9]).view(1, 3, 1, 1) / 255) / (torch.tensor([63.0, 62.1, 66.7]).view(1, 3, 1, 1) / 255)
    assert torch.allclose(emd_net.encoder(x), cifar.mean((2, 3)), atol=1e-5)
    assert not torch.allclose(mb_net.encoder(x), cifar.mean((2, 3)), atol=1e-2)
    assert mb == {"pretrain_epochs": 100, "pretrain_lr": 0.1, "nesterov": False, "meta_episodes": 4000, "meta_lr": 0.001,
                  "meta_query": 15} and cfg.batch_size == 128
