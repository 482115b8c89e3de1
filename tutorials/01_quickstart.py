# %% [markdown]
# # Quickstart: NPEFF on a zoo model
#
# The zoo ships small HookedTransformers trained on tasks whose processing strategy is known per example, so
# you can check what NPEFF finds. This tutorial computes per-example Fishers (PEFs), decomposes them with
# D-NPEFF, reads a component in TransformerLens terms (heads, neurons), and checks causally, on held-out
# examples, that perturbing the parameters along the component disrupts its own examples only.
#
# Run it as a script (`python tutorials/01_quickstart.py`) or cell by cell in an editor that understands `# %%`.

# %%
from collections import Counter

import torch

import npeff_tl as nt

torch.manual_seed(0)
model, data = nt.zoo.load("tasks-2l", n_train=32, n_test=32)  # a HookedTransformer and a DatasetDict
train = nt.LabeledExamples.from_dataset(data["train"])         # tokens, target position, answer, strategy
test = nt.LabeledExamples.from_dataset(data["test"])
print(model.cfg.n_layers, "layers;", len(train), "train and", len(test), "test examples of strategies",
      sorted(set(train.labels)))

# %% [markdown]
# ## Per-example Fishers
# Choose the parameters (TL names, globs allowed) and the predictive distribution: the answer position, the
# model's top-4 classes. Each PEF keeps its 4096 largest diagonal entries.

# %%
space = nt.ParamSpace(model, include=["blocks.*.attn.W_[QKVO]", "blocks.*.mlp.W_*"])
target = nt.Target(classes=nt.TopK(4))  # at the positions the Examples carry
pefs = nt.compute_pefs(model, train.examples, space, target, kind="diagonal", nnz=4096, progress=False)
print(pefs)

# %% [markdown]
# ## D-NPEFF
# Eight components; `W` holds the non-negative coefficient of every example on every component.

# %%
dec = nt.DNPEFF(n_components=8, seed=0).fit(pefs, progress=False)
for j in range(dec.n_components):
    top, _ = dec.component(j).top_examples(10)
    strategy, count = Counter(train.labels[i] for i in top.tolist()).most_common(1)[0]
    print(f"component {j}: {count} of its 10 top examples are {strategy}")

# %% [markdown]
# ## Where a component lives
# The readout splits the component's mass over parameter tensors, attention heads and MLP neurons.

# %%
readout = dec.component(0).readout()
print("mass per head [layer, head]:\n", readout.heads.numpy().round(3))
layer, neuron = divmod(int(readout.neurons.argmax()), readout.neurons.shape[1])
print(f"top MLP neuron: layer {layer}, neuron {neuron} ({float(readout.neurons.max()):.1%} of the mass)")
print("example:", data["train"]["text"][int(dec.component(0).top_examples(1)[0])])

# %% [markdown]
# ## Is it causal?
# `NPEFFDictionary` turns the decomposition into interventions; `measure_selectivity` perturbs each
# component just enough to move its top held-out examples by 0.5 nats (mean KL) and compares with 200 other
# held-out examples, and with random directions of the same norm.

# %%
npeff = nt.NPEFFDictionary(model, dec, train, target, pefs)
result = nt.measure_selectivity(npeff, test, components=[0, 1], progress=False)
for method, figures in result.medians().items():
    print(f"{method:>15}: selectivity {figures['selectivity']:.3g}, strategy selectivity "
          f"{figures['strategy_selectivity']:.3g}")

# %% [markdown]
# ## Where does its effect travel?
# `nt.trace` patches each attention head's output, MLP output and residual stream, at each position before
# the target, from the perturbed run into the original run, and measures how far each patch alone moves the
# prediction (KL). AtP* estimates all of them from a few backward passes; `method="patching"` computes them
# exactly. Here at the magnitude selectivity calibrated for component 0, on its top held-out examples.

# %%
record = next(r for r in result.records if r["method"] == "dnpeff" and r["component"] == 0 and r["kl_target"] == 0.5)
sign = record["sign"]
magnitude = record["magnitude_plus" if sign == 1 else "magnitude_minus"]
top = npeff.coefficients(test)[:, 0].topk(8).indices
circuit = nt.trace(model, npeff.intervention(0, magnitude, sign), test.examples.subset(top), progress=False)
for row in circuit.top_nodes(5):
    print(f"{row['node']:>24} at target-{row['offset']}: {row['effect']:.3g} nats")
print("residual stream [layer, offset from the target]:\n", circuit.heatmap()[:, :6].numpy().round(4))
