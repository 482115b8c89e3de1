"""Comparison metrics on hand-built cases with known answers: perfect, permuted, random, multi-factor."""

import contextlib
import json

import pytest
import torch

import npeff_tl as nt
from npeff_tl.evaluation import compare, component_labels, label_metrics, match_coefficients, train_ami
from npeff_tl.evaluation.labels import component_factors
from npeff_tl.evaluation.metrics import best_match_f1, factor_auc, multi_factor_recall, purity_at
from npeff_tl.dictionaries import top_of


def _examples(labels, factors=None):
    tokens = torch.zeros(len(labels), 2, dtype=torch.long)
    return nt.LabeledExamples(nt.Examples.from_tokens(tokens), labels=labels, factors=factors)


class FixedDictionary:
    """A dictionary with given coefficients (for metric tests; its interventions do nothing)."""

    model = None

    def __init__(self, name, train_coefficients, train_labels, coefficients, train_factors=None):
        self.name, self._train, self._coefficients = name, train_coefficients, coefficients
        self.train = _examples(train_labels, train_factors)

    @property
    def n_components(self):
        return self._train.shape[1]

    @property
    def train_coefficients(self):
        return self._train

    def coefficients(self, examples):
        return self._coefficients

    def top_examples(self, j, k=20):
        return top_of(self._train[:, j], k)

    def intervention(self, j, magnitude, sign=1):
        return contextlib.nullcontext()

    def magnitude_bounds(self, j):
        return 1.0, 10.0

    def intervention_settings(self, j):
        return {}

    def figures(self):
        return {}

    def describe(self):
        return f"fixed {self.name}"


def _one_hot(clusters, r):
    return torch.nn.functional.one_hot(torch.tensor(clusters), r).double() * (1 + torch.rand(len(clusters), 1))


LABELS = ["a"] * 30 + ["b"] * 30 + ["c"] * 30


def test_fixed_dictionaries_satisfy_the_protocol():
    d = FixedDictionary("x", _one_hot([0] * 90, 3), LABELS, _one_hot([0] * 90, 3))
    assert isinstance(d, nt.Dictionary)


def test_perfect_and_permuted_assignments_score_one():
    clusters = [0] * 30 + [1] * 30 + [2] * 30
    for permutation in ([0, 1, 2], [2, 0, 1]):
        W = _one_hot([permutation[c] for c in clusters], 3)
        d = FixedDictionary("p", W, LABELS, W)
        metrics = label_metrics(d, W, _examples(LABELS), k=20)
        assert metrics["ami"] == pytest.approx(1.0) and metrics["nmi"] == pytest.approx(1.0)
        assert metrics["purity_at_20"] == 1.0 and metrics["best_match_f1"] == 1.0


def test_random_coefficients_score_chance():
    g = torch.Generator().manual_seed(0)
    labels = [["a", "b", "c", "d"][i % 4] for i in range(4000)]
    W = torch.rand(4000, 8, generator=g, dtype=torch.float64)
    d = FixedDictionary("r", W, labels, W)
    metrics = label_metrics(d, W, _examples(labels), k=200)
    assert abs(metrics["ami"]) < 0.01
    assert 0.25 <= metrics["purity_at_200"] < 0.35  # chance: the largest label's share, 1/4, plus noise
    assert metrics["best_match_f1"] < 0.35  # chance F1 of a 1/8 cluster for a 1/4 label: 2/(8+4)... about 0.17


def test_purity_and_f1_by_hand():
    W = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    labels = ["a", "a", "b", "b"]
    assert purity_at(W, labels, k=3) == pytest.approx((2 / 3 + 1.0) / 2)  # component 1 has 2 positive entries
    assert best_match_f1(W, labels) == {"a": pytest.approx(2 * 2 / (3 + 2)), "b": pytest.approx(2 * 1 / (1 + 2))}


