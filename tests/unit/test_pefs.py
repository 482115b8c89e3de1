import json
import re

import pytest
import torch

import npeff_tl.pefs.compute as compute_module
from npeff_tl import (
    Candidates, DiagonalPEFs, Examples, FormatError, LowRankPEFs, ParamSpace, Sampled, Target, Threshold, TopK,
    TopKWithTail, compute_pefs, fisher_traces, load_pefs,
)
from helpers.models import unembed_bias
from helpers.oracles import dense_fishers

SPACE = ["blocks.*.attn.W_[QKV]", "blocks.1.mlp.W_in", "blocks.0.ln2.w"]


@pytest.fixture(scope="module")
def space(model64):
    return ParamSpace(model64, include=SPACE + unembed_bias(model64))


def _oracle(model, tokens, pefs, space, rule=None):
    ex = pefs.per_example
    candidates = list(rule.token_ids) if isinstance(rule, Candidates) else None
    return dense_fishers(model, tokens, ex["seq_index"], ex["position"], space, ex["class_ids"], ex["class_weights"],
                         candidates)


@pytest.mark.parametrize("rule", [TopK(3), Threshold(0.09, max_k=4), Candidates([3, 5, 8]), Sampled(5, seed=2),
                                  TopKWithTail(2, 4, seed=1)])
def test_pefs_equal_the_explicit_expectation(model64, tokens, space, rule):
    target = Target("last", rule)
    joint = space.size * rule.max_classes
    low = compute_pefs(model64, tokens, space, target, "lowrank", nnz=joint, batch_size=4, progress=False)
    diag = compute_pefs(model64, tokens, space, target, "diagonal", nnz=space.size, batch_size=4, progress=False)
    fisher, _ = _oracle(model64, tokens, low, space, rule)
    U = low.to_dense()  # nnz = classes x parameters: nothing was dropped
    assert torch.allclose(U.mT @ U, fisher, rtol=1e-9, atol=1e-13)  # U U^T in the column convention
    dense_diag = torch.diagonal(fisher, dim1=1, dim2=2)
    assert torch.allclose(diag.to_dense(), dense_diag, rtol=1e-9, atol=1e-14)
    assert torch.allclose(low.norms, fisher.flatten(1).norm(dim=1), rtol=1e-9)
    assert torch.allclose(diag.norms, dense_diag.norm(dim=1), rtol=1e-9)
    assert torch.allclose(diag.dataset_fisher, dense_diag.mean(0), rtol=1e-9, atol=1e-15)
    traces = torch.diagonal(fisher, dim1=1, dim2=2).sum(1)  # tr F_i of the dense PEF
    for pefs in (low, diag):
        assert torch.allclose(pefs.per_example["fisher_trace"], traces, rtol=1e-9)
    assert torch.allclose(fisher_traces(model64, tokens, space, rule, batch_size=3), traces, rtol=1e-9)
    assert torch.equal(low.ranks, (low.per_example["class_ids"] >= 0).sum(1))
    # nothing was dropped, so nothing was selected or sorted: every entry in parameter order
    everything = torch.arange(space.size).expand(len(tokens), -1)
    assert diag.row_order == "parameter" and torch.equal(diag.indices.long(), everything)
    assert torch.equal(low.indices.long(), everything.repeat(1, rule.max_classes))
    assert torch.equal(low.col_offsets, (torch.arange(rule.max_classes + 1) * space.size).expand(len(tokens), -1))
    if isinstance(rule, Threshold):
        assert len(set(low.ranks.tolist())) > 1, "the threshold rule should give examples of different ranks"


