"""Selectivity: the D-NPEFF perturbation against its formula (docs/algorithms.md, "Perturbations"), the
magnitude search, and the whole measurement on a zoo model, re-derived record by record from plain KL
computations."""

import math
from types import SimpleNamespace

import pytest
import torch

import npeff_tl as nt
from npeff_tl.interventions import calibrate_magnitude
from helpers.oracles import tl_grad


def test_calibration_hits_the_target_from_far_below_and_far_above():
    for start in (1e-6, 1e4):
        m, kl, reached = calibrate_magnitude(lambda m: 3.0 * m * m, 0.5, start, rtol=0.01)
        assert reached and kl == pytest.approx(0.5, rel=0.01) and 3.0 * m * m == kl


def test_calibration_reports_a_target_it_cannot_reach():
    m, kl, reached = calibrate_magnitude(lambda m: min(m, 0.2), 0.5, 1e-3, max_steps=30)
    assert not reached and kl == 0.2 and m >= 0.2


def test_the_dnpeff_direction_is_the_fisher_weighted_merge_of_the_reference():
    space = nt.ParamSpace.from_shapes({"w": (6,)})
    h = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0, 0.0], dtype=torch.float64)
    dec = nt.Decomposition(kind="diagonal", W=torch.ones(3, 1, dtype=torch.float64), components=h[None, 1:5],
                           kept_columns=torch.arange(1, 5), space=space)
    fisher = torch.tensor([1.0, 0.0, 4.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0, 1.0, 0.0, 1.0, -1.0], dtype=torch.float64)
    theta = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mix, delta, floor = 0.3, 0.7, 1e-6
    h_unit = h / h.norm()
    f_unit = (fisher / fisher.norm()).clamp(min=floor)
    merged = ((1 - mix) * f_unit * theta + mix * h_unit * (theta - delta * signs)) / ((1 - mix) * f_unit + mix * h_unit)
    d = nt.dnpeff_direction(dec, 0, fisher, signs, mix, floor)
    assert torch.allclose(theta + delta * d, merged, atol=1e-12)
    assert d[1] == pytest.approx(1.0, rel=1e-4)  # the component alone (F = 0, floored): the full step, minus the sign
    assert d[0] == 0 and d[5] == 0 and d[3] == 0  # off the component, or no sign
    with pytest.raises(ValueError, match=r"mix must be in \(0, 1\)"):
        nt.dnpeff_direction(dec, 0, fisher, signs, 1.0)


def test_the_sign_pattern_is_the_sign_of_the_summed_loss_gradient(model64, tokens):
    space = nt.ParamSpace(model64, include=["blocks.*.mlp.W_in", "blocks.0.attn.W_Q"])
    answers = torch.arange(len(tokens)) % 23
    pattern = nt.sign_pattern(model64, tokens, space, answers, batch_size=3)
    logits = model64(tokens)[:, -1]
    expected = tl_grad(model64, torch.nn.functional.cross_entropy(logits, answers, reduction="sum"),
                       space.names).sign()
    assert torch.equal(pattern, expected.double())


@pytest.fixture(scope="module", params=["diagonal", "lowrank"])
def measured(request):
    torch.manual_seed(0)
    model, data = nt.zoo.load("tasks-2l", n_train=24, n_test=36)
    train = nt.LabeledExamples.from_dataset(data["train"])
    heldout = nt.LabeledExamples.from_dataset(data["test"])
    space = nt.ParamSpace(model, include=["blocks.*.attn.W_[QKVO]", "blocks.*.mlp.W_*"])
    target = nt.Target("last", nt.TopK(4))
    pefs = nt.compute_pefs(model, train.examples, space, target, request.param, nnz=4096, progress=False)
    heldout_pefs = nt.compute_pefs(model, heldout.examples, space, target, request.param, nnz=4096, progress=False)
    solver = nt.DNPEFF(4, max_iter=200) if request.param == "diagonal" else nt.LRMNPEFF(4, n_iters_joint=200)
    dec = solver.fit(pefs, progress=False)
    coefficients = dec.fit_coefficients(heldout_pefs, progress=False)
    dictionary = nt.NPEFFDictionary(model, dec, train, target, pefs, mix_grid=(0.3, 0.7))
    config = nt.SelectivityConfig(kl_targets=(0.5,), n_baseline=200)
    result = nt.measure_selectivity(dictionary, heldout, config=config, progress=False)
    return SimpleNamespace(model=model, dec=dec, train=train, heldout=heldout, coefficients=coefficients,
                           fisher=pefs.dataset_fisher, config=config, result=result, dictionary=dictionary,
                           target=target, pefs=pefs)