def test_multi_factor_recall_by_hand():
    W = torch.tensor([[1.0, 0.9, 0.0], [1.0, 0.0, 0.9], [0.2, 0.1, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    factors = [["max", "succ"], ["max", "succ"], ["max", "succ"], ["max"]]
    mapping = ["max", "succ", "other"]
    # example 0: top two map to {max, succ}; example 1: {max, other}; example 2: {max, succ}; example 3 has one factor
    assert multi_factor_recall(W, factors, mapping) == pytest.approx(2 / 3)
    assert multi_factor_recall(W, [["max"]] * 4, mapping) is None


def test_components_named_by_factor_count_pair_strata_for_both_factors():
    # component 0's top examples: 3 of the pair stratum a+b and 2 of b; component 1's: 2 of a and 1 of c
    strata = ["a+b", "a+b", "a+b", "b", "b", "a", "a", "c"]
    factors = [["a", "b"]] * 3 + [["b"]] * 2 + [["a"]] * 2 + [["c"]]
    train = torch.tensor([[1.0, 0]] * 5 + [[0, 1.0]] * 3, dtype=torch.float64)
    d = FixedDictionary("f", train, strata, None, factors)
    assert component_labels(d) == ["a+b", "a"]  # by stratum: the pair stratum, which no example's factors contain
    assert component_factors(d) == ["b", "a"]  # by factor: b counts 5 times among component 0's top examples


def test_multi_factor_recall_and_factor_auc_on_made_up_dictionaries():
    names = ["a", "b", "c", "d"]
    needs = [["a", "b"], ["a", "c"], ["b", "d"], ["c", "d"], ["a"]]
    perfect = torch.tensor([[float(f in need) * (1 + k) for k, f in enumerate(names)] for need in needs])
    assert multi_factor_recall(perfect, needs, names) == 1.0 and factor_auc(perfect, needs, names, names) == 1.0
    # one-hot: each example on the component of its first factor; never two components, and the second factor
    # ties with the absent ones: AUC (1 + 0.5) / 2 against each of the two other factors
    one_hot = torch.tensor([[float(f == need[0]) for f in names] for need in needs])
    assert multi_factor_recall(one_hot, needs, names) == 0.0
    assert factor_auc(one_hot, needs, names, names) == pytest.approx(0.75)
    # a factor no component is named by has mass 0; a component named by no factor of the universe adds none
    assert factor_auc(perfect, needs, ["a", "b", "c", None], names) < 1.0
    g = torch.Generator().manual_seed(0)
    random_needs = [sorted(torch.randperm(6, generator=g)[:2].tolist()) for _ in range(400)]
    random_needs = [[str(f) for f in need] for need in random_needs]
    W = torch.rand(400, 6, generator=g, dtype=torch.float64)
    assert factor_auc(W, random_needs, [str(j) for j in range(6)], [str(j) for j in range(6)]) == pytest.approx(0.5, abs=0.04)
    assert factor_auc(perfect, [["a"]] * 5, names, names) is None


def test_label_metrics_report_both_namings_and_the_auc():
    strata = ["a"] * 10 + ["b"] * 10 + ["c"] * 10 + ["a+b"] * 10
    factors = [["a"]] * 10 + [["b"]] * 10 + [["c"]] * 10 + [["a", "b"]] * 10
    train = torch.zeros(40, 3, dtype=torch.float64)
    train[:10, 0], train[10:20, 1], train[20:30, 2] = 1.0, 1.0, 1.0  # components a, b, c; the pairs take none
    test = torch.tensor([[1.0, 0.5, 0.1]] * 4 + [[1.0, 0.0, 0.0]] * 4, dtype=torch.float64)
    d = FixedDictionary("m", train, strata, test, factors)
    metrics = label_metrics(d, test, _examples(["a+b"] * 4 + ["a"] * 4, [["a", "b"]] * 4 + [["a"]] * 4), k=10)
    assert metrics["multi_factor_recall"] == 1.0 and metrics["factor_auc"] == 1.0
    assert metrics["multi_factor_recall_by_stratum"] == 1.0  # the components are single strata here
    no_factors = label_metrics(d, test, _examples(["a"] * 8), k=10)
    assert no_factors["multi_factor_recall"] is None and no_factors["factor_auc"] is None


def test_train_ami_scores_the_training_assignment():
    clusters = [0] * 30 + [1] * 30 + [2] * 30
    d = FixedDictionary("t", _one_hot(clusters, 3), LABELS, None)
    assert train_ami(d) == pytest.approx(1.0)
    shuffled = FixedDictionary("s", _one_hot([c for c in reversed(clusters[::2] + clusters[1::2])], 3), LABELS, None)
    assert train_ami(shuffled) < train_ami(d)


def test_component_labels_come_from_the_top_training_examples():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.0], [0.0, 1.0], [0.1, 0.0]], dtype=torch.float64)
    d = FixedDictionary("c", train, ["x", "x", "y", "y"], train)
    assert component_labels(d, k=2) == ["x", "y"]


