# %% [markdown]
# # Bring your own HookedTransformer
#
# Nothing in npeff_tl is specific to the zoo. With hub access you would start from a pretrained model:
#
# ```python
# from transformer_lens import HookedTransformer
# model = HookedTransformer.from_pretrained("gpt2")
# tokens = model.to_tokens(["The Eiffel Tower is in", "The capital of Japan is"])
# ```
#
# This tutorial runs offline, so it builds a small model from a config and gives it something to predict:
# sequences that repeat their first half (an induction pattern), learnt in a few hundred steps.

# %%
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import npeff_tl as nt

torch.manual_seed(0)
cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=20, n_ctx=16,
                              act_fn="gelu", normalization_type="LN", seed=0, device="cpu")
model = HookedTransformer(cfg)
half = torch.randint(1, 20, (512, 6))
sequences = torch.cat([half, half], dim=1)  # the second half repeats the first
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
for step in range(300):
    batch = sequences[torch.randint(0, 512, (64,))]
    loss = model(batch, return_type="loss")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
model.eval()
print(f"training loss {loss.item():.2f}")

# %% [markdown]
# ## Examples and targets
# Several target positions of one sequence are separate examples sharing one forward pass. Here: every
# position of the repeated half, where the model can copy. The class rule is a probability threshold (classes
# with p >= 0.05, at most 4); `nt.Candidates(token_ids)` or `nt.Sampled(k, seed)` are the alternatives.

# %%
examples = nt.Examples.from_tokens(sequences[:48], [list(range(6, 11))] * 48)
space = nt.ParamSpace(model, include=["blocks.*.attn.W_[QKV]", "blocks.1.attn.W_O"])
target = nt.Target(classes=nt.Threshold(0.05, max_k=4))  # the positions come with the Examples
pefs = nt.compute_pefs(model, examples, space, target, kind="lowrank", nnz=2048, progress=False)
print(pefs)

# %% [markdown]
# ## LRM-NPEFF and what it found
# Low-rank PEFs keep several classes per example; LRM-NPEFF explains them with rank-1 components g_j g_j^T.
# The readout says which heads each component uses.

# %%
dec = nt.LRMNPEFF(n_components=4, seed=0).fit(pefs, progress=False)
for j in range(dec.n_components):
    heads = dec.component(j).readout().heads
    layer, head = divmod(int(heads.argmax()), heads.shape[1])
    print(f"component {j}: {float(heads.max()):.0%} of its mass in head {layer}.{head}")
dec.save("runs/my_model_lrm")  # safetensors + JSON; nt.load_decomposition reads it back
