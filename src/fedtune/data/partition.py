"""Split a corpus across clients with flwr-datasets partitioners (iid, Dirichlet, natural id)."""

from __future__ import annotations

import datasets
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

from fedtune.config.schema import PartitionConfig
from fedtune.errors import DataError
from fedtune.seeding import derive_seed


def partition(ds: datasets.Dataset, cfg: PartitionConfig, seed: int) -> dict[str, datasets.Dataset]:
    """Return {client_id: documents}, a disjoint cover of `ds` (every document in exactly one client).

    natural: one client per label value (client id = the label); iid: shuffled equal shards;
    dirichlet: label proportions per client drawn from Dir(alpha).
    """
    n_docs = len(ds)
    labels = sorted(set(ds["label"]))
    if cfg.kind == "natural":
        if cfg.num_clients is not None and cfg.num_clients != len(labels):
            raise DataError(
                f"partition.num_clients = {cfg.num_clients} but the natural partition has one client "
                f"per label and there are {len(labels)} labels ({labels[:10]}); drop num_clients or "
                "choose data.labels"
            )
        p = NaturalIdPartitioner(partition_by="label")
        p.dataset = ds
        names = [str(p.partition_id_to_natural_id[i]) for i in range(p.num_partitions)]
        parts = {name: p.load_partition(i) for i, name in enumerate(names)}
        k = cfg.clients_per_label
        if k > 1:  # several parties per domain: shuffled equal shards of each label
            split = {}
            for name, docs in parts.items():
                if len(docs) < k:
                    raise DataError(
                        f"label {name!r} has {len(docs)} documents, fewer than partition.clients_per_label = {k}; "
                        "lower clients_per_label or raise data.max_docs_per_label"
                    )
                shards = IidPartitioner(num_partitions=k)
                shards.dataset = docs.shuffle(seed=derive_seed(seed, "partition", name) % 2**32)
                split.update({f"{name}-{i}": shards.load_partition(i) for i in range(k)})
            parts = split
        return dict(sorted(parts.items()))
    n = int(cfg.num_clients or 0)
    if n > n_docs:
        raise DataError(
            f"partition.num_clients = {n} is more than the {n_docs} documents available; lower num_clients or add data"
        )
    if cfg.kind == "iid":
        shuffled = ds.shuffle(seed=derive_seed(seed, "partition") % 2**32)
        p_iid = IidPartitioner(num_partitions=n)
        p_iid.dataset = shuffled
        return {f"client_{i}": p_iid.load_partition(i) for i in range(n)}
    if len(labels) < 2:
        raise DataError(
            f"partition.kind = 'dirichlet' needs a label column with >= 2 values; found {labels}; "
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
    p_dir.dataset = ds
    try:
        return {f"client_{i}": p_dir.load_partition(i) for i in range(n)}
    except ValueError as e:  # flwr-datasets gives up after repeated resampling
        raise DataError(
            f"Dirichlet partition into {n} clients (alpha={cfg.alpha}, min_docs={cfg.min_docs}) "
            f"failed: {e}. Fix: raise partition.alpha, lower partition.min_docs or num_clients"
        ) from None
