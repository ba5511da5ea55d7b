"""Typed recipe schema: the single source of defaults.

A recipe is a YAML file whose keys mirror the dataclasses below. Loading goes through one path:
YAML -> nested dict -> `--set key.path=value` overrides -> `from_dict` (type coercion and unknown
key errors) -> `Recipe.validate()`. Every error is a `BadInput` that names the dotted key, the
file and, for YAML problems, the line.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mlx_distill.errors import BadInput
from mlx_distill.recipe_gemini import GeminiConfig, validate_gemini
from mlx_distill.recipe_modes import DistillMode, validate_modes
from mlx_distill.schema import check_choices, choices, closest, fingerprint, from_dict  # noqa: F401 (choices: re-exported)

STAGES = ("tokenizer", "teacher", "cache", "distill", "baseline", "eval", "report")

# Choice fields: each Literal is the one list behind the schema, its error messages and the docs
# (`choices(Type)` reads it back; kernels and stages import these instead of repeating them).
TeacherKind = Literal["local", "gemini"]
CacheTargets = Literal["topk", "sample"]
StudentInit = Literal["config", "pretrained", "teacher_layers"]
LossKind = Literal["forward_kl", "reverse_kl", "jsd", "tvd", "ce"]
TailMode = Literal["bucket", "ignore"]
SentencePieceType = Literal["bpe", "unigram"]
DType = Literal["float32", "bfloat16"]  # bfloat16 keeps fp32 master weights
Answers = Literal["data", "generate"]  # a local teacher's text: the data's answers, or its own
ExportDType = Literal["float32", "bfloat16", "float16"]
TrainOn = Literal["assistant", "last"]  # which assistant turns of a conversation are trained
StudentTrain = Literal["full", "lora", "dora"]  # which weights train (adapters: base frozen)
ScratchArch = Literal["llama", "qwen2"]  # architectures `ModelConfig` can build from scratch
OnPolicyLoss = Literal["reverse_kl", "forward_kl", "jsd", "sampled_token"]
Schedule = Literal["cosine", "constant"]  # after the linear warmup
RefineOptimizer = Literal["fresh", "carry"]  # the refinement phase's AdamW state


@dataclass
class DatasetConfig:
    """How a data path that is a dataset folder or a Hub dataset id is read (through
    `datasets`): its configuration, the split each key reads and the columns that hold the
    record keys (mlx-lm's hf_dataset names). Not used for JSONL files."""

    config: str | None = None  # the dataset's configuration (subset), e.g. gsm8k's "main"
    train_split: str = "train"
    valid_split: str = "validation"
    test_split: str = "test"
    prompt_feature: str = "prompt"  # with completion_feature: a prompt/completion record
    completion_feature: str = "completion"
    chat_feature: str = "messages"
    text_feature: str = "text"


@dataclass
class DataConfig:
    """Where the examples come from: JSONL files (prompt/completion, messages or text), dataset
    folders or Hub dataset ids (`org/name[@revision]`, read as `dataset` says)."""

    train: str | None = None  # required by every stage that trains or scores
    valid: str | None = None  # validation loss every train.eval_every steps (and at the end)
    test: str | None = None  # held-out split of the eval stage; None: it scores data.valid
    task: str | None = None  # answer checker in mlx_distill.tasks; None for free text
    max_seq_len: int = 2048
    max_train: int | None = None  # use the first n training examples
    train_on: TrainOn = "assistant"  # every assistant turn, or only the last one
    # The reasoning span around a teacher's thoughts; None: the tokenizer's own special tokens
    # (<think>/</think>, Gemma 4's thought channel), else <think>/</think> as text.
    reasoning_open: str | None = None
    reasoning_close: str | None = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)


@dataclass
class TokenizerConfig:
    """An existing tokenizer (`path`), or a SentencePiece model trained on data.train."""

    path: str | None = None  # a folder, or a Hub model repo id (org/name[@revision])
    vocab_size: int = 8000  # a trained SentencePiece model's size (tokenizer.path unset)
    model_type: SentencePieceType = "bpe"  # SentencePiece model type


