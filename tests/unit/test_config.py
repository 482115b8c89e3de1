"""The run's settings: library settings classes nested in RunConfig, reachable from TOML and --set, checked where
they enter; earlier names still read."""

import dataclasses
import logging
import tomllib

import pytest

import npeff_tl as nt
from npeff_tl.config import RunConfig, to_toml
from npeff_tl.targets import ClassRule


def test_every_solver_and_selectivity_setting_reaches_the_run_from_toml():
    text = """
[fit]
n_components = 5
seed = 3
[fit.dnpeff]
max_iter = 77
tol = 0.001
[fit.lrm_npeff]
lr = 0.25
n_iters_joint = 12
[selectivity]
rtol = 0.1
reverse_kl = true
n_measured = 4
trace_classes = {rule = "TopK", k = 3}
"""
    config = RunConfig.from_dict(tomllib.loads(text))
    assert config.fit.solver("dnpeff") == nt.DNPEFF(5, max_iter=77, tol=1e-3, seed=3)
    assert config.fit.solver("lrm_npeff") == nt.LRMNPEFF(5, lr=0.25, n_iters_joint=12, seed=3)
    assert isinstance(config.selectivity, nt.SelectivityConfig)
    assert (config.selectivity.rtol, config.selectivity.reverse_kl, config.selectivity.n_measured) == (0.1, True, 4)
    assert config.selectivity.trace_classes == nt.TopK(3)


def test_the_printed_settings_load_back_and_name_every_library_field():
    config = RunConfig().with_overrides(["fit.dnpeff.h_threshold=0.01", "selectivity.controls=[\"random\"]"])
    text = to_toml(config)
    assert RunConfig.from_dict(tomllib.loads(text)) == config
    for settings, table in ((nt.DNPEFF, "fit.dnpeff"), (nt.LRMNPEFF, "fit.lrm_npeff")):
        keys = set(tomllib.loads(text)["fit"][table.split(".")[1]])
        assert keys == {f.name for f in dataclasses.fields(settings)} - {"n_components", "seed"}
    assert set(tomllib.loads(text)["selectivity"]) == {f.name for f in dataclasses.fields(nt.SelectivityConfig)} | {
        "n_measured", "circuit_method", "dnpeff_mixes"}


@pytest.mark.parametrize("override, message", [
    ("fit.dnpeff.n_components=3", "fit.dnpeff.n_components is set by fit.n_components for every method"),
    ("fit.lrm_npeff.seed=1", "fit.lrm_npeff.seed is set by fit.seed"),
    ("fit.dnpeff.tol=small", "config key fit.dnpeff.tol must be float, got 'small'"),
    ("fit.dnpeff.max_iter=0", "config fit.dnpeff: max_iter must be >= 1, got 0"),
    ("fit.lrm_npeff.dtype=float16", "dtype must be \"float32\" or \"float64\", got 'float16'"),
    ("fit.lrm_npeff.speed=2", "unknown config key fit.lrm_npeff.speed; fit.lrm_npeff has n_iters_g_only"),
    ("selectivity.n_measured=0", "n_measured must be >= 1, got 0"),
    ("selectivity.circuit_method=\"atp**\"", "circuit_method must be one of"),
    ("selectivity.dnpeff_mixes=[0.5, 1.0]", "dnpeff_mixes must be one or more weights in (0, 1), got [0.5, 1.0]"),
    ("selectivity.dnpeff_mixes=[]", "dnpeff_mixes must be one or more weights in (0, 1), got []"),
    ("selectivity.trace_classes=4", "selectivity.trace_classes must be a class rule table"),
    ("selectivity.trace_classes={\"rule\": \"Top\"}", "class rule 'Top' is unknown"),
    ("fit", "write section.key=value"),
])
def test_bad_nested_settings_are_refused_where_they_enter(override, message):
    with pytest.raises(ValueError) as error:
        RunConfig().with_overrides([override])
    assert message in str(error.value)


def test_solver_settings_out_of_range_are_refused_when_made():
    for make, message in ((lambda: nt.DNPEFF(0), "n_components must be >= 1"),
                          (lambda: nt.DNPEFF(4, eps=0.0), "eps must be > 0"),
                          (lambda: nt.LRMNPEFF(4, lr=-1.0), "lr must be > 0"),
                          (lambda: nt.LRMNPEFF(4, n_iters_joint=-1), "n_iters_joint must be >= 0")):
        with pytest.raises(ValueError, match=message):
            make()


def test_class_rules_round_trip_through_their_dict():
    for rule in (nt.TopK(3), nt.Threshold(0.1, max_k=5), nt.Candidates((4, 9)), nt.Sampled(6, seed=2),
                 nt.TopKWithTail(4, 12, seed=1)):
        assert ClassRule.from_dict(rule.to_dict()) == rule
    with pytest.raises(ValueError, match="class rule TopK: .*unexpected keyword"):
        ClassRule.from_dict({"rule": "TopK", "kk": 3})


def test_earlier_names_are_read_with_a_warning(caplog):
    old = {"fit": {"methods": ["dnpeff"], "components": 7, "seed": 1},
           "perturb": {"n_top": 5, "n_baseline": 40, "kl_targets": [0.5], "components": 2, "seed": 0}}
    with caplog.at_level(logging.WARNING, logger="npeff_tl.config"):
        config = RunConfig.from_dict(old)
    assert config.fit.n_components == 7 and config.selectivity.n_measured == 2 and config.selectivity.n_top == 5
    assert config.selectivity.kl_targets == (0.5,)
    assert "config section 'perturb' is now called 'selectivity'" in caplog.text
    assert "fit.components is now called fit.n_components" in caplog.text
    assert RunConfig().with_overrides(["perturb.components=3"]).selectivity.n_measured == 3


def test_every_zoo_entrys_demo_settings_are_valid_settings():
    """`npeff-tl demo --model NAME` applies the entry's label-free NPEFF settings, then its demo settings: each
    must be a setting the run accepts."""
    from npeff_tl import zoo

    for entry in zoo.ENTRIES.values():  # a bad key or value raises here
        nt.RunConfig().with_overrides([*entry.label_free_settings, *entry.demo])
    entry = zoo.entry("smollm2-135m")
    smollm2 = nt.RunConfig().with_overrides([*entry.label_free_settings, *entry.demo])
    assert smollm2.pefs.include == smollm2.compare.gradient_include == [f"blocks.{layer}.mlp.W_*"
                                                                         for layer in range(5, 30, 6)]
    assert (smollm2.data.per_task, smollm2.selectivity.circuit_method, smollm2.selectivity.n_baseline) == (5, "atp", 50)
    assert smollm2.selectivity.dnpeff_mixes == (0.1, 0.5, 0.9) and smollm2.pefs.class_rule() == nt.TopK(2)
