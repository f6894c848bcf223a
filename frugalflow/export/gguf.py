"""Export a Llama-family model directory (dense or packed) to one GGUF file, as llama.cpp reads it.

Tensor names, metadata keys and the tokenizer fields follow llama.cpp's convert_hf_to_gguf.py
for LlamaForCausalLM: q/k rows are permuted for its rotary layout, norms are F32, a tied
output head is omitted. Our grid W = (q - zero) * scale with groups of g along the input maps
onto GGUF's 32-weight blocks whenever g % 32 == 0 (each group is g/32 blocks sharing d, m):
  * 4/5-bit, every zero = 2^(bits-1)  -> Q4_0 / Q5_0: x = d * (q - 8 | 16), d = scale: exact
    when the scales are stored fp16 (the default);
  * 4/5-bit, other zeros              -> Q4_1 / Q5_1: x = d * q + m, d = scale,
    m = -scale * zero rounded to fp16 (error <= |m| * 2^-11 per weight);
  * 8-bit, every zero = 128           -> Q8_0: x = d * (q - 128): exact with fp16 scales;
  * Int8Linear (W8A8, no smoothing)    -> Q8_0 with d = its per-row scale rounded to fp16
    (activation quantization is not carried: llama.cpp chooses its own).
Anything else (2/3/6/7 bits, 8-bit with offsets, g % 32 != 0, smoothed int8, dense layers) is
written dequantized as F16 (default) or F32 and listed in the summary's `fallback`;
require_exact=True refuses such a quantized layer instead. An int8 output head tied to the input
embedding is written once, as the token table in Q8_0 (llama.cpp uses it as the output too).
"""
from __future__ import annotations

import json
from collections import Counter
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn as nn

from frugalflow.export.common import (
    ExportError,
    dense_weight,
    describe_fallback,
    head_dim,
    linears,
    load_for_export,
    write_atomically,
)
from frugalflow.export.llamacpp_vocab import CHKTXT, PRE_TOKENIZER_BY_HASH
from frugalflow.quant.runtime import PackedLinear, TiedEmbedding

Q = gguf.GGMLQuantizationType
BLOCK = 32
FLOAT_TYPES = {"f16": (Q.F16, np.float16), "f32": (Q.F32, np.float32)}
FILE_TYPES = {Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
              Q.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, Q.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
              Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.F32: gguf.LlamaFileType.ALL_F32}


# --------------------------------------------------------------------------- which type
def gguf_type(layer: nn.Module) -> tuple[Q | None, str]:
    """(GGUF type the layer's grid maps onto, or None; why not)."""
    if isinstance(layer, nn.Linear):
        return None, "dense layer"
    grid = layer.weight_grid()
    if grid.act is not None and grid.act["smoothed"]:
        return None, "SmoothQuant-smoothed int8: the smoothing has no GGUF counterpart"
    if grid.zeros is None:  # signed 8-bit codes, one scale per row: Q8_0 blocks share the row's scale
        return (Q.Q8_0, "") if layer.in_features % BLOCK == 0 else (None, f"in_features % {BLOCK} != 0")
    if grid.group % BLOCK:
        return None, f"group size {grid.group} is not a multiple of GGUF's {BLOCK}-weight blocks"
    if grid.bits == 4:
        return (Q.Q4_0 if grid.symmetric else Q.Q4_1), ""
    if grid.bits == 5:
        return (Q.Q5_0 if grid.symmetric else Q.Q5_1), ""
    if grid.bits == 8 and grid.symmetric:
        return Q.Q8_0, ""
    if grid.bits == 8:
        return None, "8-bit with zero points other than 128: GGUF has no 8-bit type with an offset"
    return None, f"{grid.bits}-bit codes: no GGUF type stores them on a plain scale/offset grid"


