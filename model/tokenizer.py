"""Train a small byte-level BPE tokenizer (for tests and the demo) in Qwen2's format.

Real runs load a Qwen2 tokenizer from its directory; this builds one from a text corpus with
the ``tokenizers`` library and saves it as a ``PreTrainedTokenizerFast`` directory with the
same special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``) plus NVILA's media
tokens, loadable with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from typing import Iterable

from model.config import MEDIA_TOKENS

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *MEDIA_TOKENS]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512, out_dir: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(SPECIAL[1:2]) + list(MEDIA_TOKENS))
    if out_dir:
        fast.save_pretrained(out_dir)
    return fast
