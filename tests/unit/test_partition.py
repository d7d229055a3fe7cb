import datasets
import pytest

from fedtune.config.schema import PartitionConfig
from fedtune.data.partition import partition
from fedtune.errors import DataError


def corpus(n_per_label: int = 30, labels: str = "abcd") -> datasets.Dataset:
    texts = [f"{lab} doc {i}" for lab in labels for i in range(n_per_label)]
    return datasets.Dataset.from_dict({"text": texts, "label": [t[0] for t in texts]})


@pytest.mark.parametrize(
    "cfg",
    [
        PartitionConfig(kind="iid", num_clients=5),
        PartitionConfig(kind="dirichlet", num_clients=3, alpha=0.3, min_docs=2),
        PartitionConfig(kind="natural"),
        PartitionConfig(kind="natural", clients_per_label=3),
    ],
    ids=["iid", "dirichlet", "natural", "natural-3-per-label"],
)
def test_partition_is_a_disjoint_cover(cfg: PartitionConfig) -> None:
    ds = corpus()
    parts = partition(ds, cfg, seed=3)
    seen = [t for p in parts.values() for t in p["text"]]
    assert sorted(seen) == sorted(ds["text"])  # every document exactly once
    assert len(seen) == len(set(seen))


def test_partition_is_seeded() -> None:
    ds = corpus()
    cfg = PartitionConfig(kind="dirichlet", num_clients=3, alpha=0.3)
    a = {k: v["text"] for k, v in partition(ds, cfg, seed=1).items()}
    b = {k: v["text"] for k, v in partition(ds, cfg, seed=1).items()}
    c = {k: v["text"] for k, v in partition(ds, cfg, seed=2).items()}
    assert a == b
    assert a != c


def test_natural_partition_one_client_per_label() -> None:
    parts = partition(corpus(labels="xyz"), PartitionConfig(kind="natural"), seed=0)
    assert list(parts) == ["x", "y", "z"]
    assert all(set(p["label"]) == {cid} for cid, p in parts.items())


def test_natural_partition_several_clients_per_label() -> None:
    parts = partition(corpus(n_per_label=7, labels="xy"), PartitionConfig(kind="natural", clients_per_label=2), seed=0)
    assert list(parts) == ["x-0", "x-1", "y-0", "y-1"]
    assert all(set(p["label"]) == {cid[0]} for cid, p in parts.items())
    assert sorted(len(p) for p in parts.values()) == [3, 3, 4, 4]
    with pytest.raises(DataError, match="clients_per_label"):
        partition(corpus(n_per_label=2, labels="xy"), PartitionConfig(kind="natural", clients_per_label=3), seed=0)


def test_small_alpha_is_more_skewed_than_large() -> None:
    ds = corpus(100)

    def skew(alpha: float) -> float:
        parts = partition(ds, PartitionConfig(kind="dirichlet", num_clients=4, alpha=alpha), seed=0)
        # mean share of each client's most common label
        return sum(max(p["label"].count(x) for x in "abcd") / len(p) for p in parts.values()) / 4

    assert skew(0.1) > skew(100.0) + 0.2


def test_more_clients_than_documents_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="num_clients = 50 is more than the 8 documents"):
        partition(corpus(2), PartitionConfig(kind="iid", num_clients=50), seed=0)


def test_natural_with_wrong_num_clients() -> None:
    with pytest.raises(DataError, match="one client per label and there are 4 labels"):
        partition(corpus(), PartitionConfig(kind="natural", num_clients=3), seed=0)


def test_iid_ids_are_flwr_datasets_iid_partitions() -> None:
    """Reference: flwr-datasets' IidPartitioner on the shuffled corpus (the documents' ids only are
    computed here, so 10,000 clients cost one shuffle)."""
    from flwr_datasets.partitioner import IidPartitioner

    from fedtune.data.partition import partition_ids
    from fedtune.seeding import derive_seed

    ds = corpus(n_per_label=13)  # 52 documents into 7 clients: uneven shards
    got = partition_ids(ds, PartitionConfig(kind="iid", num_clients=7), seed=5)
    p = IidPartitioner(num_partitions=7)
    p.dataset = ds.shuffle(seed=derive_seed(5, "partition") % 2**32)
    want = {f"client_{i}": p.load_partition(i)["text"] for i in range(7)}
    assert {cid: [ds[j]["text"] for j in ids] for cid, ids in got.items()} == want
    assert sorted(len(v) for v in got.values()) == [7, 7, 7, 7, 8, 8, 8]