# --------------------------------------------------------------------------- block encoding
def encode_blocks(q: np.ndarray, d: np.ndarray, m: np.ndarray | None, qtype: Q) -> np.ndarray:
    """Rows of GGUF blocks (uint8 [rows, cols / 32 * block_bytes]) from codes and per-block d, m.

    q: [rows, cols] uint8 codes in [0, 2^bits) (Q4/Q5), or int8 values (Q8_0);
    d, m: [rows, cols / 32] float16. Layouts as ggml's block_q4_0 .. block_q8_0."""
    rows, cols = q.shape
    nb = cols // BLOCK
    qb = q.reshape(rows, nb, BLOCK)
    parts = [np.ascontiguousarray(d, dtype="<f2").view(np.uint8).reshape(rows, nb, 2)]
    if m is not None:
        parts.append(np.ascontiguousarray(m, dtype="<f2").view(np.uint8).reshape(rows, nb, 2))
    if qtype == Q.Q8_0:
        parts.append(qb.astype(np.int8).view(np.uint8))
    else:
        if qtype in (Q.Q5_0, Q.Q5_1):  # bit 4 of element i is bit i of a little-endian uint32
            parts.append(np.packbits((qb >> 4) & 1, axis=-1, bitorder="little"))
        parts.append((qb[..., :BLOCK // 2] & 0xF) | ((qb[..., BLOCK // 2:] & 0xF) << 4))
    out = np.concatenate(parts, axis=-1).reshape(rows, -1)
    assert out.shape[1] == nb * gguf.GGML_QUANT_SIZES[qtype][1]
    return out


def quantized_tensor(layer: nn.Module, qtype: Q, rows: torch.Tensor | None) -> tuple[np.ndarray, float]:
    """(GGUF block bytes, max |GGUF dequantized - our dequantized|) for one layer; `rows`
    reorders the output rows (rotary permutation) or is None."""
    grid = layer.weight_grid()
    per = grid.group // BLOCK
    q = grid.codes
    scale = grid.scales.float().repeat_interleave(per, dim=1)
    zero = grid.zeros.float().repeat_interleave(per, dim=1) if grid.zeros is not None else None
    if rows is not None:
        q, scale = q[rows], scale[rows]
        zero = zero[rows] if zero is not None else None
    d = scale.numpy().astype(np.float16)
    m = None
    if zero is None:
        vals = levels = q.numpy()  # signed codes already: x = d * q
    elif qtype == Q.Q8_0:
        vals = (q.to(torch.int16) - 128).to(torch.int8).numpy()
        levels = vals
    elif qtype in (Q.Q4_0, Q.Q5_0):  # zero 8 / 16 is exactly the offset ggml subtracts
        vals = q.numpy()
        levels = vals.astype(np.int16) - 2 ** (grid.bits - 1)
    else:
        vals = levels = q.numpy()
        m = (-scale * zero).numpy().astype(np.float16)
    got = d.astype(np.float32).repeat(BLOCK, 1) * levels.astype(np.float32)
    if m is not None:
        got = got + m.astype(np.float32).repeat(BLOCK, 1)
    want = dense_weight(layer)
    if rows is not None:
        want = want[rows]
    err = float(np.abs(got - want.numpy()).max()) if want.numel() else 0.0
    return encode_blocks(vals, d, m, qtype), err


def rope_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp stores q/k in (convert_hf_to_gguf's LlamaModel.permute): within each
    head, the two rotary halves are interleaved."""
    hd = n_rows // n_head
    return torch.arange(n_rows).reshape(n_head, 2, hd // 2).transpose(1, 2).reshape(-1)


# --------------------------------------------------------------------------- tokenizer
def pre_tokenizer_name(tok) -> tuple[str, str]:
    """(llama.cpp's name for the tokenizer's BPE pre-tokenizer, how it was found).

    First as llama.cpp's converter does it (the hash of CHKTXT's token ids looked up in its table),
    so a known model gets exactly the name the converter writes; a vocabulary the table does not
    know (one trained here) by the structure of its pre_tokenizer: the GPT-2 regex is 'gpt-2', the
    regex after single digits is 'smollm'; else 'default' (llama.cpp's own rules)."""
    chkhsh = sha256(str(tok.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh in PRE_TOKENIZER_BY_HASH:
        return PRE_TOKENIZER_BY_HASH[chkhsh][0], f"hash {chkhsh[:12]} ({PRE_TOKENIZER_BY_HASH[chkhsh][1]})"
    pre = json.loads(tok.backend_tokenizer.to_str()).get("pre_tokenizer") or {}

    def is_gpt2(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)
    if is_gpt2(pre):
        return "gpt-2", "structure: byte-level with the GPT-2 regex"
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        digits, byte_level = pre["pretokenizers"]
        if digits.get("type") == "Digits" and digits.get("individual_digits") and is_gpt2(byte_level):
            return "smollm", "structure: single digits, then the GPT-2 regex"
    return "default", "not recognised"


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: Path, vocab_size: int) -> dict:
    """gpt2-style BPE vocabulary, merges, special ids and chat template from an HF tokenizer."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as exc:
        raise ExportError(f"{tokenizer_dir}: cannot load the tokenizer: {exc}") from exc
    if not getattr(tok, "is_fast", False):
        raise ExportError(f"{tokenizer_dir}: a fast (tokenizer.json) tokenizer is needed")
    state = json.loads(tok.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(state.get("pre_tokenizer")):
        raise ExportError(f"{tokenizer_dir}: only byte-level BPE tokenizers (GGUF model 'gpt2') are exported")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"tokenizer has id {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif reverse[i] in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    pre, found_by = pre_tokenizer_name(tok)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    add_prefix_space = tok.init_kwargs.get("add_prefix_space")
    if add_prefix_space is not None:  # as the converter: only where tokenizer_config.json says
        writer.add_add_space_prefix(bool(add_prefix_space))
    info = {"tokens": len(tokens), "pre": pre, "pre_found_by": found_by}
    if found_by == "not recognised":
        info["warning"] = ("pre-tokenizer not recognised: llama.cpp will split text with its default "
                           "rules, which may differ from the HF tokenizer")
    return info


# --------------------------------------------------------------------------- the file
def export_gguf(model_dir: str | Path, out_path: str | Path, float_type: str = "f16",
                require_exact: bool = False, tokenizer_dir: str | Path | None = None,
                overwrite: bool = False) -> dict:
    """Write model_dir (dense or packed Llama) as a GGUF file; returns a summary.

    float_type: 'f16' or 'f32' for embeddings, an untied output head and layers without a
    GGUF quantized type (norms are always F32). require_exact: raise ExportError instead of
    writing a quantized layer dequantized. Summary: tensor_types (type -> count), linears
    (type -> count), fallback ({layer: reason}), max_abs_err (largest |GGUF dequantized -
    ours| over quantized tensors, fp16 rounding of d/m), file_type, tokenizer, bytes."""
    if float_type not in FLOAT_TYPES:
        raise ExportError(f"float_type must be one of {sorted(FLOAT_TYPES)}, got {float_type!r}")
    model_dir = Path(model_dir)
    # a tied int8 head is written once, as the Q8_0 token table (llama.cpp reads it for the missing output)
    model = load_for_export(model_dir, keep_tied_head=lambda head: gguf_type(head)[0] is not None)
    plan = {name: gguf_type(layer) for name, layer in linears(model).items()}
    fallback = {name: why for name, (qtype, why) in plan.items() if qtype is None}
    quantized_fallback = {n: w for n, w in fallback.items() if w != "dense layer"}
    if require_exact and quantized_fallback:
        raise ExportError(f"no exact GGUF type: {describe_fallback(quantized_fallback)}")
    summary = {"format": "gguf", "path": str(out_path), "float_type": float_type.upper(),
               "fallback": quantized_fallback, "max_abs_err": 0.0}

    def write(tmp: Path) -> None:
        summary.update(_write(model, plan, tmp, FLOAT_TYPES[float_type], Path(tokenizer_dir or model_dir),
                              model_dir.name))

    write_atomically(Path(out_path), write, is_dir=False, overwrite=overwrite, keep=(model_dir,))
    summary["bytes"] = Path(out_path).stat().st_size
    return summary


def _write(model: nn.Module, plan: dict, path: Path, float_type: tuple, tokenizer_dir: Path, name: str) -> dict:
    config = model.config
    float_q, float_np = float_type
    n_layers, n_head, n_kv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // n_head:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    tokenizer = add_tokenizer(writer, tokenizer_dir, config.vocab_size)

    tensor_types, linear_types, max_err = Counter(), Counter(), 0.0
    tied = bool(getattr(config, "tie_word_embeddings", False))
    modules = dict(model.named_modules())
    embedding = model.get_input_embeddings()
    if isinstance(embedding, TiedEmbedding):  # the packed head's rows are the table
        qtype = gguf_type(embedding.head)[0]
        data, max_err = quantized_tensor(embedding.head, qtype, None)
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight", data, raw_dtype=qtype)
        tensor_types[qtype.name] += 1
    for param_name, t in model.state_dict().items():
        module_name, _, leaf = param_name.rpartition(".")
        if tied and module_name == "lm_head":
            continue  # llama.cpp falls back to token_embd for a missing output.weight
        module = modules[module_name]
        if isinstance(module, PackedLinear) and leaf != "qweight":
            continue  # scales, zeros, act_scale, smooth: folded into the one tensor written for qweight
        gguf_name = names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise ExportError(f"{param_name}: no llama.cpp tensor name for it")
        rows = None
        if module_name.endswith("self_attn.q_proj"):
            rows = rope_rows(config.num_attention_heads * head_dim(config), n_head)
        elif module_name.endswith("self_attn.k_proj"):
            rows = rope_rows(n_kv * head_dim(config), n_kv)
        qtype = plan.get(module_name, (None, ""))[0]
        if qtype is not None:
            data, err = quantized_tensor(module, qtype, rows)
            max_err = max(max_err, err)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        else:
            W = dense_weight(module) if module_name in plan else t.detach().float()
            if rows is not None:
                W = W[rows]
            qtype = Q.F32 if W.dim() == 1 else float_q
            writer.add_tensor(gguf_name, W.numpy().astype(np.float32 if qtype == Q.F32 else float_np))
        tensor_types[qtype.name] += 1
        if module_name in plan:
            linear_types[qtype.name] += 1
    main = linear_types.most_common(1)[0][0] if linear_types else float_q.name
    writer.add_file_type(FILE_TYPES[Q[main]])
    if main not in ("F16", "F32"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensor_types": dict(tensor_types), "linears": dict(linear_types), "max_abs_err": max_err,
            "file_type": FILE_TYPES[Q[main]].name, "tokenizer": tokenizer}