def test_npeff_components_are_more_selective_than_both_controls(measured):
    result = measured.result
    medians = result.medians()
    method = result.settings["method"]
    assert set(medians) == {method, "random", "random_support"}
    for control in ("random", "random_support"):
        assert medians[method]["selectivity"] > 10 * medians[control]["selectivity"]
        assert medians[method]["strategy_selectivity"] > 10 * medians[control]["strategy_selectivity"]
    for record in result.records:  # both signs calibrated to the target on the top set
        if record["method"] == method:
            assert record["calibrated_plus"] and record["calibrated_minus"]
            for suffix in ("_plus", "_minus"):
                assert record["top_kl" + suffix] == pytest.approx(0.5, rel=0.05)


def test_a_record_is_what_plain_kl_computations_give(measured):
    model, dec, heldout, coefficients, config, result = (
        measured.model, measured.dec, measured.heldout, measured.coefficients, measured.config, measured.result)
    record = next(r for r in result.records if r["method"] == "random_support")
    j = record["component"]
    top = coefficients[:, j].topk(config.n_top).indices
    rest = torch.tensor([i for i in range(len(heldout)) if i not in set(top.tolist())])
    baseline = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(j))[: config.n_baseline]]
    support = dec.full(j) != 0
    direction = nt.random_direction(dec.space, seed=j, support=support)
    ratios = []
    for sign in (1, -1):
        step = nt.perturb(model, direction, dec.space, record["magnitude_plus" if sign == 1 else "magnitude_minus"], sign)
        kl = nt.kl_divergence(model, heldout.examples, step)
        ratios.append(float(kl[top].mean() / kl[baseline].mean()))
        in_strategy = torch.tensor([s == record["strategy"] for s in heldout.labels])
        strategy_ratio = float(kl[in_strategy].mean() / kl[~in_strategy].mean())
        suffix = "_plus" if sign == 1 else "_minus"
        assert record["selectivity" + suffix] == pytest.approx(ratios[-1], rel=1e-6)
        assert record["strategy_selectivity" + suffix] == pytest.approx(strategy_ratio, rel=1e-6)
    assert record["selectivity"] == pytest.approx(max(ratios), rel=1e-6)


def test_normalised_figures_divide_by_the_sets_fisher_trace_ratio(measured):
    result, heldout, coefficients, config = measured.result, measured.heldout, measured.coefficients, measured.config
    traces = nt.fisher_traces(measured.model, heldout.examples, measured.dec.space, config.trace_classes)
    for record in result.records:
        j = record["component"]
        top = coefficients[:, j].topk(config.n_top).indices
        rest = torch.tensor([i for i in range(len(heldout)) if i not in set(top.tolist())])
        baseline = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(j))[: config.n_baseline]]
        in_strategy = torch.tensor([s == record["strategy"] for s in heldout.labels])
        ratio = float(traces[top].mean() / traces[baseline].mean())
        strategy_ratio = float(traces[in_strategy].mean() / traces[~in_strategy].mean())
        assert record["trace_ratio"] == pytest.approx(ratio, rel=1e-9)
        assert record["strategy_trace_ratio"] == pytest.approx(strategy_ratio, rel=1e-9)
        assert record["norm_selectivity"] == pytest.approx(record["selectivity"] / ratio, rel=1e-9)
        assert record["norm_strategy_selectivity"] == pytest.approx(record["strategy_selectivity"] / strategy_ratio,
                                                                    rel=1e-9)


