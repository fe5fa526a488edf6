"""A catalogue of tiny ``transformers`` architectures for coverage benchmarks and tests.

Each :class:`HFArch` builds one Hugging Face model from a config with random weights (no
download, no tokenizer) and a matching batch of example inputs::

    model, inputs = get_arch("llama").build(2)
    loss = model(**inputs).loss          # the training loss; `inputs` includes `labels`

Every model is tiny (2 layers, or 2 stages for CNNs / Swin; width <= 64; vocabulary 256;
sequences of 16 tokens; 32x32 images), widths, heads and experts are divisible by 4 where the
architecture allows it (so tensor / expert parallelism over 4 ranks is plausible), every
dropout is 0 (training steps are deterministic), ``use_cache`` is off, attention uses
``"sdpa"`` where the model supports it (else ``"eager"``), weights come from
``torch.manual_seed(0)`` and inputs from a seeded ``torch.Generator``. Models are returned in
``train()`` mode.

``transformers`` is imported lazily inside the builders, so importing this module does not
need it. Every entry builds, runs forward + backward at batch 2 and 3, and exports with
``torch.export.export(model, (), kwargs=inputs, strict=False)`` with transformers 5.25 /
torch 2.13 (MoE entries through ``MOE_EXPERTS``, see there).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SEQ = 16  # tokens per text sample (encoder and decoder side)
IMAGE = 32  # image side in pixels (3 channels)
VOCAB = 256  # vocabulary size of every text model
NUM_LABELS = 8  # classes of the classification heads
MEL_BINS = 16  # Whisper's input feature channels
# How MoE layers run their experts (transformers' `experts_implementation`). "batched_mm" gathers each
# token's expert weights and uses bmm: static shapes, plain aten ops, identical losses. The library
# default "grouped_mm" exports to an opaque custom op (`transformers::grouped_mm_fallback`) for fp32
# weights, and "eager" loops over the experts hit (data-dependent; torch.export fails).
MOE_EXPERTS = "batched_mm"
FAMILIES = ("decoder", "moe", "encoder", "encoder-decoder", "vit", "cnn")

Inputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HFArch:
    """One catalogue entry: ``build(batch) -> (model in train mode, kwargs incl. labels)``."""

    name: str  # short id, e.g. "llama"
    family: str  # one of FAMILIES
    feature: str  # the architectural feature this entry covers, e.g. "GQA"
    build: Callable[[int], tuple[nn.Module, Inputs]]


# --------------------------------------------------------------------------- model construction

# Config keys holding a dropout-like probability (all zeroed); matched as substrings.
_DROPOUT_KEYS = ("dropout", "pdrop", "drop_path", "layerdrop", "drop_connect", "jitter_noise")


def _zero_dropout(config: Any) -> None:
    """Set every dropout-like probability of ``config`` to 0 (``None`` ones stay ``None``)."""
    for key, value in list(vars(config).items()):
        if any(k in key for k in _DROPOUT_KEYS) and isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(config, key, 0.0)


def _make(config_cls: str, model_cls: str, overrides: dict[str, Any], experts: str | None = None) -> nn.Module:
    """``model_cls(config_cls(**overrides))`` with dropout 0, no KV cache, sdpa/eager attention, seed 0.

    ``experts`` selects the MoE experts implementation (None: the library default).
    """
    import transformers

    config_type = getattr(transformers, config_cls)
    model_type = getattr(transformers, model_cls)
    config = config_type(**overrides)
    _zero_dropout(config)
    if hasattr(config, "use_cache"):
        config.use_cache = False
    config._attn_implementation = "sdpa" if getattr(model_type, "_supports_sdpa", False) else "eager"
    if experts is not None:
        config._experts_implementation = experts
    torch.manual_seed(0)
    return model_type(config).train()


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def _tokens(g: torch.Generator, batch: int, vocab: int = VOCAB, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=g)


def _classes(g: torch.Generator, batch: int) -> torch.Tensor:
    return torch.randint(0, NUM_LABELS, (batch,), generator=g)


# --------------------------------------------------------------------------- per-family builders

# Classification heads: an explicit problem_type picks plain cross-entropy (DeBERTa-v2's default
# loss path filters labels with a data-dependent `nonzero`, which torch.export cannot trace).
_CLASSIFY = dict(num_labels=NUM_LABELS, problem_type="single_label_classification")


def _decoder(name: str, feature: str, config_cls: str, model_cls: str, family: str = "decoder", **overrides: Any) -> HFArch:
    """Causal LM: ``input_ids``, ``attention_mask``, ``labels = input_ids`` (the model shifts them)."""
    experts = MOE_EXPERTS if family == "moe" else None

    def build(batch: int) -> tuple[nn.Module, Inputs]:
        model = _make(config_cls, model_cls, overrides, experts)
        ids = _tokens(_gen(), batch)
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    return HFArch(name, family, feature, build)


def _encoder(name: str, feature: str, config_cls: str, model_cls: str, **overrides: Any) -> HFArch:
    """Encoder with a sequence-classification head (labels (B,)) or an MLM head (labels (B, T))."""
    mlm = model_cls.endswith("ForMaskedLM")
    head = {} if mlm else _CLASSIFY

    def build(batch: int) -> tuple[nn.Module, Inputs]:
        model = _make(config_cls, model_cls, {**head, **overrides})
        g = _gen()
        ids = _tokens(g, batch)
        labels = _tokens(g, batch) if mlm else _classes(g, batch)
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    return HFArch(name, "encoder", feature, build)


def _seq2seq(name: str, feature: str, config_cls: str, model_cls: str, **overrides: Any) -> HFArch:
    """Encoder-decoder LM: the model derives ``decoder_input_ids`` from ``labels`` (shift right)."""

    def build(batch: int) -> tuple[nn.Module, Inputs]:
        model = _make(config_cls, model_cls, overrides)
        g = _gen()
        ids = _tokens(g, batch)
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _tokens(g, batch)}

    return HFArch(name, "encoder-decoder", feature, build)


def _speech2seq(name: str, feature: str, config_cls: str, model_cls: str, **overrides: Any) -> HFArch:
    """Whisper-style: ``input_features`` (B, mel bins, 2 * max_source_positions) + decoder ``labels``."""

    def build(batch: int) -> tuple[nn.Module, Inputs]:
        model = _make(config_cls, model_cls, overrides)
        g = _gen()
        frames = 2 * model.config.max_source_positions  # the conv front-end halves the frames
        features = torch.randn(batch, model.config.num_mel_bins, frames, generator=g)
        return model, {"input_features": features, "labels": _tokens(g, batch)}

    return HFArch(name, "encoder-decoder", feature, build)


def _image(name: str, family: str, feature: str, config_cls: str, model_cls: str, **overrides: Any) -> HFArch:
    """Image classifier: ``pixel_values`` (B, 3, IMAGE, IMAGE) + class ``labels`` (B,)."""

    def build(batch: int) -> tuple[nn.Module, Inputs]:
        model = _make(config_cls, model_cls, {**_CLASSIFY, **overrides})
        g = _gen()
        pixels = torch.randn(batch, 3, IMAGE, IMAGE, generator=g)
        return model, {"pixel_values": pixels, "labels": _classes(g, batch)}

    return HFArch(name, family, feature, build)


# --------------------------------------------------------------------------- shared shapes

# Special token ids inside the 256-token vocabulary (several configs default to ids >= 50k).
_TOK = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Llama-style configs: hidden 64, 4 heads of 16, FFN 128, 2 layers.
_LM = dict(
    _TOK,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
)
# GPT-2-style configs (n_embd / n_layer / n_head / n_inner).
_GPT = dict(_TOK, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=64)
# BERT-style encoders.
_BERT = dict(
    _TOK,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
# BART-style encoder-decoders (2 encoder + 2 decoder layers).
_BART = dict(
    _TOK,
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    max_position_embeddings=64,
    decoder_start_token_id=2,
    forced_eos_token_id=2,
)
# ViT-style image transformers: 32x32 images in 8x8 patches -> 16 patch tokens.
_VIT = dict(
    image_size=IMAGE,
    patch_size=8,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
)
# MoE: top-2 routing; the loss includes the router's load-balancing loss (not in DeepSeek-V3, which has none).
_MOE = dict(_LM, num_experts_per_tok=2, output_router_logits=True)


# --------------------------------------------------------------------------- the catalogue

ARCHS: tuple[HFArch, ...] = (
    # ---- decoder-only LMs
    _decoder("gpt2", "learned positions, Conv1D", "GPT2Config", "GPT2LMHeadModel", **_GPT),
    _decoder("llama", "GQA", "LlamaConfig", "LlamaForCausalLM", **{**_LM, "num_key_value_heads": 2}),
    _decoder(
        "mistral", "sliding window", "MistralConfig", "MistralForCausalLM",
        **{**_LM, "num_key_value_heads": 2, "sliding_window": 8},
    ),
    _decoder("qwen2", "QKV bias", "Qwen2Config", "Qwen2ForCausalLM", **{**_LM, "num_key_value_heads": 2}),
    _decoder("qwen3", "QK norm", "Qwen3Config", "Qwen3ForCausalLM", **{**_LM, "num_key_value_heads": 2, "head_dim": 16}),
    _decoder("gemma", "GeGLU, scaled embeddings", "GemmaConfig", "GemmaForCausalLM", **{**_LM, "head_dim": 16}),
    _decoder(
        "gemma2", "logit soft-capping, local/global", "Gemma2Config", "Gemma2ForCausalLM",
        **{**_LM, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8},
    ),
    _decoder(
        "gemma3", "QK norm, local/global", "Gemma3TextConfig", "Gemma3ForCausalLM",
        **{
            **_LM, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    _decoder("phi", "partial rotary, parallel attn+MLP", "PhiConfig", "PhiForCausalLM", **_LM),
    _decoder("phi3", "fused QKV and gate_up", "Phi3Config", "Phi3ForCausalLM", **_LM),
    _decoder("gpt_neox", "parallel residual", "GPTNeoXConfig", "GPTNeoXForCausalLM", **_LM),
    _decoder("bloom", "ALiBi", "BloomConfig", "BloomForCausalLM", **_TOK, hidden_size=64, n_layer=2, n_head=4),
    _decoder(
        "falcon", "MQA, parallel attn", "FalconConfig", "FalconForCausalLM",
        **_TOK, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=128,
        multi_query=True, parallel_attn=True, max_position_embeddings=64,
    ),
    _decoder(
        "opt", "ReLU FFN, learned positions", "OPTConfig", "OPTForCausalLM",
        **{**_TOK, "pad_token_id": 1, "bos_token_id": 2},
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
        max_position_embeddings=64,
    ),
    _decoder("gptj", "parallel block, interleaved rotary", "GPTJConfig", "GPTJForCausalLM", **_GPT, rotary_dim=8),
    _decoder("gpt_bigcode", "MQA", "GPTBigCodeConfig", "GPTBigCodeForCausalLM", **_GPT, multi_query=True),
    _decoder(
        "starcoder2", "GQA with biases, LayerNorm", "Starcoder2Config", "Starcoder2ForCausalLM",
        **{**_LM, "num_key_value_heads": 2},
    ),
    _decoder("olmo2", "post-norm, QK norm", "Olmo2Config", "Olmo2ForCausalLM", **_LM),
    # ---- mixture-of-experts LMs (4 or 8 experts, top-2)
    _decoder(
        "mixtral", "sparse MoE top-2", "MixtralConfig", "MixtralForCausalLM", family="moe",
        **{**_MOE, "num_key_value_heads": 2, "num_local_experts": 4},
    ),
    _decoder(
        "qwen2_moe", "shared expert", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", family="moe",
        **_MOE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64,
    ),
    _decoder(
        "qwen3_moe", "MoE with QK norm", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", family="moe",
        **{**_MOE, "num_key_value_heads": 2}, head_dim=16, num_experts=8, moe_intermediate_size=32,
    ),
    _decoder(
        "olmoe", "fine-grained experts", "OlmoeConfig", "OlmoeForCausalLM", family="moe",
        **{**_MOE, "intermediate_size": 32}, num_experts=8,
    ),
    _decoder(
        "deepseek_v3", "MLA, group-limited routing", "DeepseekV3Config", "DeepseekV3ForCausalLM", family="moe",
        **_MOE, moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=8, n_group=2, topk_group=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16,
    ),
    # ---- encoders
    _encoder("bert", "post-LN, MLM head", "BertConfig", "BertForMaskedLM", **_BERT),
    _encoder("roberta", "padding-offset positions", "RobertaConfig", "RobertaForSequenceClassification", **_BERT),
    _encoder(
        "distilbert", "no token types or pooler", "DistilBertConfig", "DistilBertForSequenceClassification",
        **_TOK, dim=64, hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=64,
    ),
    _encoder(
        "electra", "embedding projection", "ElectraConfig", "ElectraForSequenceClassification",
        **_BERT, embedding_size=32,
    ),
    _encoder(
        "albert", "shared layers, factorized embedding", "AlbertConfig", "AlbertForMaskedLM",
        **_BERT, embedding_size=32,
    ),
    _encoder(
        "deberta_v2", "disentangled attention", "DebertaV2Config", "DebertaV2ForSequenceClassification",
        **_BERT, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
    ),
    # ---- encoder-decoders
    _seq2seq(
        "t5", "relative position bias", "T5Config", "T5ForConditionalGeneration",
        **{**_TOK, "eos_token_id": 1}, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        decoder_start_token_id=0,
    ),
    _seq2seq("bart", "post-LN, learned positions", "BartConfig", "BartForConditionalGeneration", **_BART),
    _seq2seq("mbart", "pre-LN", "MBartConfig", "MBartForConditionalGeneration", **_BART),
    _seq2seq(
        "marian", "sinusoidal positions", "MarianConfig", "MarianMTModel",
        **{**_BART, "decoder_start_token_id": 0},
    ),
    _speech2seq(
        "whisper", "conv audio front-end", "WhisperConfig", "WhisperForConditionalGeneration",
        **{k: v for k, v in _BART.items() if k not in ("max_position_embeddings", "forced_eos_token_id")},
        num_mel_bins=MEL_BINS, max_source_positions=16, max_target_positions=32, begin_suppress_tokens=None,
    ),
    # ---- vision transformers
    _image("vit", "vit", "CLS-token classifier", "ViTConfig", "ViTForImageClassification", **_VIT),
    # DeiT and BEiT zero-initialise their CLS (and distillation) tokens (and DeiT its position
    # embeddings): with the default layer_norm_eps=1e-12 the first LayerNorm of an all-zero token
    # makes the gradient norm ~6e4 (DeiT) / ~3e2 (BEiT); eps=1e-6 keeps it ~1e1.
    _image(
        "deit", "vit", "distillation token", "DeiTConfig", "DeiTForImageClassification", **_VIT, layer_norm_eps=1e-6,
    ),
    _image(
        "swin", "vit", "shifted windows, patch merging", "SwinConfig", "SwinForImageClassification",
        image_size=IMAGE, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[4, 4], window_size=4,
    ),
    _image(
        "beit", "vit", "relative position bias, layer scale", "BeitConfig", "BeitForImageClassification",
        **_VIT, use_relative_position_bias=True, layer_norm_eps=1e-6,
    ),
    _image(
        "dinov2", "vit", "SwiGLU, layer scale", "Dinov2Config", "Dinov2ForImageClassification",
        **{k: v for k, v in _VIT.items() if k != "intermediate_size"}, mlp_ratio=2, use_swiglu_ffn=True,
        use_mask_token=False,  # the mask token is only used with bool_masked_pos: it would get no gradient
    ),
    # ---- CNNs (2 stages)
    _image(
        "resnet", "cnn", "batch norm", "ResNetConfig", "ResNetForImageClassification",
        embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="basic",
    ),
    _image(
        "convnext", "cnn", "depthwise 7x7, LayerNorm", "ConvNextConfig", "ConvNextForImageClassification",
        image_size=IMAGE, num_stages=2, hidden_sizes=[32, 64], depths=[1, 1],
    ),
    _image(
        "regnet", "cnn", "grouped conv, squeeze-excite", "RegNetConfig", "RegNetForImageClassification",
        embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], groups_width=8,
    ),
    # EfficientNet scales every base width by width_coefficient (and the head is round(1280 * w)), so the
    # base widths below are 20x the real ones: stem 8 -> MBConv 16 -> MBConv 32 -> head 64. Its init draws
    # BatchNorm weights from N(0, initializer_range): at the default 0.02 the activations vanish through the
    # stacked BatchNorms (logits ~1e-14, loss exactly ln 8), hence 0.5.
    _image(
        "efficientnet", "cnn", "MBConv, squeeze-excite", "EfficientNetConfig", "EfficientNetForImageClassification",
        image_size=IMAGE, width_coefficient=0.05, depth_coefficient=1.0, kernel_sizes=[3, 3],
        in_channels=[32, 320], out_channels=[320, 640], strides=[2, 2], num_block_repeats=[1, 1],
        expand_ratios=[1, 4], squeeze_expansion_ratio=0.5, hidden_dim=64, initializer_range=0.5,
    ),
)

_BY_NAME = {arch.name: arch for arch in ARCHS}
assert len(_BY_NAME) == len(ARCHS), "duplicate catalogue names"
assert all(arch.family in FAMILIES for arch in ARCHS)


def get_arch(name: str) -> HFArch:
    """The catalogue entry called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(_BY_NAME)}") from None


def build(name: str, batch: int = 2) -> tuple[nn.Module, Inputs]:
    """``get_arch(name).build(batch)``: (model in train mode, example kwargs including ``labels``)."""
    return get_arch(name).build(batch)


__all__ = ["HFArch", "ARCHS", "FAMILIES", "get_arch", "build"]
