"""The recipe schema: every key, its type, default and meaning, as frozen pydantic models.

The field descriptions are the reference documentation (`llamatune schema` prints them). Unknown
keys are errors (extra="forbid"); loading, line numbers and did-you-mean live in recipe.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, PrivateAttr, field_validator, model_validator

from llamatune.data.fields import parse_template
from llamatune.schema_base import _Spec, conflict
from llamatune.schema_methods import DistillSpec, PreferenceSpec, method_problem

# auto: the dtype training computes in (model.resolve_dtype); the same choices for weights and 4-bit compute.
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class ModelSpec(_Spec):
    """Which base model to fine-tune."""

    path: str = Field(
        "smollm2-135m-instruct",
        description="Base model: a builtin alias (`llamatune models list`), a local Hugging Face "
        "folder, a local .gguf file, or a hub id such as 'org/name' (needs a network once).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); hub ids only.")
    trust_remote_code: bool = Field(False, description="Run Python code shipped with a hub model. Off: only architectures "
                                     "transformers itself implements load. Turn on only for code you have read.")
    adapter: str | None = Field(None, description="A finished run directory (any method): its adapter/ is where "
                                "this run's adapter starts (continue training, or DPO after SFT). Its base model and LoRA "
                                "settings must equal this recipe's. Relative to the recipe's folder.")
    dtype: Dtype = Field(
        "auto",
        description="Dtype of the frozen base weights. auto: bfloat16 when training runs in bf16 (half the memory; the "
        "adapter stays float32), float32 otherwise, and float32 for eval/merge.",
    )


class LoraSpec(_Spec):
    """The LoRA adapter (peft)."""

    r: int = Field(16, ge=1, le=1024, description="Adapter rank. Higher = more capacity and memory.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: updates are scaled by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input during training.")
    target_modules: Union[Literal["all-linear"], tuple[str, ...]] = Field(
        "all-linear",
        description="'all-linear' (every linear layer except the output head) or a list of module "
        "names such as [q_proj, k_proj, v_proj, o_proj].",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r); helps at high rank.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): often better quality, ~2x slower.")

    @model_validator(mode="after")
    def _non_empty_targets(self) -> "LoraSpec":
        if isinstance(self.target_modules, tuple) and not self.target_modules:
            raise conflict(("target_modules",), "an empty list; use 'all-linear' or name at least one module")
        return self


class QuantizationSpec(_Spec):
    """Quantize the frozen base (QLoRA). The adapter itself always trains in full precision."""

    mode: Literal["none", "nf4", "int8"] = Field(
        "none", description="none | nf4 (4-bit NormalFloat, QLoRA) | int8 (LLM.int8). Needs bitsandbytes."
    )
    double_quant: bool = Field(True, description="nf4 only: also quantize the quantization constants (~0.4 bit/param saved).")
    compute_dtype: Dtype = Field(
        "auto",
        description="nf4 only: dtype the 4-bit weights are dequantized to for matmuls. auto: the training precision's "
        "(bfloat16 where bf16 is native, float32 elsewhere: on an AVX2-only CPU a bfloat16 matmul is emulated and ~50x "
        "slower than float32), float32 for eval and merge.",
    )


Reader = Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "text", "xml", "hub"]
Format = Literal["instruction", "chat", "text", "multiple_choice", "classification", "preference"]


# The source keys only some formats read.
_READ_BY = {
    "prompt": ("instruction", "multiple_choice", "classification", "preference"),
    "response": ("instruction",),
    "chosen": ("preference",), "rejected": ("preference",), "pairs": ("preference",),
    "messages": ("chat",), "roles": ("chat", "preference"),
    "text": ("text",),
    "options": ("multiple_choice",), "answer_with": ("multiple_choice",),
    "answer": ("multiple_choice", "classification"),
    "labels": ("classification",),
}


class SourceSpec(_Spec):
    """One data source and how its records become examples. Templates use `{field.path}` (see data/fields.py)."""

    path: str = Field(description="File, folder (all data files inside, sorted), glob ('*.tsv'), or with reader: hub a "
                      "dataset id / local dataset folder. Relative paths resolve against data.root, else the recipe's folder.")
    reader: Reader = Field("auto", description="How to read the files; auto picks by extension (.jsonl .json .csv .tsv "
                           ".parquet .txt .md .xml). hub uses datasets.load_dataset.")
    format: Format = Field("instruction", description="instruction (prompt -> response) | chat (messages, every assistant "
                           "turn trained) | text (raw documents, all tokens trained) | multiple_choice | classification | "
                           "preference (a prompt with a chosen and a rejected answer: train.method dpo / orpo).")
    records: str | None = Field(None, description="json/xml: dotted path to the list of records inside each file "
                                "(e.g. 'data'); a JSON mapping id -> record is read as records with an `id` field.")
    explode: str | None = Field(None, description="Field path holding a list: one record per element, the element "
                                "replacing the list (e.g. 'questions' then {questions.question}).")
    prompt: str = Field("{prompt}", description="instruction / multiple_choice / classification / preference: template of "
                        "the user turn (preference: a field holding a message list is read as the prompt's messages).")
    chosen: str = Field("{chosen}", description="preference: template of the preferred answer; a single field holding a "
                        "message list is read as messages (OpenAI role/content or ShareGPT from/value).")
    rejected: str = Field("{rejected}", description="preference: template of the dispreferred answer (same rules as chosen).")
    pairs: Literal["fields", "shared_prefix"] = Field(
        "fields", description="preference: fields (a prompt, and chosen / rejected answers) | shared_prefix (chosen and "
        "rejected are two whole conversations, as message lists or 'Human: ... Assistant: ...' transcripts, and the "
        "messages they share are the prompt; the prompt key is not read).")
    response: str = Field("{response}", description="instruction: template of the answer.")
    system: str | None = Field(None, description="Template of a per-record system message (overrides data.system_prompt).")
    messages: str = Field("messages", description="chat: field path of the message list (OpenAI role/content or ShareGPT from/value).")
    roles: dict[str, str] = Field(default_factory=dict, description="chat: extra role names mapped to system | user | "
                                  "assistant (human, gpt, bot and model are already known).")
    text: str = Field("{text}", description="text: template of the document.")
    options: str = Field("options", description="multiple_choice: field path of the options (a list, or a mapping letter -> text).")
    answer_with: Literal["letter", "option"] = Field(
        "letter", description="multiple_choice: the trained answer (and what eval scores): the option's letter, or the "
        "option's text (cloze style: small models that cannot yet map letters to options still learn the content).")
    answer: str = Field("{answer}", description="multiple_choice: the correct letter or option text; classification: the label.")
    labels: tuple[str, ...] | None = Field(None, description="classification: the allowed labels (default: those found in the data).")
    encoding: str = Field("utf-8", description="Text encoding of the files.")
    split: str = Field("train", description="reader: hub only: which split to load.")
    max_records: int | None = Field(None, ge=1, description="Use at most this many records (the first ones, after explode).")
    weight: float = Field(1.0, gt=0, le=100, description="Repeat factor: 2 doubles this source in training, 0.5 keeps a seeded half.")

    @field_validator("prompt", "response", "system", "text", "answer", "chosen", "rejected")
    @classmethod
    def _template_parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_template(value)  # ValueError becomes a recipe error at this key
        return value

    @field_validator("roles")
    @classmethod
    def _roles_known(cls, value: dict[str, str]) -> dict[str, str]:
        bad = {k: v for k, v in value.items() if v not in ("system", "user", "assistant")}
        if bad:
            raise ValueError(f"roles must map to system, user or assistant; got {bad}")
        return value

    @model_validator(mode="after")
    def _keys_its_format_reads(self) -> "SourceSpec":
        # A key another format reads would be ignored in silence (`response:` on a preference source, `chosen:` on an
        # instruction one): almost always a format left at its default or a template under the wrong name. By value,
        # so a run's resolved recipe, which writes every key out with its default, still loads.
        for key, formats in _READ_BY.items():
            if self.format not in formats and getattr(self, key) != type(self).model_fields[key].get_default(call_default_factory=True):
                raise conflict((key, "format"), f"{key} is read by format: {' / '.join(formats)} only, and this source is "
                               f"format: {self.format}; remove {key}, or set the format it belongs to")
        if self.format == "preference" and self.pairs == "shared_prefix" and self.prompt != "{prompt}":
            raise conflict(("prompt", "pairs"), "pairs: shared_prefix takes the prompt from what the two conversations "
                           "share, so prompt is not read; remove it, or use pairs: fields")
        return self


def _as_sources(value: Any) -> Any:
    # Shorthands: a path string, or one mapping, stand for a one-source list.
    if isinstance(value, (str, Path)):
        return [{"path": str(value)}]
    if isinstance(value, dict):
        return [value]
    return value


class DataSpec(_Spec):
    """Where examples come from and how they are prepared."""

    root: Path | None = Field(None, description="Folder that relative source paths resolve against; keeps data outside "
                              "the recipe, e.g. --set data.root=/data/corpora.")
    train: tuple[SourceSpec, ...] = Field((), description="Training sources: a path, one source, or a list of sources. "
                                          "Required to train; a recipe with only `eval` serves `llamatune eval --data` "
                                          "and `data check`.")
    eval: tuple[SourceSpec, ...] | None = Field(None, description="Held-out sources. If omitted, eval_fraction of train is held out.")
    eval_fraction: float | None = Field(
        None, gt=0, lt=1, description="Share of train documents held out when `eval` is not given (then defaults to 0.1). "
        "Split by source record, so windows or exploded questions of one document never straddle the split."
    )
    system_prompt: str | None = Field(None, description="The system message of every example (unless a source sets "
                                      "`system`): model-default (the chat template's own; SmolLM2's adds 'You are a helpful "
                                      "AI assistant named SmolLM...' when a conversation has none), none (no system message "
                                      "at all, even where the template would add one), or the text itself. Not set = "
                                      "model-default. data check, the manifest, the model card and the Modelfile say which.")
    chat_template: str = Field("model", description="'model' (the tokenizer's own), 'chatml', or a custom Jinja chat template.")

    @field_validator("chat_template")
    @classmethod
    def _template_known(cls, value: str) -> str:
        if value not in ("model", "chatml") and "{{" not in value and "{%" not in value:
            raise ValueError(f"{value!r} is neither a known name (model: the tokenizer's own; chatml) nor a Jinja "
                             "template (one with {{ ... }} or {% ... %})")
        return value
    max_length: int = Field(512, ge=16, description="Max tokens per example (and per packed row).")
    length_policy: Literal["drop", "truncate", "error"] = Field(
        "drop", description="Examples over max_length: drop (counted), truncate (keeps the start; the answer may lose its "
        "end-of-turn token), or error."
    )
    text_overlap: int = Field(0, ge=0, description="format text: tokens shared by consecutive windows of a long document.")
    packing: bool = Field(True, description="Pack several examples into each row of max_length tokens (block-diagonal "
                          "attention, positions restart per example: the loss is unchanged, padding is gone).")
    dedup: bool = Field(True, description="Drop exact duplicate training examples (normalized text), counted.")
    max_overlap: float = Field(0.05, ge=0, le=1, description="Fail if more than this share of held-out examples "
                               "duplicate a training example (exact or near); below it, warn.")
    strict: bool = Field(False, description="Fail on the first record that would be dropped (missing fields, unknown "
                         "labels, empty text, too long), naming it.")
    max_drop_fraction: float = Field(
        0.05, ge=0, le=1, description="Stop before training when a source loses more than this share of its records to "
        "drops (missing fields, labels outside the set, empty text, too long, nothing to train), naming the reasons and "
        "examples. 0.05 lets a few broken rows of a large real corpus through (measured on the shipped recipes: MedQuAD "
        "1.4%, LegalBench overruling 0.4%; TAT-QA 10.7% too long, which its recipe accepts explicitly) while a wrong "
        "template or label set, which drops far more, stops the run. 0 refuses any drop; strict: true "
        "fails on the first one.")

    _coerce_train = field_validator("train", mode="before")(classmethod(lambda cls, v: _as_sources(v)))
    _coerce_eval = field_validator("eval", mode="before")(classmethod(lambda cls, v: _as_sources(v)))

    @model_validator(mode="before")
    @classmethod
    def _default_fraction(cls, raw: Any) -> Any:
        # The 0.1 default applies only without a held-out source, so the resolved recipe never
        # carries both (and reloads cleanly).
        if isinstance(raw, dict) and raw.get("eval") is None and raw.get("eval_fraction") is None:
            return {**raw, "eval_fraction": 0.1}
        return raw

    @model_validator(mode="after")
    def _eval_or_fraction(self) -> "DataSpec":
        if not self.train and not self.eval:
            raise conflict(("train",), "no sources: name at least one training file (or, in a recipe that only "
                           "feeds `llamatune eval --data`, the held-out files under data.eval)")
        if self.eval is not None and self.eval_fraction is not None:
            raise conflict(("eval", "eval_fraction"), "set either `eval` (held-out sources) or `eval_fraction` (split train), not both")
        if self.text_overlap >= self.max_length:
            raise conflict(("text_overlap", "max_length"),
                           f"text_overlap ({self.text_overlap}) must be smaller than max_length ({self.max_length})")
        return self


class TrainSpec(_Spec):
    """The optimisation loop."""

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrainSpec":
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise conflict(("early_stopping_patience", "eval_every"),
                           "early_stopping_patience needs eval_every (how often the held-out loss is measured)")
        if self.epochs is not None and self.max_steps is not None:
            raise conflict(("epochs", "max_steps"), f"both are set (epochs {self.epochs}, max_steps {self.max_steps}) and "
                           "only one can decide the length of training: remove one (on the command line: --set train.epochs=null)")
        return self

    def planned_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run: max_steps, else epochs (1 when unset) passes."""
        return self.max_steps or (self.epochs or 1) * steps_per_epoch

    method: Literal["sft", "dpo", "orpo", "distill"] = Field(
        "sft", description="sft (next-token loss on the answers) | dpo (direct preference optimization on "
        "chosen/rejected pairs against a frozen reference) | orpo (odds-ratio preference loss plus the chosen answer's "
        "next-token loss, no reference) | distill (learn a teacher model's next-token distributions on the answers, plus "
        "the next-token loss). dpo / orpo read format: preference data and the preference: section; distill the distill: section.")
    seed: int = Field(42, description="Seeds data order, the held-out split, adapter init and dropout.")
    epochs: int | None = Field(None, ge=1, description="Passes over the training set; 1 when neither epochs nor max_steps "
                               "is set. Set epochs or max_steps, not both.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (instead of epochs).")
    micro_batch_size: int = Field(4, ge=1, description="Rows per forward pass per process: examples, or with "
                                  "data.packing rows of up to max_length tokens holding several examples.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (effective batch = micro x accum x processes).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warmup before the cosine decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm; null disables clipping.")
    eval_every: int | None = Field(None, ge=1, description="Also evaluate held-out loss every N steps (always after the "
                                   "last step, and before the first unless eval_before is false).")
    eval_before: bool = Field(True, description="Score the held-out data before the first step: the 'before' of the "
                              "before → after held-out loss. false starts training sooner (on a large held-out set the "
                              "pass takes minutes) and leaves summary.json's eval_loss_before null. CLI: --no-eval-before.")
    log_every: int = Field(1, ge=1, description="Write a metrics line every N steps.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast of the forward pass: auto = bf16 where the hardware computes it natively (CUDA "
        "GPUs with bf16, CPUs with AVX512-BF16/AMX), else fp32 | fp32 | bf16 | fp16 (GPUs only). The adapter and its "
        "optimizer state are always float32.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw (torch) | adamw_8bit (bitsandbytes: 8-bit optimizer state, ~4x less optimizer "
        "memory) | paged_adamw_8bit (also pages state out under GPU memory pressure).")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate decay after the linear warmup.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: much less memory, ~30% slower.")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after this many evaluations (eval_every) "
                                                "without a held-out loss lower than the best by more than 1e-4.")
    tensorboard: bool = Field(False, description="Also log metrics to <run>/tensorboard (pip install 'llamatune[tensorboard]').")
    tracking: Literal["none", "mlflow"] = Field(
        "none", description="mlflow: also log the run to MLflow (pip install 'llamatune[mlflow]'): the resolved recipe as "
        "params, every step's and held-out pass's metrics, the summary, the run directory's small files (no weights), and "
        "later `llamatune eval` results. The server is MLFLOW_TRACKING_URI; unset, a local store in output.dir (mlflow.db, mlartifacts/). "
        "The MLflow run id goes to summary.json and tracking.json; --resume continues the same MLflow run.")
    tracking_experiment: str = Field("llamatune", min_length=1, description="train.tracking: mlflow: the MLflow "
                                     "experiment the run is logged under (created when missing).")
    save_every: int | None = Field(None, ge=1, description="Write a checkpoint every N steps (also on SIGTERM/SIGINT "
                                   "and at the end); resume with --resume auto.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted once a newer one is complete.")
    max_bad_steps: int = Field(5, ge=1, description="Consecutive steps with a NaN/Inf loss or gradient (each skipped) "
                               "before the run stops with its last good checkpoint.")


class OutputSpec(_Spec):
    """Where the run directory goes."""

    dir: Path = Field(Path("runs"), description="Parent folder of run directories. Relative to the current directory.")
    name: str | None = Field(None, description="Run name; default '<recipe name>-<timestamp>'. An existing non-empty run is never overwritten.")


class Recipe(_Spec):
    """A complete fine-tuning recipe."""

    model: ModelSpec = ModelSpec()
    lora: LoraSpec = LoraSpec()
    quantization: QuantizationSpec = QuantizationSpec()
    data: DataSpec
    train: TrainSpec = TrainSpec()
    preference: PreferenceSpec = PreferenceSpec()
    distill: DistillSpec = DistillSpec()
    output: OutputSpec = OutputSpec()
    # Set by the recipe loader (recipe.Provenance): the YAML line of each key, for problems found later, and the
    # values interpolated from the environment, shown as ${NAME} (secrets.py). Not part of equality.
    _provenance: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _method_fits_data(self) -> "Recipe":
        problem = method_problem(self)
        if problem is not None:
            raise problem
        return self
