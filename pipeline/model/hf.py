"""Conversion of our GPT to Hugging Face `transformers` (Llama or GPT-2 architecture),
with a tokenizer that carries the chat template, written with safetensors and no pickles.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path

import torch

from pipeline.core.errors import PipelineError
from pipeline.model.gpt import GPT
from pipeline.tokenize.special import CHAT_ROLES, CHAT_TEMPLATE, END, EOT, PAD

log = logging.getLogger("pipeline.apps.export")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _eos(eot_id, end_id):
    eos = [i for i in (eot_id, end_id) if i is not None]
    return eos[0] if len(eos) == 1 else (eos or None)


def llama_config(model: GPT, eot_id: int | None = None, pad_id: int | None = None, end_id: int | None = None):
    from transformers import LlamaConfig

    c = model.cfg
    return LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_head,
        head_dim=c.head_dim,
        hidden_act="silu",
        max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_theta)},
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=eot_id,
        eos_token_id=_eos(eot_id, end_id),
        pad_token_id=pad_id,
    )


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our parameter names -> LlamaForCausalLM's (fused projections split by rows)."""
    c = model.cfg
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(c.n_layer):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[p + "attn.qkv.weight"].split(c.d_model, dim=0)
        gate, up = sd[p + "mlp.gate_up.weight"].split(c.mlp_hidden, dim=0)
        out.update(
            {
                q + "input_layernorm.weight": sd[p + "attn_norm.weight"],
                q + "self_attn.q_proj.weight": wq,
                q + "self_attn.k_proj.weight": wk,
                q + "self_attn.v_proj.weight": wv,
                q + "self_attn.o_proj.weight": sd[p + "attn.proj.weight"],
                q + "post_attention_layernorm.weight": sd[p + "mlp_norm.weight"],
                q + "mlp.gate_proj.weight": gate,
                q + "mlp.up_proj.weight": up,
                q + "mlp.down_proj.weight": sd[p + "mlp.down.weight"],
            }
        )
    out["lm_head.weight"] = sd["tok_emb.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def _load_into(hf, sd: dict[str, torch.Tensor]):
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the input embedding
    if missing or unexpected:
        raise RuntimeError(f"export mapping mismatch: missing={missing} unexpected={unexpected}")
    hf.tie_weights()
    return hf.eval()


def to_llama(model: GPT, eot_id: int | None = None, pad_id: int | None = None, end_id: int | None = None):
    """An in-memory `LlamaForCausalLM` with our weights (eval mode, float32)."""
    from transformers import LlamaForCausalLM

    return _load_into(LlamaForCausalLM(llama_config(model, eot_id, pad_id, end_id)), llama_state_dict(model))


def gpt2_config(model: GPT, eot_id: int | None = None, pad_id: int | None = None, end_id: int | None = None):
    from transformers import GPT2Config

    c = model.cfg
    return GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.d_model,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.mlp_hidden,
        activation_function="gelu_new",  # tanh approximation, as in GPT-2 and our GeluMLP
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=c.norm_eps,
        tie_word_embeddings=True,
        bos_token_id=eot_id,
        eos_token_id=_eos(eot_id, end_id),
        pad_token_id=pad_id,
    )


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our names -> GPT2LMHeadModel's; its Conv1D layers store weights as (in, out)."""
    c = model.cfg
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {
        "transformer.wte.weight": sd["tok_emb.weight"],
        "transformer.wpe.weight": sd["pos_emb.weight"],
        "transformer.ln_f.weight": sd["norm.weight"],
        "transformer.ln_f.bias": sd["norm.bias"],
    }
    for i in range(c.n_layer):
        p, q = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[q + theirs + ".weight"], out[q + theirs + ".bias"] = sd[p + ours + ".weight"], sd[p + ours + ".bias"]
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.fc", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            out[q + theirs + ".weight"] = sd[p + ours + ".weight"].t()
            out[q + theirs + ".bias"] = sd[p + ours + ".bias"]
    out["lm_head.weight"] = sd["tok_emb.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def to_gpt2(model: GPT, eot_id: int | None = None, pad_id: int | None = None, end_id: int | None = None):
    """An in-memory `GPT2LMHeadModel` with our weights (eval mode, float32)."""
    from transformers import GPT2LMHeadModel

    return _load_into(GPT2LMHeadModel(gpt2_config(model, eot_id, pad_id, end_id)), gpt2_state_dict(model))


def to_hf(model: GPT, eot_id=None, pad_id=None, end_id=None):
    return (to_gpt2 if model.cfg.arch == "gpt2" else to_llama)(model, eot_id, pad_id, end_id)


def hf_tokenizer(tokenizer, model_max_length: int | None = None):
    """`tokenizers.Tokenizer` -> `PreTrainedTokenizerFast` with BOS prepended and special tokens named."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = copy.deepcopy(tokenizer)
    eot = tok.token_to_id(EOT)
    if eot is not None:
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B:1", special_tokens=[(EOT, eot)]
                ),
            ]
        )
    kwargs = {}
    if eot is not None:
        kwargs.update(bos_token=EOT, eos_token=EOT)
    if tok.token_to_id(PAD) is not None:
        kwargs["pad_token"] = PAD
    if model_max_length:
        kwargs["model_max_length"] = int(model_max_length)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def gpt2_tokenizer(tokenizer, model_max_length: int | None = None):
    """Our byte-level BPE as a `GPT2Tokenizer` built from its own `vocab.json` + `merges.txt`."""
    from transformers import GPT2Tokenizer

    present = {t: tokenizer.token_to_id(t) for t in (EOT, PAD, END, *CHAT_ROLES)}
    if present[EOT] is None:
        raise PipelineError(f"a GPT-2 export needs {EOT} in the tokenizer's vocabulary")
    with tempfile.TemporaryDirectory(prefix="gpt2-tok-") as d:
        tokenizer.model.save(d)  # vocab.json, merges.txt
        kwargs = {"extra_special_tokens": [t for t in (*CHAT_ROLES, END) if present[t] is not None]}
        if present[PAD] is not None:
            kwargs["pad_token"] = PAD
        if model_max_length:
            kwargs["model_max_length"] = int(model_max_length)
        hf = GPT2Tokenizer.from_pretrained(d, bos_token=EOT, eos_token=EOT, unk_token=EOT, **kwargs)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def splits_like_gpt2(tokenizer) -> bool:
    """Whether the tokenizer pre-splits text exactly as GPT2Tokenizer does (ByteLevel with
    GPT-2's regex; `tokenizer.pattern=gpt2`), so vocab.json + merges.txt reproduce our ids."""
    pre = json.loads(tokenizer.to_str()).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def check_no_pickles(out_dir: Path) -> None:
    bad = sorted(p.name for p in Path(out_dir).rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if bad:
        raise PipelineError(f"export {out_dir} contains pickle-based files {bad}: only safetensors may be written")


def export_hf(model: GPT, tokenizer, out_dir: Path) -> Path:
    """Write `config.json`, `model.safetensors`, `generation_config.json` and the tokenizer."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    eot, pad, end = (tokenizer.token_to_id(t) for t in (EOT, PAD, END))
    hf = to_hf(model, eot, pad, end)
    hf.generation_config = GenerationConfig(
        bos_token_id=eot,
        eos_token_id=[i for i in (eot, end) if i is not None] or None,
        pad_token_id=pad if pad is not None else eot,
        do_sample=False,
    )
    hf.save_pretrained(out_dir, safe_serialization=True)
    block = model.cfg.block_size
    gpt2_tok = model.cfg.arch == "gpt2" and splits_like_gpt2(tokenizer)
    if model.cfg.arch == "gpt2" and not gpt2_tok:
        log.warning("export: the tokenizer does not split text like GPT-2 (tokenizer.pattern != gpt2): "
                    "writing it as PreTrainedTokenizerFast; load it with AutoTokenizer, not GPT2Tokenizer")
    tok = gpt2_tokenizer(tokenizer, block) if gpt2_tok else hf_tokenizer(tokenizer, block)
    tok.save_pretrained(out_dir)
    if model.cfg.arch == "gpt2":  # the files GPT-2 code expects, beside tokenizer.json
        tokenizer.model.save(str(out_dir))
    check_no_pickles(out_dir)
    return out_dir
