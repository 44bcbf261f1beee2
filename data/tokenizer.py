"""Tokenizers, saved so that `AutoTokenizer.from_pretrained(folder)` loads them.

Both kinds are byte-level, so any Unicode text round-trips exactly: `bpe` learns merges on the train
split (as Grok's SentencePiece does on its corpus); `byte` is the 256 bytes and nothing else.
Special tokens sit at fixed ids, as in grok-1: pad 0, bos 1, eos 2, unk 3.
"""

import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
BYTE_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
# A piece is what the tokenizer sees at once: its memory is ~100 bytes per character of it, so pieces are
# small; they are cut before a whitespace that starts a word, where byte-level BPE splits words anyway,
# so cutting changes no token (only a run of 8192 characters without such a place is cut inside a word).
PIECE_CHARS = 1 << 13
PIECE_CUT = re.compile(r".*\s(?=\S)", re.DOTALL)  # greedy: the last whitespace before a non-whitespace


def pieces(text: str, budget: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most `budget` characters, each (but the first) starting at a
    whitespace that begins a word, within the last half of the budget when there is one."""
    start = 0
    while len(text) - start > budget:
        found = PIECE_CUT.match(text, start + budget // 2, start + budget)
        cut = found.end() - 1 if found else start + budget
        yield text[start:cut]
        start = cut
    yield text[start:]


def _byte_level(model: models.Model) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    if vocab_size < BYTE_VOCAB_SIZE:
        raise ValueError(
            f"--vocab-size {vocab_size} is below the {BYTE_VOCAB_SIZE} byte-level base vocabulary; "
            f"use at least {BYTE_VOCAB_SIZE} (or --tokenizer byte)"
        )
    tokenizer = _byte_level(models.BPE(unk_token=None))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _gpt2_byte_map() -> dict[str, int]:
    """ByteLevel's alphabet: the character that stands for each byte (GPT-2's bytes_to_unicode), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_of_char, extra = {}, 0
    for b in range(256):
        if b in printable:
            byte_of_char[chr(b)] = b
        else:
            byte_of_char[chr(256 + extra)] = b
            extra += 1
    return byte_of_char


BYTE_OF_CHAR = _gpt2_byte_map()


def byte_tokenizer() -> Tokenizer:
    """Specials at 0-3, then byte b at id 4 + b: a BPE with the byte alphabet and no merges."""
    alphabet = sorted(BYTE_OF_CHAR, key=BYTE_OF_CHAR.__getitem__)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet)}
    tokenizer = _byte_level(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def save(tokenizer: Tokenizer, folder: Path) -> str:
    """Writes the transformers tokenizer files; returns the sha256 of tokenizer.json (the tokenizer's identity)."""
    wrap(tokenizer).save_pretrained(folder)
    return tokenizer_sha256(folder)


def tokenizer_sha256(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / "tokenizer.json").read_bytes()).hexdigest()


def load(folder: Path) -> PreTrainedTokenizerFast:
    """The fast tokenizer class itself: AutoTokenizer would follow tokenizer_config.json to any class it names."""
    from .shards import DataError

    try:
        return PreTrainedTokenizerFast.from_pretrained(folder)
    except Exception as error:  # the tokenizers library raises its own exception types for a damaged file
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise DataError(
            f"{Path(folder) / 'tokenizer.json'}: unreadable tokenizer ({first[:200]}); re-create it "
            f"(data.prepare --overwrite, or export again)"
        ) from error


def token_byte_lengths(tokenizer: PreTrainedTokenizerFast) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for specials): the denominator of bits-per-byte."""
    lengths = np.zeros(len(tokenizer), dtype=np.int64)
    for token, token_id in tokenizer.get_vocab().items():
        if token not in SPECIAL_TOKENS:
            lengths[token_id] = len(token)  # ByteLevel: one alphabet character per byte
    return lengths