def test_random_directions_score_about_one_once_normalised(measured):
    """Averaged over random directions (one direction alone is noisy: a PEF has rank <= 4 here), a random step's
    KL ratio between a component's two sets is their Fisher-trace ratio: normalised, about 1; raw, far from it."""
    model, heldout, coefficients, config = measured.model, measured.heldout, measured.coefficients, measured.config
    space = measured.dec.space
    steps = [nt.perturb(model, nt.random_direction(space, seed=100 + s), space, 0.05) for s in range(24)]
    kl = torch.stack([nt.kl_divergence(model, heldout.examples, step) for step in steps]).mean(0)
    normalised, raw = [], []
    for record in (r for r in measured.result.records if r["method"] == "random"):
        j = record["component"]
        top = coefficients[:, j].topk(config.n_top).indices
        rest = torch.tensor([i for i in range(len(heldout)) if i not in set(top.tolist())])
        baseline = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(j))[: config.n_baseline]]
        in_strategy = torch.tensor([s == record["strategy"] for s in heldout.labels])
        for sets, trace_ratio in (((top, baseline), record["trace_ratio"]),
                                  ((in_strategy, ~in_strategy), record["strategy_trace_ratio"])):
            raw.append(float(kl[sets[0]].mean() / kl[sets[1]].mean()))
            normalised.append(raw[-1] / trace_ratio)
    assert all(0.67 <= x <= 1.5 for x in normalised), normalised
    assert max(abs(math.log(x)) for x in raw) > 1.0, raw  # without the normalisation some are off by e^1 or more


def test_the_strategy_matrices_are_per_strategy_means(measured):
    model, dec, heldout, train, result = measured.model, measured.dec, measured.heldout, measured.train, measured.result
    method = result.settings["method"]
    row = 0
    j = result.components[row]
    record = next(r for r in result.records if r["method"] == method and r["component"] == j)
    sign = record["sign"]
    if dec.kind == "diagonal":  # the sign pattern of the top training examples, the mix the measurement chose
        top = dec.W[:, j].topk(20).indices
        signs = nt.sign_pattern(model, train.examples.subset(top), dec.space, train.answers[top])
        direction = nt.dnpeff_direction(dec, j, measured.fisher, signs, record["mix"])
    else:
        direction = nt.lrm_direction(dec, j)
    step = nt.perturb(model, direction, dec.space, record["magnitude_plus" if sign == 1 else "magnitude_minus"], sign)
    kl = nt.kl_divergence(model, heldout.examples, step)
    top = measured.coefficients[:, j].topk(measured.config.n_top).indices
    assert float(kl[top].mean()) == pytest.approx(record["top_kl_plus" if sign == 1 else "top_kl_minus"], rel=1e-6)
    answers = heldout.answers
    before = nt.interventions.accuracy(model, heldout.examples, answers)
    with step:
        after = nt.interventions.accuracy(model, heldout.examples, answers)
    for col, strategy in enumerate(result.strategies):
        mask = torch.tensor([s == strategy for s in heldout.labels])
        assert float(result.kl_matrix[method][row, col]) == pytest.approx(float(kl[mask].mean()), rel=1e-6, abs=1e-12)
        drop = float(before[mask].mean() - after[mask].mean())
        assert float(result.accuracy_drop[method][row, col]) == pytest.approx(drop, abs=1e-12)


def test_results_save_and_load(measured, tmp_path):
    result = measured.result
    back = nt.load_selectivity(result.save(tmp_path / "sel"))
    assert back.records == result.records and back.strategies == result.strategies
    assert all(back.kl_matrix[m].equal(result.kl_matrix[m]) for m in result.kl_matrix)
    assert back.medians() == result.medians()
    frame = result.to_frame()
    assert len(frame) == len(result.records) and {"method", "selectivity", "strategy_selectivity"} <= set(frame)


