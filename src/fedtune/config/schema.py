"""The typed schema of an experiment. Components are selected by registered name; configs never
import code, because they travel between parties."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedtune.config.adapters import ADAPTER_CONFIGS as ADAPTER_CONFIGS
from fedtune.config.adapters import AdapterConfig as AdapterConfig
from fedtune.config.adapters import AdapterOptions as AdapterOptions
from fedtune.config.adapters import LoraAdapterConfig as LoraAdapterConfig
from fedtune.config.adapters import LoraSBAdapterConfig as LoraSBAdapterConfig
from fedtune.config.adapters import MoELoraAdapterConfig as MoELoraAdapterConfig
from fedtune.config.inputs import DataConfig as DataConfig
from fedtune.config.inputs import ModelConfig as ModelConfig
from fedtune.config.inputs import TinyModelConfig as TinyModelConfig
from fedtune.config.inputs import _Strict
from fedtune.config.train import DPSGDConfig as DPSGDConfig
from fedtune.config.train import GhostNoiseConfig as GhostNoiseConfig
from fedtune.config.train import TrainConfig as TrainConfig


class PartitionConfig(_Strict):
    kind: Literal["natural", "iid", "dirichlet"] = "natural"
    num_clients: int | None = Field(None, ge=1, description="required for iid/dirichlet; natural: one client per label")
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration (smaller = more skew)")
    min_docs: int = Field(2, ge=1, description="dirichlet: resample until every client has this many")
    clients_per_label: int = Field(
        1, ge=1, description="natural: split each label's documents over this many clients ('<label>-<i>')"
    )

    @model_validator(mode="after")
    def _needs_clients(self) -> PartitionConfig:
        if self.kind in ("iid", "dirichlet") and self.num_clients is None:
            raise ValueError(f"partition kind {self.kind!r} needs num_clients (e.g. 4)")
        return self


class _Named(BaseModel):
    """A component chosen by name plus its own keyword arguments (validated by the component)."""

    model_config = ConfigDict(extra="allow")
    name: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StrategyConfig(_Named):
    name: str = "fedavg"


class CodecConfig(_Named):
    name: str = "identity"


class EngineConfig(_Strict):
    name: Literal["inprocess", "flower-sim", "flower-deploy", "p2p-local"] = Field(
        "inprocess",
        description="'inprocess' (default), 'flower-sim' (Flower's simulation runtime; extra 'flower'), "
        "'flower-deploy' (set by `fedtune deploy` / the app it writes: SuperLink and SuperNodes), 'p2p-local' "
        "(a local swarm of `fedtune peer` processes over hivemind, for serverless strategies; extra 'p2p')",
    )
    timeout: float = Field(
        600.0, gt=0.0, description="seconds to wait for client replies (Flower) or for a round's peer messages (p2p)"
    )
    join_timeout: float = Field(
        120.0, gt=0.0, description="p2p: seconds a peer waits for every peer to join the swarm before round 1"
    )


class PrivacyConfig(_Strict):
    """Where privacy randomness comes from (DP noise, DP-SGD's Poisson batches, mask secrets)."""

    randomness: Literal["auto", "seeded", "secure"] = Field(
        "auto",
        description="'secure': the OS CSPRNG, never stored (required on a Flower deployment); 'seeded': "
        "reproducible simulation noise derived from the seed (research only: anyone with the config can "
        "regenerate it); 'auto': secure on a deployment, seeded in simulation",
    )
    release_client_metrics: bool | None = Field(
        None,
        description="send each client's training metrics (loss) to the server: by default (null) they are "
        "sent unless differential privacy (a DP strategy or train.dp_sgd) or secure aggregation is on, since "
        "they are outside the DP guarantee and not hidden by the masks; true sends them anyway (recorded)",
    )


class AvailabilityConfig(_Strict):
    """When clients are online (cross-device parties are not always reachable)."""

    kind: Literal["always", "diurnal"] = Field(
        "always",
        description="'diurnal': each client has a seeded phase and is online for `online` of every `period` "
        "rounds (a day of `period` rounds); sampling draws among the online clients",
    )
    period: int = Field(24, ge=2, description="rounds in one cycle")
    online: float = Field(0.5, gt=0.0, le=1.0, description="share of the cycle a client is online")


class SamplingConfig(_Strict):
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of clients sampled per round")
    scheme: Literal["fixed", "poisson"] = Field(
        "fixed",
        description="'fixed': k = max(min_clients, round(fraction * n)) clients without replacement (n: the "
        "clients online that round); "
        "'poisson': each client independently with probability fraction (a round may have none); "
        "the DP accountant uses the scheme and rate actually run",
    )
    min_clients: int = Field(1, ge=1, description="fixed scheme: at least this many clients per round")
    min_updates: int = Field(1, ge=0, description="aggregate only when at least this many clients replied")
    max_update_mb: float | None = Field(
        None, gt=0.0, description="reject (record as a failure) any client upload larger than this"
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="fault injection (in-process): each sampled client fails to reply with this probability "
        "(seeded per round and client; recorded as a failure)",
    )
    straggler_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="straggler injection (in-process): each sampled client is slow in a round with this "
        "probability; a slow client takes 1 + (straggler_slowdown - 1) * U(0, 1) times a normal client's time",
    )
    availability: AvailabilityConfig = Field(
        default_factory=AvailabilityConfig, description="availability traces: which clients can be sampled"
    )
    straggler_slowdown: float = Field(4.0, ge=1.0, description="the slowest a straggler gets, in normal client times")
    link_drop: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="unreliable links (peer-to-peer strategies): each peer message is lost with this probability "
        "(seeded per round, sender and receiver; counted as sent, not received; recorded as dropped_messages)",
    )
    deadline: float | None = Field(
        None,
        ge=1.0,
        description="in-process: the server closes a round after this many normal client times; a later "
        "reply is a recorded failure (Flower: engine.timeout, in seconds)",
    )

    @model_validator(mode="after")
    def _poisson(self) -> SamplingConfig:
        if self.scheme == "poisson" and self.min_clients > 1:
            raise ValueError(
                f"min_clients = {self.min_clients} has no meaning for Poisson sampling (each client is drawn "
                "independently); use sampling.min_updates to require replies, or scheme: fixed"
            )
        return self