def test_sparsified_entries_are_exactly_the_top_nnz(model64, tokens, space):
    nnz = 40
    target = Target("last", TopK(3))
    diag = compute_pefs(model64, tokens, space, target, "diagonal", nnz=nnz, progress=False)
    low = compute_pefs(model64, tokens, space, target, "lowrank", nnz=nnz, progress=False)
    fisher, grads = _oracle(model64, tokens, low, space)
    dense_diag = torch.diagonal(fisher, dim1=1, dim2=2)
    top = dense_diag.topk(nnz, dim=1)
    assert diag.row_order == "descending" and "row_order" not in diag.metadata
    assert torch.allclose(diag.values, top.values, rtol=1e-9, atol=1e-15)  # descending, like the reference
    assert torch.equal(diag.indices.long(), top.indices)
    U = grads * low.per_example["class_weights"].sqrt()[..., None]  # [n, k, size]
    flat = U.flatten(1)
    chosen = flat.abs().topk(nnz, dim=1).indices.sort(dim=1).values
    assert torch.allclose(low.values, flat.gather(1, chosen), rtol=1e-9, atol=1e-15)
    assert torch.equal(low.indices.long(), chosen % space.size)
    assert torch.allclose(low.to_dense().flatten(1).gather(1, chosen), flat.gather(1, chosen), rtol=1e-9, atol=1e-15)
    # norms are taken before sparsification
    assert torch.allclose(diag.norms, dense_diag.norm(dim=1), rtol=1e-9)
    assert (diag.values.square().sum(1) < diag.norms.square()).all()


@pytest.mark.parametrize("kind", ["diagonal", "lowrank"])
def test_results_do_not_depend_on_batch_size(model64, tokens, space, kind):
    target = Target("last", Threshold(0.05, max_k=4))
    runs = [compute_pefs(model64, tokens, space, target, kind, nnz=64, batch_size=b, progress=False) for b in (1, 3, 8)]
    for other in runs[1:]:
        assert torch.equal(other.indices, runs[0].indices)
        assert torch.allclose(other.values, runs[0].values, rtol=1e-12, atol=0)
        assert torch.allclose(other.norms, runs[0].norms, rtol=1e-12, atol=0)
        for key, column in runs[0].per_example.items():
            assert torch.allclose(other.per_example[key].double(), column.double(), rtol=1e-12), key


def test_several_positions_per_sequence_share_a_pass(model64, space):
    ragged = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    examples = Examples.from_tokens(ragged, [[1, 5], [0, 2]])
    pefs = compute_pefs(model64, examples, space, Target(classes=TopK(2)), "diagonal", nnz=space.size, progress=False)
    one = compute_pefs(model64, [[1, 2, 3, 4, 5, 6]], space, Target(5, TopK(2)), "diagonal", nnz=space.size, progress=False)
    assert torch.allclose(pefs.to_dense()[1], one.to_dense()[0], rtol=1e-10, atol=1e-15)
    assert pefs.per_example["position"].tolist() == [1, 5, 0, 2]


@pytest.mark.parametrize("kind", ["diagonal", "lowrank"])
def test_save_load_round_trip_is_lossless(model64, tokens, space, kind, tmp_path):
    answers = torch.arange(len(tokens))
    pefs = compute_pefs(model64, tokens, space, Target(classes=TopK(3)), kind, nnz=50, answers=answers,
                        store_logits=True, progress=False)
    pefs.save(tmp_path / "p")
    back = load_pefs(tmp_path / "p")
    assert type(back) is type(pefs) and back.space == pefs.space
    assert back.metadata == pefs.metadata
    for name in pefs._row_fields:
        assert torch.equal(getattr(back, name), getattr(pefs, name)), name
    assert back.per_example.keys() == pefs.per_example.keys()
    for key in pefs.per_example:
        assert torch.equal(back.per_example[key], pefs.per_example[key]), key
    assert torch.equal(back.dataset_fisher, pefs.dataset_fisher)
    assert torch.equal(back.per_example["answer"], answers)
    pefs.save(tmp_path / "p")  # overwriting an existing save works and leaves no temporary directories
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


