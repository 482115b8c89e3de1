"""SAE baselines through SAE-Lens: offline training in seconds, save/load, the splice, coefficients, evaluations."""

import time

import pytest
import torch

import npeff_tl as nt
from npeff_tl.baselines.sae import SAEDictionary, evaluate_sae, load_sae, train_sae

HOOK = "blocks.1.hook_resid_pre"
pytestmark = pytest.mark.sae


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model, data = nt.zoo.load("tasks-2l", n_train=16, n_test=16)
    train = nt.LabeledExamples.from_dataset(data["train"])
    out = tmp_path_factory.mktemp("sae") / "topk"
    start = time.perf_counter()
    sae = train_sae(model, train, HOOK, d_sae=32, k=4, steps=300, batch_size=128, out=out, progress=False)
    seconds = time.perf_counter() - start
    return model, train, nt.LabeledExamples.from_dataset(data["test"]), sae, out, seconds


def test_training_is_offline_and_takes_seconds(trained):
    *_, sae, out, seconds = trained
    assert seconds < 60
    assert sae.cfg.metadata.hook_name == HOOK and sae.cfg.d_sae == 32
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_loading_from_disk_round_trips(trained):
    *_, sae, out, _ = trained
    back = load_sae(out)
    assert type(back) is type(sae) and back.cfg.metadata.hook_name == HOOK
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name))
    with pytest.raises(FileNotFoundError, match="holds no SAE"):
        load_sae(out.parent)


def test_coefficients_are_feature_activations_at_the_target(trained):
    model, train, test, sae, _, _ = trained
    d = SAEDictionary(model, sae, train)
    assert isinstance(d, nt.Dictionary) and d.n_components == 32 and d.name == "sae_32"
    _, cache = model.run_with_cache(test.examples.tokens, names_filter=[HOOK])
    features = sae.encode(cache[HOOK])[test.examples.seq_index, test.examples.position].double()
    assert torch.allclose(d.coefficients(test), features.clamp(min=0), atol=1e-6)
    pooled = SAEDictionary(model, sae, train, pooling="max").coefficients(test)
    assert bool((pooled >= d.coefficients(test) - 1e-9).all())  # the max over positions up to the target


def test_the_splice_keeps_the_error_term(trained):
    model, train, test, sae, _, _ = trained
    d = SAEDictionary(model, sae, train)
    tokens = test.examples.tokens
    with torch.no_grad():
        clean = model(tokens)
    with torch.no_grad(), d.intervention(3, 0.0):
        assert torch.allclose(model(tokens), clean, atol=1e-5)  # nothing ablated: logits unchanged
    j = int(d.coefficients(test).sum(0).argmax())  # a feature that fires on these examples
    with torch.no_grad(), d.intervention(j, 1.0, sign=1):
        ablated = model(tokens)

    def remove_feature(x, hook):  # decode is affine, so ablating feature j subtracts f_j W_dec[j]
        return x - sae.encode(x)[..., j:j + 1] * sae.W_dec[j]

    with torch.no_grad():
        expected = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, remove_feature)])
    assert torch.allclose(ablated, expected, atol=1e-4) and float((ablated - clean).abs().max()) > 1e-3
    assert torch.equal(model(tokens), clean)  # hooks removed on exit


def test_sae_lens_evaluations(trained):
    model, _, test, sae, _, _ = trained
    figures = evaluate_sae(model, sae, test)
    assert set(figures) == {"ce_loss_recovered", "explained_variance", "l0"}
    assert 0 < figures["l0"] <= 4 + 1e-6  # TopK with k = 4
    assert figures["explained_variance"] < 1 and figures["ce_loss_recovered"] == figures["ce_loss_recovered"]


def test_standard_saes_and_errors(trained):
    model, train, _, _, _, _ = trained
    sae = train_sae(model, train, HOOK, d_sae=16, architecture="standard", steps=50, progress=False)
    assert type(sae).__name__ == "StandardSAE"
    with pytest.raises(ValueError, match="architecture must be"):
        train_sae(model, train, HOOK, d_sae=16, architecture="jumprelu")
    with pytest.raises(ValueError, match="unknown hook"):
        train_sae(model, train, "blocks.7.hook_resid_pre", d_sae=16)
    with pytest.raises(ValueError, match="needs 1 <= k <= d_sae, got k=8 with d_sae=4"):
        train_sae(model, train, HOOK, d_sae=4, k=8)
    sae.cfg.metadata.hook_name = None
    with pytest.raises(ValueError, match="has no hook"):
        SAEDictionary(model, sae, train)


def test_without_sae_lens_the_sae_rows_are_left_out_with_a_warning_and_direct_use_says_how_to_install(
        monkeypatch, caplog):
    import sys

    from npeff_tl.baselines import factory, sae
    from npeff_tl.config import CompareConfig

    model, data = nt.zoo.load("tasks-2l", n_train=4, n_test=4)
    train = nt.LabeledExamples.from_dataset(data["train"])
    monkeypatch.setattr(factory, "sae_lens_available", lambda: False)
    config = CompareConfig(sae_widths=[8], sae_k=[2], gradient_clustering=False)
    built = factory.build_baselines(model, train, train, config, 3, lambda width, hook: None)
    assert [d.name for d in built] == ["activation_kmeans"]
    assert "SAE baselines left out: SAE-Lens is not installed here" in caplog.text
    assert "pip install 'npeff-tl[sae]'" in caplog.text
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # what an environment without SAE-Lens does on import
    with pytest.raises(ImportError, match=r"SAE baselines need SAE-Lens.*pip install 'npeff-tl\[sae\]'"):
        train_sae(model, train, HOOK, d_sae=8, k=2, steps=1, out=None, progress=False)
