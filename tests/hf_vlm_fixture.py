"""Tiny random image-text-to-text models of two transformers families, saved as the hub ships
them (model, processor, tokenizer, chat template), for the DeltaLoss tests.

- Qwen2-VL: ``Qwen2VLForConditionalGeneration`` with ``Qwen2VLProcessor`` (the image processor
  limited to small images); images are ``<|vision_start|><|image_pad|><|vision_end|>`` in ChatML.
- Idefics3 (SmolVLM's architecture): ``Idefics3ForConditionalGeneration`` with
  ``Idefics3Processor``; images are ``<image>`` in ``User:`` / ``Assistant:`` turns.

The tokenizers are byte-level BPEs trained here on the test texts with each family's special
tokens; the chat templates are minimal ones written for these tests in each family's format.
"""

from __future__ import annotations

import os

import torch

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IDEFICS_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %} {{ c['text'] }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def _bpe(texts, specials, vocab_size=400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token=specials[0], eos_token=specials[2])


def make_qwen2_vl(path: str, texts, seed: int = 0, layers: int = 1) -> str:
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tok = _bpe(texts, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"])
    ids = tok.convert_tokens_to_ids
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=True),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, in_chans=3, mlp_ratio=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"), bos_token_id=None,
        eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    small = dict(min_pixels=56 * 56, max_pixels=112 * 112)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**small), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(**small), chat_template=QWEN_TEMPLATE)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def make_idefics3(path: str, texts, seed: int = 0, layers: int = 1) -> str:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tok = _bpe(texts, ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                       "<global-img>"])
    cfg = Idefics3Config(
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=4096, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg)
    # 32 px tiles of 8 px patches -> 16 patches -> 4 tokens after the 2x2 pixel shuffle
    ip = Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS_TEMPLATE)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def make_pair(root: str, family: str, texts, seeds=(0, 1)) -> tuple[str, str]:
    """(small, large) of one family: the large one has two LLM layers."""
    make = {"qwen2_vl": make_qwen2_vl, "idefics3": make_idefics3}[family]
    return (make(os.path.join(root, f"{family}-small"), texts, seeds[0], layers=1),
            make(os.path.join(root, f"{family}-large"), texts, seeds[1], layers=2))
