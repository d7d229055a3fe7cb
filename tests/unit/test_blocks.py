import pytest
import torch

from fedtune.config.schema import DataConfig
from fedtune.data.blocks import Corpus, pack, pack_counted, pack_documents, split_docs
from fedtune.data.dedup import split_order
from fedtune.data.shards import ClientShards, tokenize_cached
from fedtune.errors import DataError
from fedtune.models.load import byte_tokenizer
from fedtune.seeding import torch_generator


def test_pack_joins_documents_with_eos_and_cuts_blocks() -> None:
    tok = byte_tokenizer()
    blocks = pack(["abc", "defgh"], tok, block_size=4)
    # 3 + 1 + 5 + 1 = 10 tokens -> 2 blocks of 4, remainder dropped
    assert blocks.shape == (2, 4)
    assert blocks[0, 3].item() == tok.eos_token_id
    assert tok.decode(blocks[1].tolist()) == "defg"


def test_split_docs_is_disjoint_and_keeps_test_and_train() -> None:
    docs = [f"d{i}" for i in range(20)]
    tr, va, te = split_docs(docs, 0.1, 0.2, torch.Generator().manual_seed(0))
    assert (len(tr), len(va), len(te)) == (14, 2, 4)
    assert sorted(tr + va + te) == sorted(docs)
    tr, va, te = split_docs(docs[:2], 0.1, 0.1, torch.Generator().manual_seed(0))
    assert len(tr) == 1 and len(te) == 1 and va == []


def _corpus(parts: dict[str, list[str]]) -> tuple[dict[str, list[int]], Corpus]:
    texts = [t for docs in parts.values() for t in docs]
    ids, start = {}, 0
    for cid, docs in parts.items():
        ids[cid], start = list(range(start, start + len(docs))), start + len(docs)
    return ids, Corpus(texts, [0] * len(texts))


def test_client_without_enough_data_is_named() -> None:
    tok = byte_tokenizer()
    docs, corpus = _corpus({"big": ["x" * 500] * 10, "tiny": ["hi"], "short": ["ab", "cd", "ef"]})
    with pytest.raises(DataError) as e:
        ClientShards(docs, corpus, tok, DataConfig(block_size=64), seed=0)
    msg = str(e.value)
    assert "client 'tiny' has 1 document(s)" in msg
    assert "client 'short' has" in msg and "'big'" not in msg
    assert "lower data.block_size" in msg


class CountingTokenizer:
    """The byte tokenizer, counting the texts it is asked to tokenize."""

    def __init__(self) -> None:
        self.tok, self.texts = byte_tokenizer(), 0
        self.eos_token_id, self.backend_tokenizer = self.tok.eos_token_id, self.tok.backend_tokenizer
        self.special_tokens_map = self.tok.special_tokens_map

    def __call__(self, texts: list[str], **kw: object) -> object:
        self.texts += len(texts)
        return self.tok(texts, **kw)


@pytest.mark.parametrize("doc_unit", [False, True], ids=["packed", "document-unit"])
def test_lazy_shards_equal_eager_ones(doc_unit: bool, tmp_path, monkeypatch) -> None:
    """Reference: each client's own documents split, tokenized and packed on their own (what the
    eager path did); the lazy shards pack from the once-tokenized corpus, with the same sizes and
    data report, and the corpus is tokenized once for all clients."""
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    rng = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    parts = {
        f"c{k}": [" ".join(words[int(i)] for i in torch.randint(0, 5, (int(n),), generator=rng)) for n in sizes]
        for k, sizes in enumerate(torch.randint(1, 40, (6, 9), generator=rng))
    }
    docs, corpus = _corpus(parts)
    cfg = DataConfig(block_size=16, val_fraction=0.2, test_fraction=0.2, max_train_blocks=9, max_test_blocks=3)
    tok = CountingTokenizer()
    lazy = ClientShards(docs, corpus, tok, cfg, seed=4, doc_unit=doc_unit, cache_size=2)
    assert tok.texts == len(corpus.texts)  # planned from token lengths: nothing packed yet
    for cid, texts in parts.items():
        tr, va, te = split_order(len(texts), 0.2, 0.2, torch_generator(4, "split", cid))
        (train, n_tr), (val, n_va), (test, n_te) = (
            pack_counted([texts[i] for i in x], tok.tok, 16) for x in (tr, va, te)
        )
        if doc_unit:
            train, doc, mask, n_tr = pack_documents([texts[i] for i in tr], tok.tok, 16)
            assert torch.equal(lazy[cid].train_doc, doc[:9]) and torch.equal(lazy[cid].train_mask, mask[:9])
        s = lazy[cid]
        assert torch.equal(s.train, train[:9]) and torch.equal(s.val, val[:3]) and torch.equal(s.test, test[:3])
        assert s.num_docs == len(texts)
        st = lazy.stats[cid]
        assert (st["tokens_train"], st["tokens_val"], st["tokens_test"]) == (n_tr, n_va, n_te)
        assert (st["blocks_train"], st["blocks_val"], st["blocks_test"]) == tuple(
            x.shape[0] for x in (s.train, s.val, s.test)
        )
        assert st["blocks_capped"] == train.shape[0] + val.shape[0] + test.shape[0] - sum(
            x.shape[0] for x in (s.train, s.val, s.test)
        )
    assert tok.texts == len(corpus.texts)  # building packs the tokenized corpus; no second pass
    assert len(lazy._cache) == 2  # bounded: the two most recently used


def test_tokenized_corpus_is_cached_on_disk_by_content(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    tok = CountingTokenizer()
    flat, offsets = tokenize_cached(["abc", "de"], tok)
    assert offsets.tolist() == [0, 3, 5] and tok.tok.decode(flat.tolist()) == "abcde"
    again = tokenize_cached(["abc", "de"], tok)
    assert tok.texts == 2 and torch.equal(torch.from_numpy(again[0]), torch.from_numpy(flat))  # read back
    tokenize_cached(["abc", "dE"], tok)  # a changed text is a new key, never a stale hit
    assert tok.texts == 4 and len(list((tmp_path / "tokens").glob("*.npz"))) == 2