@pytest.mark.parametrize("kind", ["diagonal", "lowrank"])
def test_interrupted_store_resumes_to_the_same_result(model64, tokens, space, kind, tmp_path, monkeypatch):
    target = Target(classes=TopK(3))
    args = dict(nnz=30, batch_size=2, shard_size=4, progress=False)
    reference = compute_pefs(model64, tokens, space, target, kind, **args)
    real = compute_module._batch_pefs
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # the second batch of the second shard
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(compute_module, "_batch_pefs", flaky)
    with pytest.raises(KeyboardInterrupt):
        compute_pefs(model64, tokens, space, target, kind, store=tmp_path / "s", **args)
    with pytest.raises(FormatError, match="unfinished PEF store"):
        load_pefs(tmp_path / "s")
    calls.clear()
    monkeypatch.setattr(compute_module, "_batch_pefs", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = compute_pefs(model64, tokens, space, target, kind, store=tmp_path / "s", **args)
    assert len(calls) == 3  # shard 0 (4 examples) was kept; shards 1 and 2 (6 examples) = 3 batches of 2
    assert torch.equal(resumed.indices.long(), reference.indices.long())
    assert torch.equal(resumed.values, reference.values)
    assert torch.equal(resumed.dataset_fisher, reference.dataset_fisher)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "dataset_fisher.safetensors", "metadata.json", "shard_00000.safetensors", "shard_00001.safetensors",
        "shard_00002.safetensors",
    ]
    again = compute_pefs(model64, tokens, space, target, kind, store=tmp_path / "s", **args)  # complete: loads
    assert torch.equal(again.values, reference.values)


def test_stored_result_does_not_depend_on_batch_size(model64, tokens, space, tmp_path):
    a = compute_pefs(model64, tokens, space, nnz=30, batch_size=1, store=tmp_path / "a", shard_size=4, progress=False)
    b = compute_pefs(model64, tokens, space, nnz=30, batch_size=3, store=tmp_path / "b", shard_size=4, progress=False)
    assert torch.equal(a.indices, b.indices) and torch.allclose(a.values, b.values, rtol=1e-12, atol=0)


def test_resuming_with_other_settings_is_refused(model64, tokens, space, tmp_path):
    compute_pefs(model64, tokens, space, nnz=30, store=tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="holds a different run.*nnz"):
        compute_pefs(model64, tokens, space, nnz=31, store=tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="holds a different run"):
        compute_pefs(model64, tokens[:, :-1], space, nnz=30, store=tmp_path / "s", progress=False)


# ----------------------------------------------------------------------------------------- containers
def test_container_operations(model64, tokens, space):
    pefs = compute_pefs(model64, tokens, space, Target(classes=TopK(3)), "lowrank", nnz=60, progress=False)
    parts = [pefs.subset(slice(0, 4)), pefs.subset([4, 5, 6, 7, 8, 9])]
    joined = LowRankPEFs.concatenate(parts)
    assert torch.equal(joined.values, pefs.values) and torch.equal(joined.col_offsets, pefs.col_offsets)
    assert torch.allclose(joined.dataset_fisher, pefs.dataset_fisher)
    csr, row_offsets = pefs.to_csr(), pefs.row_offsets
    assert csr.layout == DiagonalPEFs.from_dense(pefs.to_dense()[:, 0].square()).to_csr().layout == torch.sparse_csr
    dense = pefs.to_dense()
    assert torch.equal(row_offsets[1:] - row_offsets[:-1], pefs.ranks)
    rows = torch.cat([dense[i, : pefs.ranks[i]] for i in range(len(pefs))])
    assert torch.equal(csr.to_dense(), rows)
    normed = pefs.normalized()
    full_norm = torch.linalg.matrix_norm(normed.to_dense().mT @ normed.to_dense())
    assert (full_norm <= 1 + 1e-9).all() and normed.is_normalized
    with pytest.raises(ValueError, match="already normalized"):
        normed.normalized()
    with pytest.raises(ValueError, match="different nnz"):
        LowRankPEFs.concatenate([pefs, compute_pefs(model64, tokens, space, Target(classes=TopK(3)), "lowrank", nnz=61, progress=False)])


