import math

import pytest
import torch

from fedtune.evaluation.retrieval import gold_ranks, knn_accuracy, rank_metrics, retrieval_metrics


def test_metrics_match_a_hand_computation():
    # 3 queries, 4 documents; gold of query i is document i
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3],  # gold first: rank 1
            [0.8, 0.5, 0.6, 0.1],  # 0.8 and 0.6 beat 0.5: rank 3
            [0.1, 0.2, 0.0, 0.3],  # every other scores higher: rank 4
        ]
    )
    ranks = gold_ranks(scores, [0, 1, 2])
    assert ranks.tolist() == [1, 3, 4]
    m = rank_metrics(ranks, ks=(1, 3))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 4) / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(5)) / 3)


def test_ndcg_is_zero_past_rank_ten_and_ties_favour_gold():
    assert rank_metrics(torch.tensor([11]))["ndcg@10"] == 0.0
    assert gold_ranks(torch.tensor([[0.5, 0.5, 0.4]]), [1]).tolist() == [1]


def test_retrieval_of_identical_vectors_is_perfect_and_cosine():
    docs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    m = retrieval_metrics(docs * torch.tensor([[5.0], [0.1], [3.0]]), docs)  # scale does not matter
    assert m["recall@1"] == 1.0 and m["mrr"] == 1.0 and m["retrieval_docs"] == 3.0


def test_knn_accuracy_by_hand():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
    # nearest of 0 is 1 (a), of 1 is 0 (a), of 2 is 3 (b), of 3 is 2 (b), of 4 is 1 or 3... 1: [0.9,0.1]
    labels = ["a", "a", "b", "b", "b"]
    s = torch.nn.functional.normalize(emb, dim=-1) @ torch.nn.functional.normalize(emb, dim=-1).T
    s.fill_diagonal_(-1)
    expected = sum(labels[i] == labels[int(s[i].argmax())] for i in range(5)) / 5
    assert knn_accuracy(emb, labels) == pytest.approx(expected)
    assert expected == pytest.approx(4 / 5)
    assert math.isnan(knn_accuracy(emb[:1], labels[:1]))


def test_pairs_from_conversations_and_from_newsgroup_openings():
    import json

    import datasets

    from fedtune.data.pairs import corpus_pairs, opening_pairs

    msgs = [
        [{"role": "user", "content": "what is tea"}, {"role": "assistant", "content": "a drink"}],
        [
            {"role": "user", "content": "Write the function `f`. Its docstring:\n\nAdd one."},
            {"role": "assistant", "content": "def f(x):\n    return x + 1"},
        ],
    ]
    ds = datasets.Dataset.from_dict(
        {"text": ["a", "b"], "label": ["food", "json"], "messages": [json.dumps(m) for m in msgs]}
    )
    p = corpus_pairs(ds, "chatterbot")
    assert p.queries == ["what is tea", "Add one."] and p.docs[0] == "a drink" and p.labels == ["food", "json"]
    o = opening_pairs(["re gospel dating in article writes well", "short"], ["x", "y"], words=3)
    assert o.queries == ["re gospel dating", "short"] and o.docs == ["in article writes well", ""]
