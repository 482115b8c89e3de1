"""compute_pefs: sparse per-example Fishers of a model, batched, streamed to disk and resumable.

Per batch: ``batch_grads`` runs the forward pass, the class rule picks classes and weights from its logits at
the target positions, and the same pass's backward gives g_c = grad log p_c for those classes; the factor
columns are u_c = sqrt(w_c) g_c. Norms and traces (tr F_i, the sum of the dense D-PEF) are taken on the dense
result before sparsification (float64), and the dataset-level diagonal Fisher (mean of the dense D-PEFs) is
accumulated on the way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from jaxtyping import Float, Float64, Int
from torch import Tensor, nn

from .. import distributed
from ..adapters import ModelAdapter, as_adapter
from ..examples import Examples, TokensLike
from ..params import ParamSpace
from ..progress import progress_bar
from ..provenance import tensor_fingerprint, versions
from ..store import FormatError, ShardStore, load_tensors, save_tensors
from ..targets import ClassRule, Target, TopK
from .containers import PEFS_FORMAT, PEFs, check_nnz, load_pefs
from .grads import as_examples, batch_grads, hooked_names
from .kinds import PEFKind, pef_kind, row_sums
from .linear_grads import fisher_diagonal
from .objectives import ClassLogProbs
from .workspace import Workspace

logger = logging.getLogger(__name__)


def _batch_pefs(
    adapter: ModelAdapter,
    space: ParamSpace,
    examples: Examples,
    index: Int[Tensor, " b"],
    target: Target,
    kind: PEFKind,
    nnz: int,
    n_top_logits: int,
    store_logits: bool,
    method: str,
    workspace: Workspace,
    fisher_sum: Float64[Tensor, " size"],
) -> dict[str, Tensor]:
    """The sparse PEF rows of a batch; its dense D-PEFs are added to ``fisher_sum``.

    The factor columns u_c = sqrt(w_c) grad log p_c come one parameter tensor at a time (only their sum of squares,
    for kinds that need no more); norms, the Fisher sum and the running top-k are updated per tensor (no
    [b, k, size] copy). The rows may live in ``workspace``:
    they are valid until the next batch.
    """
    rule = target.classes
    seen = {}

    def class_log_probs(logits: Float[Tensor, "b vocab"]) -> ClassLogProbs:
        bad = ~torch.isfinite(logits).all(dim=-1)
        if bad.any():
            raise ValueError(
                f"the model produced NaN/inf logits for examples {index[bad.cpu()].tolist()[:10]}; "
                "check the weights (and the dtype: float16 overflows easily)"
            )
        selection = rule.select(logits, examples.identity(index).to(logits.device))
        seen.update(logits=logits, selection=selection)
        return ClassLogProbs(selection.class_ids, rule, scale=selection.weights.sqrt())  # padding: weight 0

    pieces, _ = batch_grads(adapter, space, examples, index, class_log_probs, None, method, workspace,
                            diagonal=not kind.uses_factors)
    logits, selection = seen["logits"], seen["selection"]
    b, k = selection.class_ids.shape
    device = logits.device
    trace = torch.zeros(b, dtype=torch.float64, device=device)
    batch_rows = kind.batch_rows(b, k, nnz, space.size, target.classes.max_classes, workspace, device)
    for name, piece in pieces:  # u_c restricted to one parameter tensor, [b, k, numel], or sum_c u_c^2, [b, numel]
        start, stop = space.offsets[name]
        factors = piece if kind.uses_factors else None
        diagonal = piece if factors is None else fisher_diagonal(
            factors, workspace.get("diagonal", (b, stop - start), factors.dtype, device))
        fisher_sum[start:stop] += diagonal.sum(0)  # b terms in the working dtype; across batches in float64
        trace += row_sums(diagonal)
        batch_rows.add(start, factors, diagonal)
        del factors, diagonal
    _check_finite(trace, index, adapter)
    rows = batch_rows.rows(selection.class_ids)
    top_values, top_ids = logits.topk(min(n_top_logits, logits.shape[-1]), dim=-1)
    per_example = {
        "example_index": index,
        "seq_index": examples.seq_index[index],
        "position": examples.position[index],
        "class_ids": selection.class_ids,
        "class_probs": selection.probs,
        "class_weights": selection.weights,
        "fisher_trace": trace,
        "top_logit_ids": top_ids,
        "top_logit_values": top_values.float(),
    }
    if store_logits:
        per_example["logits"] = logits.float()
    rows.update({f"per_example.{k}": v for k, v in per_example.items()})
    return rows


def _check_finite(trace: Float64[Tensor, " b"], index: Int[Tensor, " b"], adapter: ModelAdapter) -> None:
    """Refuse NaN/inf Fishers at once, naming the examples and the weights that are not finite (the logits can
    stay finite: TransformerLens turns NaN attention patterns into zeros)."""
    bad = ~torch.isfinite(trace)
    if bad.any():
        weights = [name for name, p in adapter.named_parameters().items() if not torch.isfinite(p).all()]
        cause = (f"non-finite weights in {', '.join(weights[:5])}" if weights else
                 "all weights are finite, so look for overflow (float16?) or a non-finite input to the model")
        raise ValueError(f"the Fishers of examples {index[bad.cpu()].tolist()[:10]} are NaN/inf although their "
                         f"logits are finite; {cause}")


class _Rows:
    """The rows of ``n`` examples, written batch by batch into CPU tensors allocated at the first batch (no
    per-batch pieces to concatenate afterwards: that copy cost as much as sorting the rows). ``dtypes``:
    the stored dtype of some fields (cast while copying)."""

    def __init__(self, n: int, dtypes: dict[str, torch.dtype]):
        self.n, self.dtypes = n, dtypes
        self.tensors: dict[str, Tensor] = {}

    def put(self, start: int, rows: dict[str, Tensor]) -> None:
        for key, value in rows.items():
            if key not in self.tensors:
                dtype = self.dtypes.get(key, value.dtype)
                self.tensors[key] = torch.empty((self.n, *value.shape[1:]), dtype=dtype)
            self.tensors[key][start : start + len(value)] = value


def _open_store(store, config: dict, n: int, shard_size: int) -> tuple[ShardStore | None, PEFs | None]:
    """The shard store, created (or checked) by rank 0 before the other ranks open it, and on rank 0 the PEFs of
    a finished store (None if unfinished, or damaged and reopened for this run to repair)."""
    if store is None:
        return None, None
    finished = None
    if distributed.rank() == 0:  # rank 0 holds the store's lock for all ranks
        sink = ShardStore(store, PEFS_FORMAT, config, n, shard_size)
        if sink.meta.get("complete"):
            try:
                finished = load_pefs(store)  # verifies every file's checksum
            except FormatError as error:
                logger.warning("%s", error)
                _reopen_damaged(sink)
            except BaseException:
                sink.close()
                raise
    distributed.barrier()
    if distributed.rank() > 0:
        sink = ShardStore(store, PEFS_FORMAT, config, n, shard_size, lock=False)
    return sink, finished


def _reopen_damaged(sink: ShardStore) -> None:
    """Make a finished store that failed to load recompute what is missing or corrupt. Recomputed shards equal
    the lost ones (the store pins the model and the examples), so the saved dataset Fisher stays valid; without
    a readable one, every shard is recomputed for its sum."""
    def readable(path: Path) -> bool:
        try:
            load_tensors(path)
            return True
        except FormatError:
            path.unlink(missing_ok=True)
            return False

    whole = not readable(sink.path / "dataset_fisher.safetensors")
    damaged = [j for j in range(len(sink.ranges)) if whole or not readable(sink.shard_path(j))]
    for j in damaged:
        sink.shard_path(j).unlink(missing_ok=True)
    logger.warning("PEF store %s: recomputing shards %s, which are missing or corrupt", sink.path, damaged[:10])
    sink.reopen()


def compute_pefs(
    model: nn.Module | ModelAdapter,
    examples: Examples | TokensLike,
    space: ParamSpace,
    target: Target = Target(),
    kind: str | PEFKind = "diagonal",
    *,
    nnz: int | None = None,
    batch_size: int = 16,
    store: str | os.PathLike | None = None,
    shard_size: int = 1024,
    answers: Int[Tensor, " n_examples"] | None = None,
    n_top_logits: int = 16,
    store_logits: bool = False,
    dtype: torch.dtype | None = None,
    method: str = "auto",
    progress: bool = True,
) -> PEFs:
    """Per-example Fishers of ``model`` over ``space`` for ``examples``, sparsified to ``nnz`` entries each.

    Args:
        examples: ``Examples``, or token sequences whose target positions ``target.position`` gives.
        kind: ``"diagonal"`` (D-PEFs) or ``"lowrank"`` (LRM-PEFs, the factor U_i with F_i = U_i U_i^T), or
            the ``PEFKind`` object itself (``npeff_tl.pefs.kinds``); an unknown name gets a clear error.
        nnz: entries kept per example (default: min(65536, size of the space they are chosen from: the
            parameters for diagonal PEFs, classes x parameters for low-rank PEFs)). When nnz is that whole
            space nothing is selected or sorted: diagonal rows then hold every parameter in parameter order
            (metadata ``row_order``: ``"parameter"``) instead of the largest entries first.
        batch_size: examples per batch; peak memory is about batch_size x classes x space size floats.
        store: a directory to stream results to in shards of ``shard_size`` examples; re-running with the
            same arguments resumes, skipping finished shards. The stored result does not depend on batch_size.
            Under torch.distributed (required there), the ranks share out the unfinished shards; the result is
            the single-process result, bit for bit on CPU.
        answers: the answer token per example, stored with the PEFs.
        n_top_logits / store_logits: how much of the predicted distribution to keep per example.
        dtype: dtype of the stored values (default float32, float64 for a float64 model).
        method: how per-example gradients are computed (see ``batch_grads``): "auto" (hooks for linear maps,
            torch.func for the rest), "hooks" or "func". The result does not depend on it beyond rounding.
    """
    adapter = as_adapter(model)
    examples = as_examples(examples, target.position, adapter=adapter)
    n = len(examples)
    kind = pef_kind(kind)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    space.check_model(adapter)
    hooked_names(adapter, space.names, method)  # a bad method fails here, not at the first batch
    max_classes = target.classes.max_classes
    choice = kind.choice_size(space.size, max_classes)
    nnz = check_nnz(nnz if nnz is not None else kind.default_nnz(space.size, max_classes), choice, kind.counted)
    if answers is not None:
        answers = torch.as_tensor(answers, dtype=torch.long).reshape(-1)
        if answers.shape[0] != n:
            raise ValueError(f"got {answers.shape[0]} answers for {n} examples; give one answer per example")
        outside = (answers < 0) | (answers >= (adapter.vocab_size or 2**62))
        if outside.any():
            raise ValueError(f"answer {int(answers[outside][0])} (example {int(torch.nonzero(outside)[0])}) is not a "
                             f"token id of the model's vocabulary of {adapter.vocab_size}")
    dtype = dtype or (torch.float64 if adapter.dtype == torch.float64 else torch.float32)
    metadata = {
        "target": target.to_dict(),
        "model": adapter.config_summary(),
        "normalized": False,
        "n_top_logits": n_top_logits,
        "store_logits": store_logits,
        "dtype": str(dtype).removeprefix("torch."),
        "examples_sha256": examples.fingerprint(),
        "model_sha256": tensor_fingerprint(list(adapter.named_parameters().values())),
        **kind.layout(keeps_all=nnz == choice),
    }
    config = {"kind": kind.name, "nnz": nnz, "space": space.to_dict(), "metadata": metadata}
    if distributed.active() and store is None:
        raise ValueError("under torch.distributed, compute_pefs needs store= (a directory every rank can reach): "
                         "each rank writes its own shards there")
    sink, finished = _open_store(store, config, n, shard_size)
    try:
        if finished is not None:
            logger.info("PEF store %s is complete; loaded it", store)
            return finished
        if sink and sink.meta.get("complete"):  # ranks > 0 of a finished store
            return load_pefs(store)

        shard_size = sink.shard_size if sink else shard_size
        ranges = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
        todo = [j for j in range(len(ranges)) if not (sink and sink.is_done(j))]
        distributed.barrier()  # every rank lists the unfinished shards before any rank finishes one
        mine = set(todo[distributed.rank():: distributed.world_size()])  # finished shards are never recomputed
        stored = {"values": dtype, "indices": torch.int32 if space.size < 2**31 else torch.int64}
        everything = None if sink else _Rows(n, stored)  # without a store: one set of tensors for all examples
        fisher_sums = []
        workspace = Workspace()
        remaining = sum(ranges[j][1] - ranges[j][0] for j in mine)
        resumed = n - remaining if distributed.world_size() == 1 else 0  # a resumed run starts where it stopped
        with progress_bar(total=remaining + resumed, initial=resumed, desc=f"{kind.name} PEFs", unit="ex",
                          enabled=progress) as bar:
            for j, (shard_start, shard_stop) in enumerate(ranges):
                if j not in mine:
                    continue
                rows = everything or _Rows(shard_stop - shard_start, stored)
                first_row = 0 if everything else shard_start
                fisher_sum = torch.zeros(space.size, dtype=torch.float64, device=adapter.device)
                for start in range(shard_start, shard_stop, batch_size):
                    index = torch.arange(start, min(start + batch_size, shard_stop))
                    batch = _batch_pefs(
                        adapter, space, examples, index, target, kind, nnz, n_top_logits, store_logits, method, workspace,
                        fisher_sum,
                    )
                    if answers is not None:
                        batch["per_example.answer"] = answers[index]
                    rows.put(start - first_row, batch)
                    bar.update(len(index))
                if sink:  # the partial Fisher sum first: a shard file on disk means the shard is complete
                    save_tensors({"fisher_sum": fisher_sum}, sink.shard_path(j, "fisher_sum"))
                    sink.write(j, rows.tensors)
                else:
                    fisher_sums.append(fisher_sum)

        distributed.barrier()  # every rank's shards are on disk
        dataset_fisher = torch.zeros(space.size, dtype=torch.float64)
        provenance = {"versions": versions()}
        if sink and distributed.rank() > 0:
            distributed.barrier()  # rank 0 completes the store
            return load_pefs(store)
        sums = [sink.shard_path(j, "fisher_sum") for j in range(len(ranges))] if sink else []
        if sink and not all(path.is_file() for path in sums):  # shards recomputed in a finished store
            dataset_fisher = load_tensors(sink.path / "dataset_fisher.safetensors")["dataset_fisher"]
        else:
            for j in range(len(ranges)):  # summed in shard order, whichever shards (and ranks) computed them
                dataset_fisher += (load_tensors(sums[j])["fisher_sum"] if sink else fisher_sums[j]).cpu()
            dataset_fisher /= n
        if sink:
            save_tensors({"dataset_fisher": dataset_fisher}, sink.path / "dataset_fisher.safetensors")
            sink.mark_complete(provenance=provenance, dataset_fisher=True)
            for path in sums:
                path.unlink(missing_ok=True)
            distributed.barrier()
            return load_pefs(store)
        pefs = kind.container._from_shards([everything.tensors], space, {"config": config, "provenance": provenance})
        pefs.dataset_fisher = dataset_fisher
        return pefs
    finally:
        if sink:
            sink.close()  # the store's lock goes, whatever happened


def fisher_traces(
    model: nn.Module | ModelAdapter,
    examples: Examples | TokensLike,
    space: ParamSpace,
    classes: ClassRule = TopK(4),
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> Float64[Tensor, " n_examples"]:
    """tr F_i over ``space`` per example (the sum of its dense D-PEF) under the class rule ``classes``: how
    sensitive the example's prediction is to the space's parameters as a whole. A random step of norm m moves
    example i by about m^2 tr F_i / (2 size) nats of KL, which is what normalised selectivity divides out."""
    pefs = compute_pefs(model, examples, space, Target(classes=classes), "diagonal", nnz=1, batch_size=batch_size,
                        progress=progress)
    return pefs.per_example["fisher_trace"]