def test_rows_in_parameter_order_store_and_convert_like_sorted_rows(model64, tokens, space, tmp_path):
    """nnz = the whole space keeps every entry in parameter order; the same rows sorted (as the synthetic
    constructor makes them) give the same dense and CSR matrices, and the layout survives a save."""
    pefs = compute_pefs(model64, tokens, space, Target(classes=TopK(3)), "diagonal", nnz=space.size, progress=False)
    sorted_rows = DiagonalPEFs.from_dense(pefs.to_dense(), space=space)
    assert sorted_rows.row_order == "descending"
    assert torch.equal(pefs.to_csr().to_dense(), sorted_rows.to_csr().to_dense())
    assert torch.equal(pefs.values.sort(dim=1, descending=True).values, sorted_rows.values)
    pefs.save(tmp_path / "p")
    assert load_pefs(tmp_path / "p").row_order == "parameter"
    sorted_rows.metadata = {key: value for key, value in pefs.metadata.items() if key != "row_order"}
    with pytest.raises(ValueError, match="differ in row_order"):
        DiagonalPEFs.concatenate([pefs, sorted_rows])


def test_synthetic_constructors():
    gen = torch.Generator().manual_seed(0)
    dense = torch.rand(5, 30, generator=gen) * (torch.rand(5, 30, generator=gen) < 0.3)
    from_dense = DiagonalPEFs.from_dense(dense, nnz=12)
    assert torch.allclose(from_dense.norms, dense.double().norm(dim=1))
    from_sparse = DiagonalPEFs.from_sparse(dense.to_sparse_csr())
    assert torch.equal(from_sparse.to_dense(), dense)
    assert torch.equal(DiagonalPEFs.from_dense(dense).to_csr().to_dense(), dense)
    unit = DiagonalPEFs.from_dense(dense).normalized().to_dense().double().norm(dim=1)
    assert torch.allclose(unit, torch.ones(5, dtype=torch.float64), atol=1e-6)
    factors = [torch.randn(k, 30, generator=gen, dtype=torch.float64) for k in (1, 3, 2)]
    low = LowRankPEFs.from_dense(factors)
    assert low.ranks.tolist() == [1, 3, 2] and low.max_rank == 3
    for i, f in enumerate(factors):
        assert torch.equal(low.to_dense()[i, : len(f)], f)
        assert torch.allclose(low.norms[i], torch.linalg.matrix_norm(f.T @ f))


# ----------------------------------------------------------------------------------------- bad input
def test_bad_input_errors(model64, tokens, space):
    size = space.size  # 2087 with the unembedding bias
    with pytest.raises(ValueError, match=rf"nnz=100000 must lie in \[1, {size}\].*has {size} parameters"):
        compute_pefs(model64, tokens, space, nnz=100_000, progress=False)
    with pytest.raises(ValueError, match=rf"nnz=100000 must lie in \[1, {3 * size}\].*{3 * size} classes x parameters"):
        compute_pefs(model64, tokens, space, Target(classes=TopK(3)), "lowrank", nnz=100_000, progress=False)
    with pytest.raises(ValueError, match="target position 20 is out of range"):
        compute_pefs(model64, tokens, space, Target(position=20), progress=False)
    with pytest.raises(ValueError, match="got 3 answers for 10 examples"):
        compute_pefs(model64, tokens, space, answers=torch.tensor([1, 2, 3]), progress=False)
    with pytest.raises(ValueError, match="kind must be"):
        compute_pefs(model64, tokens, space, kind="full", progress=False)
    with pytest.raises(ValueError, match="columns but the ParamSpace has"):
        DiagonalPEFs.from_dense(torch.rand(2, 5), space=ParamSpace.flat(6))
    with pytest.raises(ValueError, match="non-negative"):
        DiagonalPEFs.from_dense(-torch.rand(2, 5))


def test_nan_logits_are_reported(tokens):
    from helpers.models import make_model

    model = make_model()
    with torch.no_grad():
        model.embed.W_E[tokens[3, 0]] = float("nan")
    space = ParamSpace(model, include="blocks.0.mlp.W_in")
    poisoned = [i for i in range(len(tokens)) if (tokens[i] == tokens[3, 0]).any()]  # the last token sees them all
    with pytest.raises(ValueError, match=rf"NaN/inf logits for examples {re.escape(str(poisoned))}"):
        compute_pefs(model, tokens, space, progress=False)


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os

    from npeff_tl.store import save_json, save_tensors

    save_tensors({"x": torch.zeros(3)}, tmp_path / "x.safetensors")
    save_json({"x": 1}, tmp_path / "x.json")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("x.safetensors", "x.json"):  # as open(path, "w") would make them, not private
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name
    from npeff_tl.store import atomic_directory

    with atomic_directory(tmp_path / "d") as d:  # as os.mkdir would make it, not private
        (d / "a").write_text("a")
    assert os.stat(tmp_path / "d").st_mode & 0o777 == 0o777 & ~umask


