"""Hugging Face architectures built from small configs with random weights (no downloads): real model
code standing in for "a user's model". Needs transformers (the ``hf`` extra).

``ARCHITECTURES[name] = (build, inputs)``: ``build()`` returns the model (its task head included),
``inputs()`` fresh keyword inputs (text models: a batch of 2 with the second sequence padded;
seq2seq models: decoder inputs too; vision models: 32x32 images; audio models: 0.1 s of samples).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import nn

__all__ = ["ARCHITECTURES", "output_tensors"]

_SEQ, _BATCH, _VOCAB = 12, 2, 256
_TEXT = dict(vocab_size=_VOCAB, max_position_embeddings=64)
_BERTISH = dict(**_TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _bert() -> nn.Module:
    return transformers.BertForSequenceClassification(transformers.BertConfig(**_BERTISH, num_labels=3))


def _roberta() -> nn.Module:
    return transformers.RobertaForMaskedLM(transformers.RobertaConfig(**_BERTISH, pad_token_id=1))


def _distilbert() -> nn.Module:
    cfg = transformers.DistilBertConfig(vocab_size=_VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    return transformers.DistilBertForSequenceClassification(cfg)


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=_VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg)


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _mistral() -> nn.Module:
    cfg = transformers.MistralConfig(
        vocab_size=_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=8,
    )  # fmt: skip
    return transformers.MistralForCausalLM(cfg)  # a sliding window shorter than the sequence


def _deberta_v2() -> nn.Module:  # disentangled relative-position attention
    return transformers.DebertaV2ForSequenceClassification(
        transformers.DebertaV2Config(**_BERTISH, num_labels=3)
    )


def _t5() -> nn.Module:
    cfg = transformers.T5Config(
        vocab_size=_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return transformers.T5ForConditionalGeneration(cfg)


def _bart() -> nn.Module:
    cfg = transformers.BartConfig(
        vocab_size=_VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(cfg)


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=5,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg)


def _swin() -> nn.Module:  # shifted windows: rolls, window partitions and their masks
    cfg = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=5,
    )  # fmt: skip
    return transformers.SwinForImageClassification(cfg)


def _convnext() -> nn.Module:
    cfg = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5)
    return transformers.ConvNextForImageClassification(cfg)


def _resnet() -> nn.Module:
    cfg = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5
    )
    return transformers.ResNetForImageClassification(cfg)


def _wav2vec2() -> nn.Module:
    cfg = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        num_labels=3,
    )  # fmt: skip
    return transformers.Wav2Vec2ForSequenceClassification(cfg)  # LayerDrop draws with torch.rand


def _text_inputs(seq2seq: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, _VOCAB, (_BATCH, _SEQ))
    mask = torch.ones(_BATCH, _SEQ, dtype=torch.long)
    mask[1, -4:] = 0  # the second sequence is padded
    inputs = {"input_ids": ids, "attention_mask": mask}
    if seq2seq:
        inputs["decoder_input_ids"] = torch.randint(2, _VOCAB, (_BATCH, _SEQ // 2))
    return inputs


def _image_inputs() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(_BATCH, 3, 32, 32)}


def _audio_inputs() -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(_BATCH, 1600)}  # 0.1 s at 16 kHz


ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, torch.Tensor]]]] = {
    "bert": (_bert, _text_inputs),
    "roberta": (_roberta, _text_inputs),
    "distilbert": (_distilbert, _text_inputs),
    "gpt2": (_gpt2, _text_inputs),
    "llama": (_llama, _text_inputs),
    "mistral": (_mistral, _text_inputs),
    "deberta_v2": (_deberta_v2, _text_inputs),
    "t5": (_t5, lambda: _text_inputs(seq2seq=True)),
    "bart": (_bart, lambda: _text_inputs(seq2seq=True)),
    "vit": (_vit, _image_inputs),
    "swin": (_swin, _image_inputs),
    "convnext": (_convnext, _image_inputs),
    "resnet": (_resnet, _image_inputs),
    "wav2vec2": (_wav2vec2, _audio_inputs),
}


def output_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output, in order: ModelOutputs, tuples, and a cache's keys and values."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in output_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in output_tensors(v)]
    layers = getattr(obj, "layers", None)  # a transformers Cache
    if layers is not None:
        pairs = [[getattr(layer, "keys", None), getattr(layer, "values", None)] for layer in layers]
        return output_tensors(pairs)
    return []
