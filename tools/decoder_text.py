"""Token data for the decoder benchmark: a small byte-level BPE tokenizer and packed token rows.

Used by tools/export_decoder.py. Standard library and numpy only, so it runs in any environment.
The text is the standard library's docstring sentences (tools/minilm_sentences.py); nothing is
downloaded. The tokenizer starts from the 256 byte values and learns merges of frequent adjacent
pairs inside words (a word carries its leading space, as GPT-2's does), so every text encodes.

Ids: 0 = <pad>, 1 = <bos>, 2 = <eos>, 3..258 = bytes 0..255, then one id per learned merge.
"""

import json
import re
from collections import Counter, defaultdict

import numpy as np

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3
WORD = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^A-Za-z0-9\s]+|\s+")


def words_of(text):
    """Split text into words with their leading space (the units merges never cross)."""
    return WORD.findall(text)


def _pairs(symbols):
    return zip(symbols, symbols[1:])


def train_bpe(texts, vocab_size):
    """Learn merges until the vocabulary has ``vocab_size`` ids; returns the list of merged id pairs.

    Pair counts are kept up to date incrementally: a merge only touches the words that contain it.
    Ties are broken by the smaller pair, so the result does not depend on dict order.
    """
    counts = Counter(word for text in texts for word in words_of(text))
    words = [[BYTE_OFFSET + b for b in word.encode("utf-8")] for word in counts]
    freqs = list(counts.values())
    pair_counts = Counter()
    where = defaultdict(set)
    for index, (symbols, freq) in enumerate(zip(words, freqs)):
        for pair in _pairs(symbols):
            pair_counts[pair] += freq
            where[pair].add(index)
    merges = []
    next_id = BYTE_OFFSET + 256
    while next_id < vocab_size and pair_counts:
        best = max(pair_counts.items(), key=lambda item: (item[1], -item[0][0], -item[0][1]))[0]
        if pair_counts[best] < 2:
            break
        merges.append(best)
        for index in sorted(where.pop(best, ())):
            symbols, freq = words[index], freqs[index]
            for pair in _pairs(symbols):
                pair_counts[pair] -= freq
            merged = _apply_merge(symbols, best, next_id)
            words[index] = merged
            for pair in _pairs(merged):
                pair_counts[pair] += freq
                where[pair].add(index)
        pair_counts = Counter({pair: c for pair, c in pair_counts.items() if c > 0})
        next_id += 1
    return merges


def _apply_merge(symbols, pair, new_id):
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


class Tokenizer:
    """Encode and decode with learned merges (applied in the order they were learned)."""

    def __init__(self, merges):
        self.merges = [tuple(pair) for pair in merges]
        self.rank = {pair: BYTE_OFFSET + 256 + i for i, pair in enumerate(self.merges)}
        self.pieces = {BYTE_OFFSET + b: bytes([b]) for b in range(256)}
        for (a, b), new_id in self.rank.items():
            self.pieces[new_id] = self.pieces[a] + self.pieces[b]
        self._cache = {}

    @property
    def vocab_size(self):
        return BYTE_OFFSET + 256 + len(self.merges)

    def _encode_word(self, word):
        if word not in self._cache:
            symbols = [BYTE_OFFSET + b for b in word.encode("utf-8")]
            while len(symbols) > 1:
                pair = min(_pairs(symbols), key=lambda p: self.rank.get(p, 1 << 30))
                if pair not in self.rank:
                    break
                symbols = _apply_merge(symbols, pair, self.rank[pair])
            self._cache[word] = symbols
        return self._cache[word]

    def encode(self, text):
        """<bos> text <eos> as a list of ids."""
        ids = [BOS]
        for word in words_of(text):
            ids.extend(self._encode_word(word))
        return ids + [EOS]

    def decode(self, ids):
        return b"".join(self.pieces.get(int(i), b"") for i in ids).decode("utf-8", errors="replace")

    def to_json(self):
        return json.dumps({"kind": "byte-level BPE", "pad": PAD, "bos": BOS, "eos": EOS,
                           "byte_offset": BYTE_OFFSET, "merges": [list(p) for p in self.merges]})


def pack_rows(encoded, length, rows=None):
    """Pack whole encoded sentences into rows of at most ``length`` ids, right-padded with <pad>.

    Returns {'input_ids', 'attention_mask'} int64 [rows, length]; sentences longer than a row are cut.
    ``rows`` caps the number of rows (None: as many as the sentences fill).
    """
    packed, current = [], []
    for ids in encoded:
        ids = ids[:length]
        if len(current) + len(ids) > length:
            packed.append(current)
            current = []
            if rows is not None and len(packed) == rows:
                break
        current = current + ids
    if current and (rows is None or len(packed) < rows):
        packed.append(current)
    input_ids = np.full((len(packed), length), PAD, dtype=np.int64)
    mask = np.zeros((len(packed), length), dtype=np.int64)
    for i, ids in enumerate(packed):
        input_ids[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def unigram_perplexity(train_ids, eval_rows):
    """Perplexity of an add-one unigram model fitted on ``train_ids`` at the next-token targets of ``eval_rows``."""
    vocab = int(max(train_ids.max(), eval_rows["input_ids"].max())) + 1
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    targets, keep = next_token_targets(eval_rows)
    return float(np.exp(-log_p[targets[keep]].mean()))


def next_token_targets(rows):
    """Targets (ids shifted left by one) and where they count (both positions are real tokens)."""
    ids, mask = rows["input_ids"], rows["attention_mask"]
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    keep = np.zeros(ids.shape, dtype=bool)
    keep[:, :-1] = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
    return targets, keep
