# %% [markdown]
# # NPEFF and an SAE, side by side
#
# Every dictionary in npeff_tl (NPEFF, SAE-Lens SAEs, gradient clustering, activation k-means) speaks one
# protocol: coefficients per example, top examples per component, an intervention per component. So a fair
# comparison is one call. Here: D-NPEFF against a TopK SAE trained offline with SAE-Lens's own trainer.

# %%
import torch

import npeff_tl as nt
from npeff_tl.baselines import SAEDictionary, evaluate_sae, train_sae

torch.manual_seed(0)
model, data = nt.zoo.load("tasks-2l", n_train=32, n_test=32)
train = nt.LabeledExamples.from_dataset(data["train"])
test = nt.LabeledExamples.from_dataset(data["test"])

# %% [markdown]
# ## The two dictionaries
# The SAE reads the residual stream before block 1; its coefficients are feature activations at the answer
# position. SAE-Lens's own figures (CE loss recovered, explained variance, L0) come with it.

# %%
space = nt.ParamSpace(model, include=["blocks.*.attn.W_[QKVO]", "blocks.*.mlp.W_*"])
target = nt.Target(classes=nt.TopK(4))  # at the positions the Examples carry
pefs = nt.compute_pefs(model, train.examples, space, target, kind="diagonal", nnz=4096, progress=False)
npeff = nt.NPEFFDictionary(model, nt.DNPEFF(8, seed=0).fit(pefs, progress=False), train, target, pefs)

sae = train_sae(model, train, "blocks.1.hook_resid_pre", d_sae=8, k=2, steps=500, progress=False)
sae_dictionary = SAEDictionary(model, sae, train, evaluation=evaluate_sae(model, sae, test))
print(sae_dictionary.describe())

# %% [markdown]
# ## The comparison
# On held-out examples: AMI / NMI of each example's strongest component against the known strategy, purity of
# each component's top 20 examples, best-match F1, multi-factor recall, and how well the two dictionaries'
# components match each other (Hungarian matching on coefficient correlation). `selectivity=True` adds the
# causal test of the quickstart for every dictionary (slower).

# %%
table = nt.compare([npeff, sae_dictionary], test)
print(table[["method", "ami", "nmi", "purity_at_20", "best_match_f1", "multi_factor_recall"]].to_string(index=False))
print("matched coefficient correlation:", float(table.loc[0, "matched_corr_sae_8"]))
