"""Tiny Hugging Face models built from configs (no downloads), wrapped in TransformerLens's TransformerBridge, and
an independent map of each architecture's Hugging Face parameters to TransformerLens layouts (the oracle side)."""

import copy

import torch

VOCAB = 40


def tokenizer(directory):
    """A word-level tokenizer saved to ``directory`` and loaded back with a BOS token, as the bridge wants it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="w0", eos_token="w0",
                            pad_token="w0").save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory, add_bos_token=True)


def hf_config(architecture: str):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if architecture == "gpt2":
        return GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0)
    if architecture == "neox":
        return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=16, rotary_pct=0.5)
    if architecture == "llama":  # grouped-query attention (4 query heads, 2 key/value heads) and a gated MLP
        return LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=32, max_position_embeddings=16)
    raise ValueError(architecture)


HUB_NAMES = {"gpt2": "gpt2", "neox": "EleutherAI/pythia-14m", "llama": "meta-llama/Llama-3.2-1B"}


def hf_model(architecture: str, seed: int = 0, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(architecture)).to(dtype).eval()
    with torch.no_grad():  # non-trivial norm and bias values, so their gradients are exercised too
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def bridge_and_plain(architecture: str, tokenizer_dir, dtype=torch.float64):
    """(bridge, plain): a TransformerBridge over one copy of the model and the untouched Hugging Face model."""
    from transformer_lens.model_bridge import TransformerBridge

    plain = hf_model(architecture, dtype=dtype)
    bridge = TransformerBridge.boot_transformers(HUB_NAMES[architecture], hf_model=copy.deepcopy(plain),
                                                 tokenizer=tokenizer(tokenizer_dir), device="cpu", dtype=dtype)
    return bridge, plain


def tl_layout(architecture: str, model, grads: dict) -> dict:
    """Hugging Face tensors (``grads``: HF name -> tensor, e.g. gradients) in TransformerLens names and layouts,
    written out per architecture from the Hugging Face modules' own conventions."""
    cfg, out = model.config, {}
    if architecture == "gpt2":  # Conv1D weights are [d_in, d_out]; c_attn holds Q, K, V side by side
        d, h = cfg.n_embd, cfg.n_head
        out["embed.W_E"], out["pos_embed.W_pos"] = grads["transformer.wte.weight"], grads["transformer.wpe.weight"]
        for l in range(cfg.n_layer):
            p, t = f"transformer.h.{l}.", f"blocks.{l}."
            w, b = grads[p + "attn.c_attn.weight"], grads[p + "attn.c_attn.bias"]
            for i, letter in enumerate("QKV"):
                out[t + f"attn.W_{letter}"] = w[:, i * d:(i + 1) * d].reshape(d, h, -1).permute(1, 0, 2)
                out[t + f"attn.b_{letter}"] = b[i * d:(i + 1) * d].reshape(h, -1)
            out[t + "attn.W_O"] = grads[p + "attn.c_proj.weight"].reshape(h, -1, d)
            out[t + "attn.b_O"] = grads[p + "attn.c_proj.bias"]
            out[t + "mlp.W_in"], out[t + "mlp.b_in"] = grads[p + "mlp.c_fc.weight"], grads[p + "mlp.c_fc.bias"]
            out[t + "mlp.W_out"], out[t + "mlp.b_out"] = grads[p + "mlp.c_proj.weight"], grads[p + "mlp.c_proj.bias"]
            for ln, name in (("ln1", "ln_1"), ("ln2", "ln_2")):
                out[t + f"{ln}.w"], out[t + f"{ln}.b"] = grads[p + f"{name}.weight"], grads[p + f"{name}.bias"]
        out["ln_final.w"], out["ln_final.b"] = grads["transformer.ln_f.weight"], grads["transformer.ln_f.bias"]
    elif architecture == "neox":  # nn.Linear weights are [d_out, d_in]; query_key_value is [heads, (q, k, v), d_head]
        d, h = cfg.hidden_size, cfg.num_attention_heads
        out["embed.W_E"] = grads["gpt_neox.embed_in.weight"]
        for l in range(cfg.num_hidden_layers):
            p, t = f"gpt_neox.layers.{l}.", f"blocks.{l}."
            w = grads[p + "attention.query_key_value.weight"].reshape(h, 3, -1, d)
            b = grads[p + "attention.query_key_value.bias"].reshape(h, 3, -1)
            for i, letter in enumerate("QKV"):
                out[t + f"attn.W_{letter}"] = w[:, i].transpose(1, 2)
                out[t + f"attn.b_{letter}"] = b[:, i]
            out[t + "attn.W_O"] = grads[p + "attention.dense.weight"].T.reshape(h, -1, d)
            out[t + "attn.b_O"] = grads[p + "attention.dense.bias"]
            out[t + "mlp.W_in"], out[t + "mlp.b_in"] = (grads[p + "mlp.dense_h_to_4h.weight"].T,
                                                      grads[p + "mlp.dense_h_to_4h.bias"])
            out[t + "mlp.W_out"], out[t + "mlp.b_out"] = (grads[p + "mlp.dense_4h_to_h.weight"].T,
                                                        grads[p + "mlp.dense_4h_to_h.bias"])
            for ln, name in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
                out[t + f"{ln}.w"], out[t + f"{ln}.b"] = grads[p + f"{name}.weight"], grads[p + f"{name}.bias"]
        out["ln_final.w"], out["ln_final.b"] = (grads["gpt_neox.final_layer_norm.weight"],
                                                grads["gpt_neox.final_layer_norm.bias"])
        out["unembed.W_U"] = grads["lm_head.weight"].T
    elif architecture == "llama":
        d, h, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        out["embed.W_E"] = grads["model.embed_tokens.weight"]
        for l in range(cfg.num_hidden_layers):
            p, t = f"model.layers.{l}.", f"blocks.{l}."
            for letter, heads in (("Q", h), ("K", kv), ("V", kv)):
                out[t + f"attn.W_{letter}"] = grads[p + f"self_attn.{letter.lower()}_proj.weight"].reshape(
                    heads, -1, d).transpose(1, 2)
            out[t + "attn.W_O"] = grads[p + "self_attn.o_proj.weight"].T.reshape(h, -1, d)
            out[t + "mlp.W_gate"] = grads[p + "mlp.gate_proj.weight"].T
            out[t + "mlp.W_in"] = grads[p + "mlp.up_proj.weight"].T
            out[t + "mlp.W_out"] = grads[p + "mlp.down_proj.weight"].T
            out[t + "ln1.w"] = grads[p + "input_layernorm.weight"]
            out[t + "ln2.w"] = grads[p + "post_attention_layernorm.weight"]
        out["ln_final.w"] = grads["model.norm.weight"]
        out["unembed.W_U"] = grads["lm_head.weight"].T
    return out
