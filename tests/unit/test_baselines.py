"""Baselines speak the Dictionary protocol: gradient clustering and activation k-means on a zoo model."""

import pytest
import torch

import npeff_tl as nt
from npeff_tl.baselines import ActivationKMeans, GradientClustering
from npeff_tl.baselines.activations import hook_activations
from npeff_tl.evaluation.metrics import label_metrics
from helpers.oracles import tl_grad


@pytest.fixture(scope="module")
def zoo():
    model, data = nt.zoo.load("tasks-2l", n_train=16, n_test=16)
    return model, nt.LabeledExamples.from_dataset(data["train"]), nt.LabeledExamples.from_dataset(data["test"])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _restores_and_changes(dictionary, model, examples):
    before = _state(model)
    with dictionary.intervention(0, magnitude=dictionary.magnitude_bounds(0)[0], sign=1):
        pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    kl = nt.kl_divergence(model, examples.examples, dictionary.intervention(0, dictionary.magnitude_bounds(0)[0]))
    assert float(kl.mean()) > 0
    zero = nt.kl_divergence(model, examples.examples, dictionary.intervention(0, 0.0))
    assert float(zero.max()) == 0.0


def _ami_above_chance(dictionary, test):
    """Held-out AMI minus the largest AMI of 5 label shuffles (chance is ~0)."""
    from sklearn.metrics import adjusted_mutual_info_score

    clusters = dictionary.coefficients(test).argmax(1).tolist()
    g = torch.Generator().manual_seed(0)
    shuffled = [adjusted_mutual_info_score([test.labels[i] for i in torch.randperm(len(test), generator=g)], clusters)
                for _ in range(5)]
    return label_metrics(dictionary, dictionary.coefficients(test), test, k=8)["ami"] - max(shuffled)


