"""A character-level tokenizer built in code, so the embedded task needs no download.

Every character of a small alphabet is one token; ``tokenizers``' WordLevel model over single characters
does the work, and ``PreTrainedTokenizerFast`` gives it the transformers interface (padding, decoding,
``save_pretrained``) that the trainer expects from any tokenizer.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
#: Digits, lower-case letters and the punctuation the templates use; order fixes the ids forever
#: (cached teachers depend on it), so only ever append to it.
ALPHABET = string.digits + string.ascii_lowercase + "+-*=#:;,.?() \n<>"


def build_char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """Return a fast tokenizer with one token per character of ``alphabet`` plus pad/bos/eos/unk.

    Prompts are left-padded (``padding_side="left"``) because generation appends on the right.
    """
    if len(set(alphabet)) != len(alphabet):
        raise ValueError("alphabet has repeated characters")
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + list(alphabet))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # [\s\S] rather than "." so that newlines are tokens too.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join without the WordLevel default space
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )
    return tok