def test_hungarian_matching_recovers_a_permutation():
    g = torch.Generator().manual_seed(1)
    A = torch.rand(200, 5, generator=g, dtype=torch.float64)
    B = A[:, [3, 0, 4, 1, 2]] + 0.01 * torch.rand(200, 5, generator=g, dtype=torch.float64)
    rows, cols, corr = match_coefficients(A, B)
    assert dict(zip(rows, cols)) == {3: 0, 0: 1, 4: 2, 1: 3, 2: 4}
    assert min(corr) > 0.99


def test_compare_builds_and_saves_the_table(tmp_path):
    clusters = [0] * 30 + [1] * 30 + [2] * 30
    good = _one_hot(clusters, 3)
    bad = torch.rand(90, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dictionaries = [FixedDictionary("good", good, LABELS, good), FixedDictionary("bad", bad, LABELS, bad)]
    table = compare(dictionaries, _examples(LABELS), out=tmp_path / "cmp")
    assert list(table["method"]) == ["good", "bad"]
    assert table.loc[0, "ami"] == pytest.approx(1.0) and table.loc[1, "ami"] < 0.2
    assert table.loc[0, "matched_corr_bad"] == table.loc[1, "matched_corr_good"]  # symmetric
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [row["method"] for row in saved["rows"]] == ["good", "bad"]
    assert (tmp_path / "cmp" / "comparison.csv").read_text().startswith("method,")
    relabeled = compare(dictionaries, _examples(["x"] * 90), labels=LABELS)  # labels= replaces the examples' labels
    assert relabeled.loc[0, "ami"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="names must be unique"):
        compare([dictionaries[0], dictionaries[0]], _examples(LABELS))


@pytest.mark.filterwarnings("ignore::npeff_tl.ConvergenceWarning")  # 300 iterations: enough to tell 10 from 8 and 12
def test_split_half_stability_peaks_at_the_planted_number_of_components():
    """Label-free: on planted D-PEFs with 10 components, two fits to disjoint halves agree at 10 and disagree at
    8 (pairs merged differently in each half) and at 12 (noise split differently)."""
    from helpers.planted import planted_diagonal

    A, _, _ = planted_diagonal(0, noise=0.3)
    pefs = nt.DiagonalPEFs.from_dense(A.float())
    scores = {}
    for r in (8, 10, 12):
        scores[r] = nt.split_half_stability(nt.DNPEFF(r, max_iter=300), pefs, seed=0)
    assert scores[10].coefficient_correlation > 0.99 and scores[10].component_cosine > 0.99, scores[10]
    assert max(scores[8].coefficient_correlation, scores[12].coefficient_correlation) < 0.9, scores
    assert len(scores[12].correlations) == 12 and scores[12].correlations == tuple(sorted(scores[12].correlations,
                                                                                         reverse=True))


@pytest.mark.filterwarnings("ignore::npeff_tl.ConvergenceWarning")
def test_split_half_stability_compares_fits_that_kept_different_columns():
    """Sparse PEFs: each half's fit drops the columns its examples never use, so the fits' columns differ."""
    from helpers.planted import planted_diagonal

    A, _, _ = planted_diagonal(1, n=120, noise=0.3)
    pefs = nt.DiagonalPEFs.from_dense(A.float(), nnz=12)
    fits = [nt.DNPEFF(6, max_iter=50).fit(pefs.subset(half), progress=False) for half in (range(0, 120, 2),
                                                                                        range(1, 120, 2))]
    assert fits[0].kept_columns.shape != fits[1].kept_columns.shape or (fits[0].kept_columns != fits[1].kept_columns).any()
    score = nt.split_half_stability(nt.DNPEFF(6, max_iter=50), pefs, seed=1)
    assert 0 < score.component_cosine <= 1 + 1e-9 and -1 <= score.coefficient_correlation <= 1


def test_split_half_stability_refuses_too_few_examples():
    pefs = nt.DiagonalPEFs.from_dense(torch.rand(3, 20))
    with pytest.raises(ValueError, match="at least 4 examples"):
        nt.split_half_stability(nt.DNPEFF(2), pefs)