@dataclass
class ModelConfig:
    """An mlx-lm architecture built from scratch."""

    arch: ScratchArch = "llama"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 352
    tie_embeddings: bool = True
    max_position: int = 512
    rope_theta: float = 10000.0


@dataclass
class TrainConfig:
    """One training run: AdamW, a linear warmup, then cosine decay (or a constant rate)."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-5
    schedule: Schedule = "cosine"  # after the warmup: cosine to lr * min_lr_ratio, or constant
    min_lr_ratio: float = 0.1
    warmup: int = 50
    # AdamW as PyTorch and published recipes run it: bias-corrected moments (MLX's own default
    # is uncorrected, whose first updates are 3-6x the learning rate; false keeps that).
    bias_correction: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # global gradient norm; 0: off
    log_every: int = 10
    eval_every: int = 0  # validation loss on data.valid every n steps; 0: only at the end
    checkpoint_every: int = 0  # 0: only at the end
    dtype: DType = "float32"  # bfloat16: bf16 compute, fp32 master weights (slow on CPU)
    grad_accum: int = 1  # micro-batches per step (must divide batch_size); same update
    grad_checkpoint: bool = False  # recompute each block's activations in the backward pass


@dataclass
class GenerationConfig:
    """How a local teacher writes its own answers (teacher.answers: generate)."""

    max_tokens: int = 512  # an answer cut off here is left out (not worth imitating)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.0  # 0: off
    batch_size: int = 16  # prompts decoded together


@dataclass
class TeacherConfig:
    """The teacher: a local mlx-lm folder, one the recipe trains, or Gemini."""

    kind: TeacherKind = "local"
    # local: an mlx-lm folder or Hub model repo id (org/name[@revision]); None: train `model`
    path: str | None = None
    init: str | None = None  # when training: start from this mlx-lm folder (or id), not `model`
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(hidden_size=256, num_layers=8, intermediate_size=704)
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, lr=1e-3))
    gemini: GeminiConfig = field(default_factory=GeminiConfig)
    # local: what text the student learns from. data: each training conversation's answers as
    # the data has them, scored by the teacher; generate: the teacher's own answer to each
    # conversation's last turn (sequence-level KD; token-level targets on it as well).
    answers: Answers = "data"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # An API teacher stopped before every prompt was answered (max_cost, an interrupt) leaves
    # the teacher stage incomplete; true lets the cache and distill stages use what it has.
    allow_partial: bool = False


@dataclass
class CacheConfig:
    """Teacher targets on disk."""

    targets: CacheTargets = "topk"
    k: int = 16
    samples: int = 32  # draws per position for targets=sample
    temperature: float = 1.0
    batch_size: int = 32  # sequences per teacher forward pass
    shard_rows: int = 1024


@dataclass
class LoraConfig:
    """mlx-lm's adapter layers (`linear_to_lora_layers`) for student.train lora | dora."""

    rank: int = 8
    scale: float = 20.0  # mlx-lm's multiplier of the low-rank update (not alpha / rank)
    dropout: float = 0.0
    num_layers: int | None = None  # adapt the last n blocks; None: all
    # Module paths inside a block (self_attn.q_proj, mlp.down_proj) or top-level (lm_head;
    # model.embed_tokens for a tied head); None: every linear layer of the blocks.
    keys: list[str] | None = None


@dataclass
class StudentConfig:
    """The student: from `model` (config), an mlx-lm folder (pretrained) or the teacher's layers."""

    init: StudentInit = "config"
    path: str | None = None  # init=pretrained: an mlx-lm folder or Hub model repo id
    layer_stride: int = 2  # init=teacher_layers: keep every k-th teacher layer (and the last)
    layers: list[int] | None = None  # init=teacher_layers: keep exactly these (overrides stride)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: StudentTrain = "full"  # lora | dora: adapters on a frozen base (QLoRA if quantized)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class LossConfig:
    """`mlx_distill.kernels.distill_loss` arguments for the distill stage."""

    kind: LossKind = "forward_kl"
    kd_weight: float = 0.5
    temperature: float = 1.0
    beta: float = 0.5
    tail: TailMode = "bucket"
    chunk_size: int | None = None


