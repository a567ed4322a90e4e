"""A T5 tokenizer built offline with the ``tokenizers`` library, for tiny random FLUX.1 folders.

FLUX.1's second text encoder is T5-XXL, whose SentencePiece model cannot be downloaded where spurgen is built.
A tiny random T5 needs no real vocabulary, only T5's layout: SentencePiece-style Unigram pieces with the
word-start marker, ``<pad>`` = 0, ``</s>`` = 1 appended to every sequence, ``<unk>`` = 2. The pieces here are
single characters (with and without the marker) and a few whole words of spurgen's prompts, so that any prompt
tokenizes and the usual ones into few tokens.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["T5_VOCAB_SIZE", "build_t5_tokenizer"]

_WORDS = ("a", "photo", "of", "sks", "red", "feeder", "flower")
_CHARACTERS = string.ascii_lowercase + string.digits + string.punctuation
# <pad>, </s>, <unk>, the bare marker, each character with and without it, and the words.
T5_VOCAB_SIZE = 3 + 1 + 2 * len(_CHARACTERS) + len(_WORDS)


def build_t5_tokenizer(max_length: int = 512) -> "PreTrainedTokenizerBase":
    """A T5 tokenizer of ``T5_VOCAB_SIZE`` pieces, saved and loaded as ``T5TokenizerFast`` (an upper-case letter
    is ``<unk>``: the pieces are lower case).

    Args:
        max_length: Its ``model_max_length`` (FLUX.1's pipeline pads T5's input to ``max_sequence_length``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    # Unigram scores: whole words before characters, so "photo" is one piece rather than five.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -3.0) for c in _CHARACTERS] + [(c, -4.0) for c in _CHARACTERS]
    pieces += [("\u2581" + word, -1.0) for word in _WORDS]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=max_length)
