import datasets
import pytest
import torch

from fedtune.config.schema import DataConfig
from fedtune.data.blocks import make_shards, pack, split_docs
from fedtune.errors import DataError
from fedtune.models.load import byte_tokenizer


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


def test_client_without_enough_data_is_named() -> None:
    tok = byte_tokenizer()
    parts = {
        "big": datasets.Dataset.from_dict({"text": ["x" * 500] * 10}),
        "tiny": datasets.Dataset.from_dict({"text": ["hi"]}),
        "short": datasets.Dataset.from_dict({"text": ["ab", "cd", "ef"]}),
    }
    with pytest.raises(DataError) as e:
        make_shards(parts, tok, DataConfig(block_size=64), seed=0)
    msg = str(e.value)
    assert "client 'tiny' has 1 document(s)" in msg
    assert "client 'short' has" in msg and "'big'" not in msg
    assert "lower data.block_size" in msg