@dataclass
class CompareRun:
    """One entry of distill.compare: an extra distill run from the main student's initial
    weights and data order (same seed), exported to runs/NAME/student-<mode>."""

    mode: DistillMode | None = None  # required
    steps: int | None = None  # None: train.steps (give each mode about the same wall clock)
    lmbda: float | None = None  # mode mixed only; None: distill.lmbda
    offline_steps: int | None = None  # on_policy/mixed only; None: distill.offline_steps


@dataclass
class DistillConfig:
    """Where the distill stage's batches come from (GKD, Agarwal et al. 2023; Tinker OPD).

    offline: the teacher cache. on_policy: the current student samples completions of training
    prompts and the local teacher scores every sampled token. mixed: each batch is on-policy with
    probability `lmbda` (GKD's lambda), else from the cache. offline_steps: in on_policy and
    mixed mode, the first this many batches come from the cache (an off-policy warm start, so the
    student samples answers worth grading), the rest as `mode` says.
    """

    mode: DistillMode = "offline"
    lmbda: float = 0.5  # mixed: probability that a batch is on-policy
    offline_steps: int = 0  # on_policy, mixed: cache batches first, then `mode`
    samples_per_prompt: int = 1  # completions per prompt; train.batch_size must divide by it
    temperature: float = 1.0  # student sampling temperature (0: greedy)
    top_p: float = 1.0
    max_new_tokens: int = 96
    # On-policy loss on the student's tokens: reverse_kl | forward_kl | jsd (fused loss against
    # the teacher's top-k with the tail bucket, at loss.temperature; jsd uses loss.beta), or
    # sampled_token (Tinker: per-token log-ratio of the sampled token only).
    loss: OnPolicyLoss = "reverse_kl"
    k: int = 16  # teacher top-k per sampled position
    # Extra runs after the main one, each {mode, steps, lmbda, offline_steps}; the report
    # compares them.
    compare: list[CompareRun] = field(default_factory=list)

    def reads_cache(self) -> bool:
        """Whether this section's batches come from the teacher cache, all or some."""
        return self.mode != "on_policy" or self.offline_steps > 0

    def for_entry(self, entry: CompareRun) -> DistillConfig:
        """This section as a distill.compare entry runs it: its mode, lmbda and offline_steps."""
        lmbda = self.lmbda if entry.lmbda is None else entry.lmbda
        warm = self.offline_steps if entry.offline_steps is None else entry.offline_steps
        if entry.mode == "offline":
            warm = 0
        return dataclasses.replace(
            self, mode=entry.mode, lmbda=lmbda, offline_steps=warm, compare=[]
        )

    def runs(self) -> list[tuple[str, CompareRun]]:
        """(tag, entry) of each compare entry: its mode, indexed (mode-2, ...) when repeated."""
        out, seen = [], {}
        for entry in self.compare:
            seen[entry.mode] = seen.get(entry.mode, 0) + 1
            n = seen[entry.mode]
            out.append((f"{entry.mode}-{n}" if n > 1 else str(entry.mode), entry))
        return out


@dataclass
class RefineConfig:
    """A refinement phase after the main training, as published on-policy runs set it up
    (Thinking Machines' tinker-cookbook, Qwen3 sec. 4.5, MiniLLM): the distilled student goes on
    `steps` more steps with batches of `mode` (on_policy: it samples completions of training
    prompts, the local teacher grades every token; mixed: GKD's coin per batch; offline: the
    cache), at a learning rate well below the main phase's, constant after a short warmup,
    sampling and loss at `temperature`. The baseline gets the matched continuation: the same
    steps, rows, learning rate and optimizer treatment on hard labels. Both phases are exported
    and evaluated (student-before-refine/, baseline-before-refine/). top_p, max_new_tokens,
    the on-policy loss and k are distill.*'s.
    """

    steps: int = 0  # 0: no refinement phase
    mode: DistillMode = "on_policy"
    # None: train.lr / 30. Published runs use 2-100x below the main rate. Adam turns the
    # near-zero gradient of a student that already matches the teacher into lr-sized steps in
    # random directions: the quickstart teacher trained on-policy against itself (12 steps)
    # fell from 99.5% to 97.5% at train.lr / 10 and held at train.lr / 30.
    lr: float | None = None
    warmup: int = 10
    # fresh: a new AdamW (tinker-cookbook's default when it loads a checkpoint; bias-corrected,
    # so its first steps are lr-sized); carry: the main phase's moments and step count.
    optimizer: RefineOptimizer = "fresh"
    samples_per_prompt: int = 4  # completions per prompt (train.batch_size must divide by it)
    temperature: float = 1.0  # sampling, and the teacher's targets for the on-policy loss
    lmbda: float = 0.5  # mode mixed: probability that a batch is on-policy

    def lr_for(self, train: TrainConfig) -> float:
        return train.lr / 30 if self.lr is None else self.lr


