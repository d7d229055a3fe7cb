"""Split a corpus across clients with flwr-datasets partitioners (iid, Dirichlet, natural id).

Partitioning needs only document ids: the partitioners run on a one-column index of the corpus,
never on its text, so 10,000 clients cost seconds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtune.config.schema import PartitionConfig
from fedtune.errors import DataError
from fedtune.seeding import derive_seed

if TYPE_CHECKING:
    import datasets


def partition(ds: datasets.Dataset, cfg: PartitionConfig, seed: int) -> dict[str, datasets.Dataset]:
    """Return {client_id: documents}, a disjoint cover of `ds` (every document in exactly one client)."""
    return {cid: ds.select(ids) for cid, ids in partition_ids(ds, cfg, seed).items()}


def partition_ids(ds: datasets.Dataset, cfg: PartitionConfig, seed: int) -> dict[str, list[int]]:
    """Return {client_id: row indices of `ds`}, a disjoint cover of its rows.

    natural: one client per label value (client id = the label); iid: shuffled equal shards;
    dirichlet: label proportions per client drawn from Dir(alpha).
    """
    # imported here, not with the module: a node with its shard cached never partitions, and
    # flwr-datasets pulls in matplotlib, seaborn and scipy
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, NaturalIdPartitioner

    labels = [str(x) for x in ds.select_columns(["label"])[:]["label"]] if len(ds) else []  # no text read
    index = datasets.Dataset.from_dict({"idx": list(range(len(labels))), "label": labels})
    distinct = sorted(set(labels))
    if cfg.kind == "natural":
        if cfg.num_clients is not None and cfg.num_clients != len(distinct):
            raise DataError(
                f"partition.num_clients = {cfg.num_clients} but the natural partition has one client "
                f"per label and there are {len(distinct)} labels ({distinct[:10]}); drop num_clients or "
                "choose data.labels"
            )
        p = NaturalIdPartitioner(partition_by="label")
        p.dataset = index
        parts = {str(p.partition_id_to_natural_id[i]): _ids(p.load_partition(i)) for i in range(p.num_partitions)}
        k = cfg.clients_per_label
        if k > 1:  # several parties per domain: shuffled equal shards of each label
            split = {}
            for name, docs in parts.items():
                if len(docs) < k:
                    raise DataError(
                        f"label {name!r} has {len(docs)} documents, fewer than partition.clients_per_label = {k}; "
                        "lower clients_per_label or raise data.max_docs_per_label"
                    )
                order = _shuffled(docs, derive_seed(seed, "partition", name))
                split.update({f"{name}-{i}": order[a:b] for i, (a, b) in enumerate(contiguous_shards(len(order), k))})
            parts = split
        return dict(sorted(parts.items()))
    n, n_docs = int(cfg.num_clients or 0), len(labels)
    if n > n_docs:
        raise DataError(
            f"partition.num_clients = {n} is more than the {n_docs} documents available; lower num_clients or add data"
        )
    if cfg.kind == "iid":
        order = _shuffled(list(range(n_docs)), derive_seed(seed, "partition"))
        return {f"client_{i}": order[a:b] for i, (a, b) in enumerate(contiguous_shards(n_docs, n))}
    if len(distinct) < 2:
        raise DataError(
            f"partition.kind = 'dirichlet' needs a label column with >= 2 values; found {distinct}; "
            "use kind 'iid' or a source with labels"
        )
    p_dir = DirichletPartitioner(
        num_partitions=n,
        partition_by="label",
        alpha=cfg.alpha,
        min_partition_size=cfg.min_docs,
        self_balancing=False,
        shuffle=True,
        seed=derive_seed(seed, "partition") % 2**32,
    )
    p_dir.dataset = index
    try:
        return {f"client_{i}": _ids(p_dir.load_partition(i)) for i in range(n)}
    except ValueError as e:  # flwr-datasets gives up after repeated resampling
        raise DataError(
            f"Dirichlet partition into {n} clients (alpha={cfg.alpha}, min_docs={cfg.min_docs}) "
            f"failed: {e}. Fix: raise partition.alpha, lower partition.min_docs or num_clients"
        ) from None


def contiguous_shards(n: int, k: int) -> list[tuple[int, int]]:
    """[start, end) of each of k contiguous shards of n rows, as `datasets.Dataset.shard(k, i,
    contiguous=True)` cuts them (flwr-datasets' IidPartitioner): the first n % k get one more."""
    div, mod = divmod(n, k)
    return [(div * i + min(i, mod), div * i + min(i, mod) + div + (1 if i < mod else 0)) for i in range(k)]


def _shuffled(ids: list[int], seed: int) -> list[int]:
    """`ids` in the order `datasets.Dataset.shuffle(seed)` puts rows (one read of an index column)."""
    import datasets

    return _ids(datasets.Dataset.from_dict({"idx": ids}).shuffle(seed=seed % 2**32))


def _ids(part: datasets.Dataset) -> list[int]:
    """The index column, read as one batch (iterating a column reads row by row)."""
    ids: list[int] = part.with_format("numpy")[:]["idx"].tolist() if len(part) else []
    return ids
