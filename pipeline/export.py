"""Export a trained GPT to Hugging Face `transformers` as a LlamaForCausalLM.

Our model is Llama at toy scale, so the export is a renaming of tensors: the fused
q/k/v and gate/up projections are split into Llama's separate ones. The tokenizer goes
along as a `PreTrainedTokenizerFast` that prepends `<|endoftext|>` (our document
separator, used as BOS, just as training windows see it before each document) and
carries a chat template for the fine-tuned model's `<|user|>...<|end|><|assistant|>` turns.
After `save_pretrained`, `transformers.pipeline("text-generation", model=path)` loads it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from pipeline.model.gpt import GPT

EOT, PAD, END = "<|endoftext|>", "<|pad|>", "<|end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def llama_config(model: GPT, eot_id: int | None = None, pad_id: int | None = None, end_id: int | None = None):
    from transformers import LlamaConfig

    c = model.cfg
    eos = [i for i in (eot_id, end_id) if i is not None]
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
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
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


def to_llama(model: GPT, eot_id: int | None = None, pad_id: int | None = None, end_id: int | None = None):
    """An in-memory `LlamaForCausalLM` with our weights (eval mode, float32)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(llama_config(model, eot_id, pad_id, end_id))
    missing, unexpected = hf.load_state_dict(llama_state_dict(model), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"export mapping mismatch: missing={missing} unexpected={unexpected}")
    hf.tie_weights()
    return hf.eval()


def hf_tokenizer(tokenizer):
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
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def export_hf(model: GPT, tokenizer, out_dir: Path) -> Path:
    """Write `config.json`, weights, `generation_config.json` and the tokenizer to `out_dir`."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eot, pad, end = (tokenizer.token_to_id(t) for t in (EOT, PAD, END))
    hf = to_llama(model, eot, pad, end)
    hf.generation_config = GenerationConfig(
        bos_token_id=eot,
        eos_token_id=[i for i in (eot, end) if i is not None] or None,
        pad_token_id=pad if pad is not None else eot,
        max_length=model.cfg.block_size,
        do_sample=False,
    )
    hf.save_pretrained(out_dir)
    hf_tokenizer(tokenizer).save_pretrained(out_dir)
    return out_dir