@dataclass
class EvalConfig:
    num_examples: int = 200
    max_new_tokens: int = 256
    batch_size: int = 64


@dataclass
class ExportConfig:
    quantize_bits: int | None = None  # 4 or 8: also write student-q{bits}/
    # The exported models' weights; None: the dtype trained in, or the student's checkpoint's
    # when that is narrower (a bf16 student trained under train.dtype float32 stays bf16).
    dtype: ExportDType | None = None


@dataclass
class Recipe:
    name: str = "quickstart"
    seed: int = 0
    runs_dir: str = "runs"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    baseline: bool = True  # false (or --no-baseline): no baseline stage; eval and report without
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def validate(self) -> None:
        """Cross-field checks the types alone cannot express."""
        check_choices(self)
        if (self.data.reasoning_open is None) != (self.data.reasoning_close is None):
            raise BadInput(
                "recipe keys data.reasoning_open and data.reasoning_close: set both or neither"
            )
        for stage in self.stages:
            if stage not in STAGES:
                raise BadInput(
                    f"recipe key stages: unknown stage {stage!r}; {closest(stage, STAGES)}"
                )
        if not self.baseline:  # out of the stage list, so every reader of it agrees
            self.stages = [s for s in self.stages if s != "baseline"]
        positive = {
            "train.steps": self.train.steps,
            "train.batch_size": self.train.batch_size,
            "cache.k": self.cache.k,
            "data.max_seq_len": self.data.max_seq_len,
            "tokenizer.vocab_size": self.tokenizer.vocab_size,
            "train.log_every": self.train.log_every,
        }
        for key, value in positive.items():
            if value <= 0:
                raise BadInput(f"recipe key {key}: must be > 0, got {value}")
        lora = self.student.lora
        if lora.rank < 1:
            raise BadInput(f"recipe key student.lora.rank: must be >= 1, got {lora.rank}")
        if not 0.0 <= lora.dropout < 1.0:
            raise BadInput(
                f"recipe key student.lora.dropout: must be in [0, 1), got {lora.dropout}"
            )
        if lora.num_layers is not None and lora.num_layers < 1:
            raise BadInput(
                f"recipe key student.lora.num_layers: must be >= 1 or null, got {lora.num_layers}"
            )
        if lora.keys is not None and not lora.keys:
            raise BadInput("recipe key student.lora.keys: empty; null adapts every linear layer")
        for key, t in (("train", self.train), ("teacher.train", self.teacher.train)):
            if t.grad_accum < 1 or t.batch_size % t.grad_accum:
                raise BadInput(
                    f"recipe key {key}.grad_accum: {t.grad_accum} does not divide "
                    f"{key}.batch_size {t.batch_size}"
                )
            if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
                raise BadInput(
                    f"recipe key {key}.betas: expected two values in [0, 1), got {t.betas}"
                )
            if t.eps <= 0:
                raise BadInput(f"recipe key {key}.eps: must be > 0, got {t.eps}")
        if not 0.0 <= self.loss.kd_weight <= 1.0:
            raise BadInput(
                f"recipe key loss.kd_weight: must be in [0, 1], got {self.loss.kd_weight}"
            )
        if not 0.0 < self.loss.beta < 1.0:
            raise BadInput(f"recipe key loss.beta: must be in (0, 1), got {self.loss.beta}")
        for key, value in (
            ("loss.temperature", self.loss.temperature),
            ("cache.temperature", self.cache.temperature),
        ):
            if value <= 0:
                raise BadInput(f"recipe key {key}: must be > 0, got {value}")
        validate_modes(self)
        distills_local_topk = (
            self.distill.reads_cache()
            and self.teacher.kind == "local"
            and self.cache.targets == "topk"
            and "distill" in self.stages
            and self.loss.kind != "ce"
        )
        if distills_local_topk and self.loss.temperature != self.cache.temperature:
            # The cache holds the teacher's log-probs at cache.temperature and the loss reads them
            # as already tempered; a top-k slice with a tail bucket cannot be re-tempered exactly.
            raise BadInput(
                f"recipe key loss.temperature: {self.loss.temperature} differs from "
                f"cache.temperature {self.cache.temperature}; set both to the same value"
            )
        if self.student.init == "pretrained" and not self.student.path:
            raise BadInput("recipe key student.path: required when student.init is 'pretrained'")
        if self.student.layer_stride < 1:
            raise BadInput("recipe key student.layer_stride: must be >= 1")
        layers = self.student.layers
        if layers is not None and (not layers or min(layers) < 0 or len(set(layers)) < len(layers)):
            raise BadInput(
                f"recipe key student.layers: expected distinct layer indices >= 0, got {layers}"
            )
        if self.export.quantize_bits not in (None, 4, 8):
            raise BadInput("recipe key export.quantize_bits: must be 4, 8 or null")
        validate_gemini(self.teacher.gemini)
        self._validate_answers()

    def _validate_answers(self) -> None:
        t, g = self.teacher, self.teacher.generation
        if t.answers == "generate" and t.kind != "local":
            raise BadInput(
                "recipe key teacher.answers: generate is for a local teacher (a Gemini teacher "
                "always answers the prompts itself)"
            )
        for key, value in (("max_tokens", g.max_tokens), ("batch_size", g.batch_size)):
            if value < 1:
                raise BadInput(f"recipe key teacher.generation.{key}: must be >= 1, got {value}")
        if g.temperature < 0 or not 0.0 <= g.top_p <= 1.0:
            raise BadInput(
                "recipe key teacher.generation: temperature must be >= 0 and top_p in [0, 1], "
                f"got {g.temperature} and {g.top_p}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def section_hash(self, *keys: str) -> str:
        """A stable hash of some top-level sections (the input to a stage fingerprint)."""
        data = self.to_dict()
        return fingerprint({k: data[k] for k in keys})


def _set_dotted(data: dict[str, Any], dotted: str, raw: str) -> None:
    """Apply one `--set a.b.c=value`; the value is parsed as YAML, then coerced by the schema."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise BadInput(f"--set {dotted}: {key} is not a section")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node[keys[-1]] = value


def load_recipe(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Load a recipe file (or the defaults when `path` is None) and apply `key=value` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise BadInput(f"recipe file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise BadInput(f"{path}{where}: invalid YAML: {problem}") from None
        if not isinstance(data, dict):
            raise BadInput(f"{path}: a recipe must be a mapping of sections")
        data.setdefault("name", path.stem)
    for item in overrides:
        if "=" not in item:
            raise BadInput(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), raw)
    try:
        recipe = from_dict(Recipe, data)
        recipe.validate()
    except BadInput as e:
        raise BadInput(_blame(str(e), overrides, source)) from None
    return recipe


def _blame(message: str, overrides: typing.Sequence[str], source: str) -> str:
    """Prefix a recipe error with its cause: the `--set` of a key it names, else the recipe file."""
    keys = re.findall(r"recipe keys? ([A-Za-z_][\w.\[\]]*)", message)
    for item in reversed(overrides):  # the last --set of a key wins, so blame that one
        key = item.split("=", 1)[0].strip()
        for named in keys:
            if (
                named == key
                or named.startswith((key + ".", key + "["))
                or key.startswith(named + ".")
            ):
                return f"--set {item}: {message}"
    return f"{source}: {message}"