def test_corrupt_and_foreign_files_are_reported(model64, tokens, space, tmp_path):
    pefs = compute_pefs(model64, tokens, space, nnz=20, progress=False)
    pefs.save(tmp_path / "ok")
    with pytest.raises(FormatError, match="not a directory of saved npeff_tl results"):
        load_pefs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="empty is not a saved npeff_tl result .npeff_tl.pefs.: it has no metadata.json"):
        load_pefs(tmp_path / "empty")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "metadata.json").write_text(json.dumps({"format": "sae_lens"}))
    with pytest.raises(FormatError, match="holds 'sae_lens', not 'npeff_tl.pefs'"):
        load_pefs(tmp_path / "foreign")
    (tmp_path / "foreign" / "metadata.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_pefs(tmp_path / "foreign")
    shard = tmp_path / "ok" / "shard_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(FormatError, match="not a readable safetensors file"):
        load_pefs(tmp_path / "ok")


def test_a_target_position_beside_examples_must_match_their_positions(model64, tokens, space):
    """Examples carry their own positions: a Target position that names other positions is an error, never
    silently ignored; one that names the same positions gives the same PEFs."""
    examples = Examples.from_tokens(tokens, "last")
    plain = compute_pefs(model64, examples, space, Target(classes=TopK(3)), nnz=30, progress=False)
    same = compute_pefs(model64, examples, space, Target("last", TopK(3)), nnz=30, progress=False)
    assert torch.equal(plain.values, same.values) and torch.equal(plain.indices, same.indices)
    assert torch.equal(plain.per_example["position"], examples.position)
    for position in (0, 100, [1] * len(tokens)):
        with pytest.raises(ValueError, match="disagrees with the target positions the nt.Examples hold|out of range"):
            compute_pefs(model64, examples, space, Target(position, TopK(3)), nnz=30, progress=False)
    inner = Examples.from_tokens(tokens, [[2, -2]] * len(tokens))  # negative entries of per-sequence lists count back
    assert inner.position.tolist()[:2] == [2, int(inner.lengths[0]) - 2]
    pefs = compute_pefs(model64, inner, space, Target([[2, -2]] * len(tokens), TopK(3)), nnz=30, progress=False)
    assert torch.equal(pefs.per_example["position"], inner.position)


@pytest.mark.hooked
def test_nan_weights_are_named_when_the_fishers_are_not_finite(tokens, space):
    """A NaN in W_Q leaves the logits finite (TransformerLens zeroes NaN attention patterns) but not the Fishers."""
    from helpers.models import make_model

    model = make_model()
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, 0, 0] = float("nan")
    assert torch.isfinite(model(tokens)).all()
    with pytest.raises(ValueError, match=r"the Fishers of examples \[0, 1, .* are NaN/inf although their logits are "
                                         r"finite; non-finite weights in blocks.0.attn.W_Q"):
        compute_pefs(model, tokens, space, Target(classes=TopK(3)), nnz=30, progress=False)


def test_the_class_gram_in_float32_chunks_keeps_float64_accuracy():
    from npeff_tl.pefs.sparse import lowrank_gram

    factors = torch.randn(3, 4, 100_003, generator=torch.Generator().manual_seed(0))
    factors[:, 1] *= 1e-3  # a class of small gradients beside large ones
    exact = factors.double() @ factors.double().mT
    error = torch.linalg.matrix_norm(lowrank_gram(factors) - exact) / torch.linalg.matrix_norm(exact)
    assert (error < 1e-6).all(), error  # relative to the PEF's norm, which is what the Gram gives
    assert (lowrank_gram(factors) - exact)[:, 1, 1].abs().max() < 1e-6 * exact[:, 1, 1].min()  # the small class too
    assert torch.allclose(lowrank_gram(factors.double(), chunk=7), exact, rtol=1e-12)