def test_gradient_clustering_bounds_its_batches_by_memory_and_gets_the_same_clusters(zoo, monkeypatch):
    from npeff_tl.baselines import gradient_clustering as gc

    assert gc.gradient_batch(106_168_320, 16) == 1  # SmolLM2-135M's attention and MLP weights: one at a time
    assert gc.gradient_batch(1000, 16) == 16 and gc.gradient_batch(gc.GRADIENT_MEMORY // 100, 16) == 5
    model, train, _ = zoo
    train = train.subset(range(40))
    full = GradientClustering(model, train, n_clusters=4, seed=0)
    monkeypatch.setattr(gc, "GRADIENT_MEMORY", 20 * full.space.size * 3)  # room for 3 examples per batch
    small = GradientClustering(model, train, n_clusters=4, seed=0)
    assert (full.batch_size, small.batch_size) == (16, 3)
    assert torch.equal(full.labels, small.labels)
    torch.testing.assert_close(small.train_coefficients, full.train_coefficients, rtol=0, atol=1e-6)


def test_gradient_clustering(zoo):
    model, train, test = zoo
    clusters = GradientClustering(model, train, n_clusters=7, seed=0)
    assert isinstance(clusters, nt.Dictionary) and clusters.n_components == 7
    assert not any(".ln" in name or name.startswith(("embed.", "pos_embed.", "ln_final")) for name in clusters.space.names)
    assert "unembed.W_U" in clusters.space.names
    # coefficients are cosines with the unit cluster means, from gradients computed independently here
    answers = train.answers[:5]
    grads = torch.stack([tl_grad(
        model, model(train.examples.tokens[i:i + 1])[0, int(train.examples.position[i])].log_softmax(-1)[answers[i]],
        clusters.space.names) for i in range(5)]).double()
    cosines = (grads / grads.norm(dim=1, keepdim=True)) @ clusters.means.T
    assert torch.allclose(clusters.train_coefficients[:5], cosines.clamp(min=0), atol=1e-5)
    assert torch.allclose(clusters.coefficients(train.subset(range(5))), clusters.train_coefficients[:5], atol=1e-6)
    assert float(clusters.coefficients(test).min()) >= 0
    assert _ami_above_chance(clusters, test) > 0.05
    _restores_and_changes(clusters, model, test)


def test_the_comparison_can_cluster_gradients_of_named_parameters(zoo):
    from npeff_tl.baselines.factory import build_baselines
    from npeff_tl.config import CompareConfig

    model, train, test = zoo
    config = CompareConfig(sae_widths=[], sae_k=[], activation_kmeans=False, gradient_include=["blocks.1.mlp.W_*"])
    [clusters] = build_baselines(model, train, test, config, 3, lambda width, hook: None)
    assert clusters.space.names == ["blocks.1.mlp.W_in", "blocks.1.mlp.W_out"]
    assert clusters.direction(0).shape == (clusters.space.size,)
    [default] = build_baselines(model, train, test, CompareConfig(sae_widths=[], sae_k=[], activation_kmeans=False),
                                3, lambda width, hook: None)
    assert "unembed.W_U" in default.space.names
    with pytest.raises(ValueError, match="blocks.9"):
        build_baselines(model, train, test, CompareConfig(sae_widths=[], sae_k=[], activation_kmeans=False,
                                                          gradient_include=["blocks.9.*"]), 3, lambda w, h: None)


def _unit_answer_grads(model, examples, space, index):
    """Unit gradients of the answers' log-probabilities, one plain backward per example."""
    rows = []
    for i in index:
        log_probs = model(examples.examples.tokens[i:i + 1])[0, int(examples.examples.position[i])].log_softmax(-1)
        rows.append(tl_grad(model, log_probs[examples.answers[i]], space.names))
    grads = torch.stack(rows).double()
    return grads / grads.norm(dim=1, keepdim=True)


def test_gradient_clustering_through_a_count_sketch(zoo):
    from npeff_tl.baselines.gradient_clustering import CountSketch

    model, train, test = zoo
    clusters = GradientClustering(model, train, n_clusters=7, seed=0, sketch_dim=2**14)
    size = clusters.space.size
    matrix = torch.sparse_coo_tensor(  # the sketch as the (sparse) matrix it stands for
        torch.stack([clusters.sketch.bucket.long(), torch.arange(size)]), clusters.sketch.sign.double(), (2**14, size),
        check_invariants=True)
    unit = _unit_answer_grads(model, train, clusters.space, range(len(train)))
    sketched = (matrix @ unit.T).T
    sketched = sketched / sketched.norm(dim=1, keepdim=True)
    assert torch.allclose(clusters.train_coefficients, (sketched @ clusters.means.T).clamp(min=0), atol=1e-5)
    for j in range(7):  # interventions move along the members' mean unit gradient in the full space
        mean = unit[clusters.labels == j].mean(0)
        assert torch.allclose(clusters.direction(j), mean / mean.norm(), atol=1e-6)
    assert _ami_above_chance(clusters, test) > 0.05
    _restores_and_changes(clusters, model, test)
    x, y = torch.randn(2, 100_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x, y = x / x.norm(), (x + y) / (x + y).norm()
    s = CountSketch(100_000, 2**16, seed=3)(torch.stack([x, y]))
    assert abs(float(s[0] @ s[1]) - float(x @ y)) < 0.02 and abs(float(s[0].norm()) - 1) < 0.02


def test_gradient_clusterings_for_several_seeds_share_their_gradients(zoo, monkeypatch):
    from npeff_tl.baselines import gradient_clustering as gc

    model, train, test = zoo
    alone = [GradientClustering(model, train, n_clusters=5, seed=s, sketch_dim=2**12, sketch_seed=1) for s in (1, 2, 3)]
    passes = []
    compute = gc.GradientClustering._compute_rows
    monkeypatch.setattr(gc.GradientClustering, "_compute_rows", lambda self, *a: passes.append(1) or compute(self, *a))
    together = GradientClustering.for_seeds(model, train, 5, [1, 2, 3], sketch_dim=2**12)
    held_out = [d.coefficients(test) for d in together]
    assert len(passes) == 2  # one pass over the train examples, one over the held-out ones, for three seeds
    assert [d.seed for d in together] == [1, 2, 3] and {d.sketch_seed for d in together} == {1}
    for one, shared, coefficients in zip(alone, together, held_out):
        assert torch.equal(one.labels, shared.labels)
        torch.testing.assert_close(shared.means, one.means, rtol=0, atol=1e-12)
        torch.testing.assert_close(shared.train_coefficients, one.train_coefficients, rtol=0, atol=1e-12)
        torch.testing.assert_close(coefficients, one.coefficients(test), rtol=0, atol=1e-6)
    assert len({tuple(d.labels.tolist()) for d in alone}) > 1  # the seeds do cluster differently
    together[0].coefficients(test.subset(range(4)))  # other examples: a new pass
    assert len(passes) == 3


def test_activation_kmeans(zoo):
    from sklearn.cluster import KMeans

    model, train, test = zoo
    hook = "blocks.1.hook_resid_post"
    kmeans = ActivationKMeans(model, train, hook, n_clusters=7, seed=0)
    assert isinstance(kmeans, nt.Dictionary)
    X = hook_activations(model, test.examples, hook).double()
    reference = KMeans(7, n_init=10, random_state=0).fit(hook_activations(model, train.examples, hook).double().numpy())
    assert kmeans.coefficients(test).argmax(1).tolist() == reference.predict(X.numpy()).tolist()
    # magnitude 1, sign +1 removes the cluster direction from the activation at the hook (at every position)
    seen = []
    with torch.no_grad(), kmeans.intervention(2, 1.0, sign=1), model.hooks(fwd_hooks=[(hook, lambda x, hook: seen.append(x))]):
        model(test.examples.tokens[:4])
    u = kmeans.directions[2].to(seen[0].dtype)
    assert float((seen[0] @ u).abs().max()) < 1e-4 and float((X[:4].float() @ u.float()).abs().max()) > 1e-2
    assert _ami_above_chance(kmeans, test) > 0.1
    _restores_and_changes(kmeans, model, test)


def test_bad_hooks_and_sizes_are_clear_errors(zoo):
    model, train, _ = zoo
    with pytest.raises(ValueError, match="unknown hook 'blocks.9.hook_resid_post'"):
        ActivationKMeans(model, train, "blocks.9.hook_resid_post", 4)
    with pytest.raises(ValueError, match="n_clusters must be between 2"):
        GradientClustering(model, train, n_clusters=1)
