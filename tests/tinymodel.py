"""Write tiny random-weight llama GGUF models that real llama.cpp loads in milliseconds.

``write_tiny_llama(path, seed=…)`` writes a target model; ``write_tiny_llama(path, seed=…, noise_of=…)`` writes a
draft that shares the target's vocabulary and weights plus small noise, so a speculative pair has a real,
tunable acceptance rate. The vocabulary is SentencePiece-style: ``<unk> <s> </s>``, the 256 byte tokens, ``▁``,
printable ASCII, and (optionally) a few merges. Output rows of ``</s>``, of bytes ≥ 0x80 and of the byte tokens that
duplicate a printable character (0x20–0x7F) are zero, so greedy decoding neither emits invalid UTF-8 nor stops
early, and its text re-tokenizes into the same tokens — which speculative decoding over a text API relies on. Without
merges (the default) tokenization is canonical; with them, text generated as separate pieces can re-tokenize into
a merge.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

MERGES = ["▁t", "he", "▁the", "in", "er", "an", "▁a", "on", "re", "▁s"]


def tiny_vocab(merges: list[str] | None = None) -> tuple[list[str], list[float], list[int]]:
    merges = [] if merges is None else merges
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    tokens.append("▁")
    types.append(1)
    tokens += [chr(c) for c in range(33, 127)]
    types += [1] * (127 - 33)
    tokens += merges
    types += [1] * len(merges)
    scores = [0.0] * 3 + [0.0] * 256 + [-1.0] + [-2.0] * (127 - 33) + [-0.5 + 0.01 * i for i in range(len(merges))]
    return tokens, scores, types


def write_tiny_llama(
    path: Path | str,
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 128,
    context_length: int = 512,
    noise_of: dict[str, np.ndarray] | None = None,
    noise_scale: float = 0.1,
    name: str = "tiny-llama",
    merges: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Write the model to ``path`` and return its tensors (pass them as ``noise_of`` to make a draft)."""
    tokens, scores, types = tiny_vocab(merges)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def randn(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    if noise_of is None:
        tensors: dict[str, np.ndarray] = {
            "token_embd.weight": randn(n_vocab, n_embd, std=1.0),
            "output_norm.weight": np.ones(n_embd, dtype=np.float32),
            "output.weight": randn(n_vocab, n_embd, std=1.0),
        }
        for i in range(n_layer):
            p = f"blk.{i}."
            tensors[p + "attn_norm.weight"] = np.ones(n_embd, dtype=np.float32)
            tensors[p + "ffn_norm.weight"] = np.ones(n_embd, dtype=np.float32)
            for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
                tensors[p + t + ".weight"] = randn(n_embd, n_embd, std=0.3)
            tensors[p + "ffn_gate.weight"] = randn(n_ff, n_embd, std=0.3)
            tensors[p + "ffn_up.weight"] = randn(n_ff, n_embd, std=0.3)
            tensors[p + "ffn_down.weight"] = randn(n_embd, n_ff, std=0.3)
        out = tensors["output.weight"]
        out[2, :] = 0.0  # </s>
        out[3 + 0x20 : 3 + 0x100, :] = 0.0  # bytes that would start invalid UTF-8 or duplicate a character token
        out[0, :] = 0.0  # <unk>
        out[1, :] = 0.0  # <s>
    else:
        tensors = {}
        for key, value in noise_of.items():
            if value.ndim == 1:
                tensors[key] = value.copy()
            else:
                noisy = value + randn(*value.shape, std=float(value.std()) * noise_scale)
                mask = np.all(value == 0.0, axis=1, keepdims=True) if key == "output.weight" else False
                tensors[key] = np.where(mask, 0.0, noisy).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    for key, value in tensors.items():
        writer.add_tensor(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors
