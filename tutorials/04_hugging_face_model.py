# %% [markdown]
# # A Hugging Face model through TransformerBridge
#
# npeff_tl runs on any model TransformerLens's `TransformerBridge` wraps (GPT-2, GPT-NeoX / Pythia, Llama, ...),
# and on transformer-lens 4, which has no HookedTransformer. Parameters keep their TransformerLens names and
# layouts, so everything from the other tutorials carries over. With hub access, start from a real model:
#
#     bridge = TransformerBridge.boot_transformers("gpt2")
#
# Here nothing is downloaded: a small GPT-2 is built from a config and saved with a word-level tokenizer, the way
# `save_pretrained` leaves any model (`--set model.name=DIR` runs the whole pipeline on such a directory). Its
# weights are random, so the components below show the API, not findings.

# %%
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens.model_bridge import TransformerBridge
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import npeff_tl as nt

torch.manual_seed(0)
directory = Path(tempfile.mkdtemp()) / "tiny-gpt2"
vocab = {f"w{i}": i for i in range(63)} | {"<unk>": 63}
words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
words.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="w0", eos_token="w0",
                        pad_token="w0").save_pretrained(directory)
GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)).save_pretrained(directory)

bridge = TransformerBridge.boot_transformers(str(directory), device="cpu")  # model and tokenizer from the directory
adapter = nt.as_adapter(bridge)
for name in ["blocks.0.attn.W_Q", "blocks.0.mlp.W_in", "unembed.W_U"]:
    shape = tuple(adapter.named_parameters()[name].shape) if name in adapter.named_parameters() else "tied to W_E"
    print(f"{name:>20} {shape}  <- {adapter.hf_names().get(name, 'transformer.wte.weight')}")

# %% [markdown]
# ## Per-example Fishers and D-NPEFF
# The examples: random word sequences, predicted at their last token. The attention and MLP weights are the
# parameter space.

# %%
tokens = torch.randint(1, 63, (96, 8), generator=torch.Generator().manual_seed(0))
examples = nt.Examples.from_tokens(tokens)  # target: the last token of each sequence
space = nt.ParamSpace(bridge, include=["blocks.*.attn.W_[QKVO]", "blocks.*.mlp.W_*"])
target = nt.Target(classes=nt.TopK(4))
pefs = nt.compute_pefs(bridge, examples, space, target, kind="diagonal", nnz=1024, progress=False)
dec = nt.DNPEFF(n_components=6, max_iter=200, seed=0).fit(pefs, progress=False)
print(pefs, "->", dec.n_components, "components")

# %% [markdown]
# ## A component's heads and neurons
# The readout splits a component's mass over parameter tensors, attention heads and MLP neurons, in
# TransformerLens layouts.

# %%
readout = dec.component(0).readout()
print("mass per head [layer, head]:\n", readout.heads.numpy().round(3))
layer, neuron = divmod(int(readout.neurons.argmax()), readout.neurons.shape[1])
print(f"top neuron: layer {layer}, neuron {neuron} ({float(readout.neurons.max()):.1%} of the mass)")

# %% [markdown]
# ## A perturbation
# Perturbing along the component changes the Hugging Face weights themselves while the context is open, and
# restores them bit for bit afterwards.

# %%
npeff = nt.NPEFFDictionary(bridge, dec, nt.LabeledExamples(examples), target, pefs)
top = npeff.top_examples(0, 10)
others = torch.tensor([i for i in range(len(examples)) if i not in set(top.tolist())][:40])
before = {k: v.clone() for k, v in bridge.state_dict().items()}
step = npeff.intervention(0, magnitude=npeff.magnitude_bounds(0)[1] / 4)  # entered by kl_divergence, per batch
kl_top = nt.kl_divergence(bridge, examples.subset(top), step).mean()
kl_others = nt.kl_divergence(bridge, examples.subset(others), step).mean()
print(f"mean KL on the component's top examples {float(kl_top):.3g}, on others {float(kl_others):.3g}")
assert all(torch.equal(before[k], v) for k, v in bridge.state_dict().items())  # restored exactly