class AttackConfig(_Strict):
    """Attack injection (in-process simulation): a fixed, seeded set of attacking clients."""

    kind: Literal["none", "sign_flip", "scale", "gaussian", "data"] = Field(
        "none",
        description="sign_flip: send -scale * update; scale: scale * update; gaussian: N(0, scale^2) noise "
        "instead of the update; data: train on corrupted text (random tokens)",
    )
    fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of clients that attack")
    scale: float = Field(1.0, gt=0.0)


class EvalConfig(_Strict):
    every: int = Field(1, ge=1, description="evaluate every N rounds (and always after the last)")
    batch_size: int = Field(8, ge=1)
    ood: bool = Field(
        False,
        description="also test every client's model on the mixture of all clients' test data "
        "(out of distribution; per-client ood_ppl)",
    )
    clients: int | None = Field(
        None,
        ge=1,
        description="evaluate a seeded sample of this many clients (the same sample every time, so curves are "
        "comparable) plus each round's trainers; default: every client",
    )
    val: bool = Field(
        False,
        description="also score the model each client ends with on its validation split (val_ppl; mean_val_ppl "
        "in the round record): choose hyperparameters on it, never on the test split",
    )
    max_examples: int | None = Field(
        32,
        ge=1,
        description="instruction data: score at most this many test examples per client for accuracy "
        "(option log-likelihood) and generation (None: all)",
    )
    generate: int = Field(
        2, ge=0, description="instruction data: greedy generations per client scored by exact match and ROUGE-L"
    )
    max_new_tokens: int = Field(24, ge=1, description="instruction data: length limit of each generation")