def test_bad_inputs_are_clear_errors(measured):
    m = measured
    with pytest.raises(ValueError, match="coefficients for .* examples but train has"):
        nt.NPEFFDictionary(m.model, m.dec, m.heldout, m.target, m.pefs)
    with pytest.raises(ValueError, match="too few for a top set"):
        nt.measure_selectivity(m.dictionary, m.heldout, config=nt.SelectivityConfig(n_baseline=10_000))
    with pytest.raises(ValueError, match=r"components \[99\] do not exist"):
        nt.measure_selectivity(m.dictionary, m.heldout, components=[99])
    if m.dec.kind == "diagonal":
        with pytest.raises(ValueError, match="need the dataset-level Fisher"):
            nt.NPEFFDictionary(m.model, m.dec, m.train, m.target)
    with pytest.raises(ValueError, match="mix must be 'auto' or a float"):
        nt.NPEFFDictionary(m.model, m.dec, m.train, m.target, m.pefs, mix=1.5)
    with pytest.raises(ValueError, match="unknown controls"):
        nt.SelectivityConfig(controls=("gaussian",))
    with pytest.raises(ValueError, match="kl_targets must be positive"):
        nt.SelectivityConfig(kl_targets=(0.0,))


def test_calibration_stops_at_the_limit():
    calls = []

    def mean_kl(m):
        calls.append(m)
        return 1e-3 * m

    m, kl, reached = calibrate_magnitude(mean_kl, 0.5, 1.0, limit=100.0)
    assert not reached and max(calls) == 100.0 and m == 100.0 and len(calls) == 5  # 1, 4, 16, 64, 100


def test_a_target_out_of_reach_leaves_the_sign_out(measured):
    m = measured
    dictionary = nt.NPEFFDictionary(m.model, m.dec, m.train, m.target, m.pefs, mix=0.5, max_relative_magnitude=1e-6)
    result = nt.measure_selectivity(dictionary, m.heldout, components=[0], progress=False,
                                    config=nt.SelectivityConfig(kl_targets=(0.5,)))
    for record in result.records:
        assert record["selectivity"] is None and record["magnitude_plus"] is None and record["sign"] is None
    assert [r["calibrated_plus"] for r in result.records] == [False, None, None]
    assert all(v["selectivity"] is None for v in result.medians().values())
    assert all(torch.isnan(matrix).all() for matrix in result.kl_matrix.values())


def test_logit_effects_are_what_a_hand_perturbed_model_predicts(measured):
    """Oracle: the weights moved by hand (theta + sign * m * d / ||d||), one example at a time, then restored."""
    from npeff_tl.effects import logit_effects

    model, dictionary, heldout = measured.model, measured.dictionary, measured.heldout
    effects = logit_effects(dictionary, heldout, measured.result, measured.coefficients, n_examples=5, k=3)
    measured_components = {r["component"] for r in measured.result.records if r.get("sign") is not None}
    assert effects and {e.component for e in effects} == measured_components
    examples = heldout.examples

    def log_probs(i):
        seq, position = int(examples.seq_index[i]), int(examples.position[i])
        tokens = examples.tokens[seq, : int(examples.lengths[seq])][None]
        with torch.no_grad():
            return model(tokens)[0, position].double().log_softmax(-1)

    for effect in effects:
        top = measured.coefficients[:, effect.component].topk(5).indices.tolist()
        assert effect.examples == top
        before = torch.stack([log_probs(i) for i in top])
        direction = dictionary.direction(effect.component).double()
        step = dictionary.space.to_named(direction * (effect.sign * effect.magnitude / direction.norm()))
        params = nt.as_adapter(model).named_parameters()  # TL-layout views of the model's parameters
        saved = {name: params[name].detach().clone() for name in step}
        with torch.no_grad():
            for name, delta in step.items():
                params[name] += delta.to(params[name].dtype)
        after = torch.stack([log_probs(i) for i in top])
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        delta = (after - before).mean(0)
        assert float(delta.abs().max()) > 1e-3  # the perturbation moves these predictions
        assert [t for t, _ in effect.promoted] == delta.topk(3).indices.tolist()
        assert [t for t, _ in effect.suppressed] == (-delta).topk(3).indices.tolist()
        assert [v for _, v in effect.promoted] == pytest.approx(delta.topk(3).values.tolist(), rel=1e-4, abs=1e-6)
        assert [t for t, _ in effect.after] == after.argmax(-1).tolist()
        assert [p for _, p in effect.before] == pytest.approx(before.max(-1).values.exp().tolist(), rel=1e-6)