class AuditConfig(_Strict):
    """Canaries for `fedtune audit` (one-run auditing, Steinke, Nasr and Jagielski 2023,
    arXiv:2305.08846): random-token training blocks in chosen clients' data, each included with
    probability 1/2; the audit turns a membership test on the final model into a lower bound on
    epsilon for one example of one client (`fedtune.data.canaries` says what that unit means)."""

    canaries: int = Field(64, ge=2, description="canaries m: each one training block of data.block_size random tokens")
    clients: int | list[str] = Field(
        1,
        description="the clients whose training split gets the canaries: a count (drawn by the audit's seed) or "
        "client ids; canary i goes to the (i mod n)-th",
    )
    seed: int | None = Field(
        None,
        description="seed of the canaries and of which are included (a reproducible audit; it is then in "
        "config.yaml); default: a secret from the OS, kept only in RUN/audit/canaries.json (owner-readable)",
    )

    @model_validator(mode="after")
    def _clients(self) -> AuditConfig:
        if (self.clients if isinstance(self.clients, int) else len(self.clients)) < 1:
            raise ValueError(f"audit.clients = {self.clients!r}: give a positive count or client ids, e.g. 1")
        return self


class ReportConfig(_Strict):
    """Where a run's records go besides RUN_DIR/metrics.jsonl (extra `fedtune[track]`)."""

    trackers: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="log every round to TensorBoard (RUN_DIR/tensorboard) and/or MLflow"
    )
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (default: sqlite:///<parent of the run dir>/mlflow.db)"
    )
    mlflow_experiment: str = "fedtune"


class EmbeddingConfig(_Strict):
    """`task: embedding`: GEM text embeddings (arXiv:2506.04344, `fedtune.embedding.gem`). Each
    party trains the adapter and the special tokens' embeddings on its own text with GEM's
    self-supervised objective; retrieval is scored on the source's (query, document) pairs."""

    num_tokens: int = Field(1, ge=1, le=16, description="special tokens k inserted into the text")
    ntp_weight: float = Field(
        1.0, ge=0.0, description="weight of the plain next-token loss on the unchanged text (the 'mixed' NTP)"
    )
    knn_topics: bool = Field(
        True, description="also report nearest-neighbour topic accuracy of the pooled test documents (their labels)"
    )


class ExperimentConfig(_Strict):
    name: str = "experiment"
    seed: int = 0
    task: Literal["generate", "embedding"] = Field(
        "generate",
        description="'generate': next-token / instruction fine-tuning; 'embedding': GEM text embeddings "
        "(section embedding; (query, document) pairs from chatterbot, stdlib-docstrings, 20newsgroups or files)",
    )
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    rounds: int = Field(3, ge=1)
    output_dir: str = Field("runs/{name}", description="'{name}' is replaced by the name")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    adapter: AdapterConfig = Field(default_factory=LoraAdapterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    codec: CodecConfig = Field(
        default_factory=CodecConfig,
        description="how updates travel (uplink, and downlink unless downlink_codec is set); "
        "a stage name or {name: chain, stages: [...]}",
    )
    downlink_codec: CodecConfig | None = Field(None, description="server -> client codec (default: codec)")
    client_codecs: dict[str, CodecConfig] = Field(
        default_factory=dict,
        description="per-client uplink codec by client id (a slow link quantizes harder); the others use "
        "codec; adapter.auto fills it from budget_mb",
    )
    budget_mb: float | None = Field(
        None,
        gt=0.0,
        description="communication budget: stop cleanly (checkpointed, exported) after the round in which "
        "the bytes moved (up + down, all clients) reach this many MB",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    audit: AuditConfig | None = Field(None, description="canaries for `fedtune audit RUN_DIR` (off by default)")
    secure_aggregation: bool = Field(
        False,
        description="pairwise-masked uploads: the server only learns the sum of the updates "
        "(strategies that aggregate by a sum: fedavg, fedit, ffa_lora, fedsb)",
    )

    def run_dir(self) -> str:
        return self.output_dir.replace("{name}", self.name)

    def randomness(self) -> str:
        """The privacy randomness actually used: 'secure' or 'seeded'."""
        if self.privacy.randomness != "auto":
            return self.privacy.randomness
        return "secure" if self.engine.name == "flower-deploy" else "seeded"
