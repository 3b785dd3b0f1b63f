"""Typed, validated configs. One model per pipeline stage; YAML in, YAML out; all errors at once.

A run's config is a YAML file such as `configs/svamp_t5.yaml`; every field can be overridden on
the command line with `--set section.field=value`. Validation reports every mistake in one
message, e.g.:

    config.yaml: 3 problems: method.alpha: must be between 0 and 1 (got 1.5); ...
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stepdistill.errors import ConfigError
from stepdistill.registry import check_name


# Fields added after runs were already written, and the value those older runs ran with. A
# `--resume` of such a run takes these values (unless the config sets the field), so it goes on
# as it started; fields not listed here ran with their current default.
ADDED_FIELDS: dict[str, Any] = {
    "training.group_by_length": False,
    "training.fuse_tasks": False,
    "training.target_logits_only": False,
    "training.fast_dropout": False,
    "training.fused_loss": False,
    "training.fused_gelu": False,
    "training.val_as_test": False,
}


class _Section(BaseModel):
    # Unknown keys are mistakes (a typo in `learning_rate` must not silently use the default).
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TaskConfig(_Section):
    name: str = Field(description="Task name: svamp, cqa, esnli, anli1, anli2, anli3, asdiv, generic, quickstart.")
    path: Optional[str] = Field(
        None,
        description="Where examples come from: unset = the Hugging Face hub; a directory = the "
        "paper's layout (e.g. ../shared/data/sbs); a .jsonl/.json/.csv file = your own data.",
    )
    spec: Optional[str] = Field(None, description="For task `generic`: the YAML file describing the dataset.")

    @field_validator("name")
    @classmethod
    def _known_task(cls, v: str) -> str:
        return check_name("task", v)

    @model_validator(mode="after")
    def _spec_fits(self) -> "TaskConfig":
        if self.name == "generic" and not self.spec:
            raise ValueError("task generic needs spec: the YAML file describing your dataset")
        if self.name != "generic" and self.spec:
            raise ValueError(f"spec is only for task generic, not {self.name}")
        return self


class SamplingConfig(_Section):
    max_new_tokens: int = Field(128, gt=0, description="Longest completion the teacher may write.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, description="Sampling seed (part of the annotation key).")


class PriceConfig(_Section):
    prompt: float = Field(0.0, ge=0, description="USD per 1M prompt (input) tokens.")
    completion: float = Field(0.0, ge=0, description="USD per 1M completion (output) tokens.")


class BudgetConfig(_Section):
    tokens: Optional[int] = Field(None, gt=0, description="Most prompt + completion tokens this run may spend.")
    usd: Optional[float] = Field(None, gt=0, description="Most money this run may spend (needs teacher.price).")


def _url_problem(url: str) -> str | None:
    """Why `url` cannot be an OpenAI-compatible API root, or None: http(s), a host, and nothing
    that could hold a secret (user or user:password before the host, a ?query, a #fragment)."""
    from urllib.parse import urlsplit

    if not url.isprintable() or any(c.isspace() for c in url):
        return "not a URL (it holds spaces or control characters): write it as http://HOST:PORT/v1"
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed [IPv6 address
        return "not a URL: write it as http://HOST:PORT/v1"
    if parts.scheme not in ("http", "https"):
        return "not an http(s) URL: write it as http://HOST:PORT/v1 or https://HOST/v1"
    if "@" in parts.netloc:
        return ("must not carry credentials (a user@ or user:password@ would be written to config.yaml and "
                "env.json): remove them and put the key in the environment variable named by teacher.api_key_env")
    if "?" in url or "#" in url:
        return ("must not have a ?query or #fragment (keys travel in them, and it would be written to config.yaml "
                "and env.json): remove it and put a key in the environment variable named by teacher.api_key_env")
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number in 0-65535)
    except ValueError:
        return "has an invalid port: write it as http://HOST:PORT/v1 with PORT a number up to 65535"
    if not parts.hostname:
        return "has no host: write it as http://HOST:PORT/v1"
    return None


def _masked_url(url: str) -> str:
    """`url` fit for an error message: whatever may be a secret (userinfo, query, fragment) masked."""
    url = re.sub(r"^([^/?#]*//)?[^/?#]*@", lambda m: (m.group(1) or "") + "***@", url)
    return re.sub(r"[?#].*", lambda m: m.group(0)[0] + "***", url)


class TeacherConfig(_Section):
    kind: str = Field(
        "hf",
        description="Teacher kind: hf (local transformers LM), openai (any OpenAI-compatible server), "
        "llamacpp (local GGUF via llama-cpp-python), vllm (GPU, offline batched), paper (the paper's recorded PaLM outputs).",
    )
    model: Optional[str] = Field(None, description="Hub id or local path (hf, vllm); .gguf file (llamacpp); the served model name (openai).")
    gguf_file: Optional[str] = Field(None, description="GGUF file name inside `model`, or a path to a .gguf file.")
    batch_size: int = Field(8, gt=0, description="Prompts generated together (hf).")
    n_shots: Optional[int] = Field(None, ge=0, description="Few-shot exemplars in the prompt (default: all the task ships).")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    # --- openai: any OpenAI-compatible HTTP server (hosted API, vLLM, TGI, llama.cpp, Ollama)
    base_url: Optional[str] = Field(None, description="openai: the server's API root, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: the environment variable holding the API key (the key itself is never read from a config).")
    endpoint: Literal["chat", "completions"] = Field("chat", description="openai: /chat/completions or /completions (raw continuation of the prompt).")
    chat_format: Literal["turns", "one-message"] = Field(
        "turns", description="openai chat endpoint: turns: the instruction as the system turn and each few-shot "
        "exemplar as a user turn and the assistant's answer, as chat models are trained; one-message: the whole "
        "few-shot prompt as one user message (what stepdistill sent before).")
    replicas: list[str] = Field(
        default_factory=list, description="openai: more API roots serving the same model. Requests are spread over "
        "base_url and these (each with `concurrency` in flight); a replica that fails 3 times in a row is taken out "
        "for replica_cooldown seconds and its requests are retried on the others.")
    replica_cooldown: float = Field(30.0, ge=0, description="openai: seconds a failing replica stays out before it is tried again.")
    concurrency: int = Field(16, gt=0, description="openai: most requests in flight at once (per replica).")
    timeout: float = Field(120.0, gt=0, description="openai: seconds one request may take, end to end, before it is retried.")
    max_retries: int = Field(6, ge=0, description="openai: retries per request on 429, 5xx, timeouts, dropped connections, malformed or empty replies.")
    backoff: float = Field(1.0, ge=0, description="openai: first retry delay in seconds; doubles each retry (with jitter) unless the server sends Retry-After.")
    backoff_max: float = Field(60.0, ge=0, description="openai: longest backoff delay in seconds.")
    price: Optional[PriceConfig] = Field(None, description="openai: prices, to account cost and enforce budget.usd.")
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    # --- llamacpp / vllm
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="llamacpp/vllm: extra keyword arguments for the engine (llama_cpp.Llama(...), vllm.LLM(...)), e.g. n_ctx, n_threads, tensor_parallel_size.",
    )

    @field_validator("kind")
    @classmethod
    def _known_teacher(cls, v: str) -> str:
        return check_name("teacher", v)

    @field_validator("base_url", "replicas")
    @classmethod
    def _plain_http_url(cls, v: Any) -> Any:
        # Refused here, before a run directory exists: config.yaml and env.json (which records
        # the command line) would otherwise keep a key carried in the URL, and a URL no request
        # can reach would only fail later, one retried request at a time.
        for url in v if isinstance(v, list) else [v]:
            if url is not None:
                problem = _url_problem(url)
                if problem:
                    raise ValueError(f"{problem} (got {_show(_masked_url(url))})")
        return v

    @model_validator(mode="after")
    def _budget_priced(self) -> "TeacherConfig":
        if self.budget.usd is not None and self.price is None:
            raise ValueError("budget.usd needs prices to count money: set teacher.price.prompt and teacher.price.completion (USD per 1M tokens)")
        return self


class LoraConfig(_Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Optional[list[str]] = Field(None, description="Default: peft's choice for the architecture.")
    layers: Optional[list[int]] = Field(
        None, description="Adapters in these layers only (peft's layers_to_transform; negative counts from the "
        "top: [-8, -7, ..., -1]). The backward pass stops at the lowest adapted layer, so the layers below it "
        "run forward only: the top 8 of 30 layers train in well under half the time of all 30.")


class StudentConfig(_Section):
    model: str = Field(description="Hub id, local path or .gguf file of the student (seq2seq or causal LM).")
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = Field(None, description="Tokenizer to use when the model folder has none.")
    kind: Literal["auto", "causal", "seq2seq"] = Field(
        "auto", description="auto: read config.is_encoder_decoder; causal/seq2seq: assert it (GGUF files load as causal unless seq2seq)."
    )
    lora: Optional[LoraConfig] = Field(None, description="Train LoRA adapters instead of all weights.")
    chat_template: Literal["auto", "on", "off"] = Field(
        "off", description="Causal students: train and query through the tokenizer's chat template (the task "
        "prefix and input as the user turn, the answer as the assistant's). auto: where the tokenizer has one; on: "
        "required; off: the plain prompt (prefix + input + newline).")
    chat_system: Optional[str] = Field(None, description="With the chat template: a system turn before the user turn.")
    trust_remote_code: bool = Field(
        False,
        description="Run Python code shipped with the model (auto_map in its config.json). Off: such a model is "
        "refused. Turn it on only for a model whose code you have read and trust.",
    )


class KDConfig(_Section):
    """Soft-label distillation from a teacher whose weights you have (and which shares the student's tokenizer)."""

    teacher: str = Field(description="The teacher model: hub id, folder, .gguf file, a training run (its model/), or smollm2-135m-instruct.")
    kind: Literal["forward_kl", "reverse_kl", "jsd", "tv"] = Field(
        "forward_kl", description="Divergence: forward KL (Hinton), reverse KL, generalised Jensen-Shannon (beta), total variation."
    )
    temperature: float = Field(2.0, gt=0, description="Softens both distributions; KL-type losses are scaled by T^2.")
    beta: float = Field(0.5, gt=0, lt=1, description="jsd: the teacher's weight in the mixture.")
    weight: float = Field(0.5, ge=0, le=1, description="Per task: (1 - weight) * cross-entropy + weight * divergence.")
    cache: Optional[str] = Field(
        None,
        description="A top-k logits cache (folder): written once if missing, then read instead of running the teacher "
        "(for teachers too big to keep beside the student). Forward KL only.",
    )
    top_k: int = Field(32, gt=0, description="Teacher tokens kept per position in the cache.")
    warmup_steps: int = Field(
        0, ge=0, description="co-distill: steps before the distillation term counts (early predictions are unreliable)."
    )
    lmbda: Optional[float] = Field(
        None, ge=0, le=1,
        description="On-policy distillation (GKD): the probability that a micro-batch's targets are the student's own "
        "samples, scored token by token by the teacher (the rationale task's too). Default: 0.5 under method on-policy, "
        "0 (teacher-forced KD only) under any other.",
    )
    sample_temperature: float = Field(1.0, gt=0, description="on-policy: the temperature the student samples its targets at.")
    base_url: Optional[str] = Field(
        None,
        description="A teacher behind an OpenAI-compatible server (llama.cpp's): its top-k log-probs on every training "
        "sequence come from /completions (echo + logprobs) into kd.cache, once; `teacher` is the server's model name.",
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="kd.base_url: the environment variable holding the server's key, if it needs one.")
    concurrency: int = Field(4, ge=1, description="kd.base_url: requests in flight.")
    server_logprobs: Literal["echo", "prompt_logprobs"] = Field(
        "echo",
        description="kd.base_url: how the server gives the log-probs of a prompt's tokens. echo: the text with echo + "
        "logprobs (llama.cpp's server; entry i follows token i); prompt_logprobs: the token ids with vLLM's "
        "prompt_logprobs (entry i predicted token i; no re-tokenisation, tokens named by id).",
    )
    cross_tokenizer: Optional[Literal["uld"]] = Field(
        None,
        description="A teacher with another tokenizer: uld compares the sorted probability vectors of teacher and "
        "student at positions aligned on the text (Universal Logit Distillation). Causal models only.",
    )

    @model_validator(mode="after")
    def _cache_is_forward_kl(self) -> "KDConfig":
        if self.cache and self.kind != "forward_kl":
            raise ValueError(f"kd.cache holds the teacher's top-k tokens only, which supports kind forward_kl, not {self.kind}: "
                             "drop kd.cache to run the teacher on the fly")
        if self.base_url and not self.cache:
            raise ValueError("kd.base_url: the server's log-probs are written to a top-k cache once: set kd.cache to a folder")
        if self.base_url and (self.cross_tokenizer or self.lmbda):
            raise ValueError("kd.base_url serves cached log-probs on the data's own tokens: it does not combine with "
                             "kd.cross_tokenizer or kd.lmbda")
        if self.cache and self.cross_tokenizer:
            raise ValueError("kd.cache stores the teacher's top-k at the student's token positions, which another tokenizer "
                             "does not have: drop kd.cache to run the teacher on the fly")
        if self.cache and self.lmbda:
            raise ValueError("kd.cache holds the teacher's distributions on the data's targets only, not on the student's "
                             "own samples: drop kd.cache to run the teacher on the fly, or set kd.lmbda to 0")
        return self


class MethodConfig(_Section):
    name: str = Field(
        "step-by-step",
        description="The training method (`stepdistill list` shows them all). Built in: standard: gold labels; "
        "distill: teacher labels (sequence-level KD; no gold needed); step-by-step: label + rationale multi-task; "
        "co-distill: kd.teacher and the student trained together, each also learning from the other's distribution; "
        "label-rationale: the label, then the rationale, in one sequence (inference stops after the label); "
        "rationale-label: the rationale, then the label (a chain-of-thought student); "
        "on-policy: KD on the student's own samples too (GKD; kd.lmbda, kd.kind jsd and kd.beta).",
    )
    alpha: float = Field(0.5, ge=0, le=1, description="loss = alpha * label loss + (1 - alpha) * rationale loss.")
    label_source: Literal["gold", "teacher"] = Field("gold", description="step-by-step: which labels to train on.")
    rationales: Literal["all", "correct"] = Field(
        "all",
        description="step-by-step: `all` parsed teacher rationales (the paper), or only those whose "
        "teacher label is correct against gold (a weak teacher's wrong reasoning is not taught).",
    )
    label_only: Literal["keep", "drop"] = Field(
        "keep",
        description="step-by-step, label-rationale, rationale-label: an item with no usable rationale (the teacher's "
        "did not parse, or was dropped as wrong) trains its label alone (keep: the paper) or is left out (drop: "
        "every training item then carries a rationale that agrees with its label).",
    )
    rationales_per_input: int = Field(
        1, ge=1,
        description="step-by-step, label-rationale, rationale-label: up to this many of the teacher's rationales "
        "per input (SCoTD), each a training row with the input's label. Above 1 it needs annotations made with "
        "verify.samples > 1: the kept rationale first, then the other samples that gave the same label.",
    )
    label_prefix: str = Field("predict: ", description="Task prefix of the label task.")
    rationale_prefix: str = Field("explain: ", description="Task prefix of the rationale task.")
    task_marker: Literal["encoder", "decoder"] = Field(
        "encoder",
        description="Where the task prefix goes. encoder: before the input (the paper). decoder (encoder-decoder "
        "students only): the input is encoded once and both tasks are decoded from it, the prefix forced at the "
        "start of the decoder.",
    )
    kd: Optional[KDConfig] = Field(
        None, description="Soft-label distillation added to any method's tasks; required by co-distill."
    )
    weighting: Literal["task_mean", "token"] = Field(
        "task_mean",
        description="Multi-task methods: task_mean = alpha * the label tokens' mean loss + (1 - alpha) * the "
        "rationale tokens' mean loss (the paper); token = every target token weighs the same, alpha unused "
        "(rationale tokens outnumber label tokens about 10 to 1).",
    )
    tag: Optional[str] = Field(
        None, description="The name this configuration goes by in sweep tables and reports (default: made from "
        "the method's name and options).",
    )

    @field_validator("name")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return check_name("method", v)

    @model_validator(mode="after")
    def _marker_without_kd(self) -> "MethodConfig":
        # a method's own requirements are checked by the method (methods/*.py), where it is built
        if self.task_marker == "decoder" and self.kd is not None:
            raise ValueError("method.task_marker=decoder does not combine with kd yet: use task_marker=encoder")
        return self


class TrainingConfig(_Section):
    epochs: float = Field(3.0, gt=0, description="Passes over the training examples (a fraction stops part-way).")
    max_steps: int = Field(-1, description="If > 0, overrides epochs.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of the optimizer.")
    batch_size: int = Field(8, gt=0, description="Training examples per step on each device (before gradient accumulation).")
    grad_accum: int = Field(
        1, gt=0, description="Steps whose gradients are summed before each optimizer update: the global batch is "
        "batch_size x grad_accum x processes.")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_input_length: int = Field(512, gt=0)
    max_target_length: int = Field(256, gt=0)
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Validation carved from the training split (unless `val_split` names one).")
    val_size: Optional[int] = Field(None, gt=0, description="Cap on validation examples (generation on CPU is slow).")
    eval_steps: Optional[int] = Field(None, gt=0, description="Evaluate every N steps (default: once per epoch).")
    patience: Optional[int] = Field(None, gt=0, description="Early stopping after N evaluations without improvement.")
    bf16: Optional[bool] = Field(
        None, description="bfloat16 autocast; default (null): on where the hardware has fast bf16 (a GPU that supports "
        "it, a CPU with AVX512-BF16 or AMX: 2-3x faster matmuls), off elsewhere.")
    group_by_length: bool = Field(True, description="Batches of examples of similar length (less padding), order still shuffled.")
    fuse_tasks: Optional[bool] = Field(
        None, description="step-by-step: both tasks in fewer forward passes (the same loss and gradients). Default (null): "
        "on for encoder-decoder students (one encoder pass for both tasks), off for causal ones, where stacking the "
        "tasks pads the label rows to the rationale rows' width: slower and more memory (docs/performance.md).")
    target_logits_only: bool = Field(
        True, description="Compute the output layer only at target tokens (not at padding or, for causal students, "
        "the prompt): most of a small student's step is its vocabulary projection.")
    fused_loss: bool = Field(
        True, description="With target_logits_only, where the model's logits are its output layer's output (T5, "
        "Llama, Qwen, ...): run the output layer and the cross-entropy fused, a block of the vocabulary at a time, "
        "instead of writing vocabulary-wide float32 logits and their gradient. In one process and under DDP; not under FSDP or DeepSpeed.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, slower steps.")
    fast_dropout: Optional[bool] = Field(
        None, description="Dropout masks from 16-bit draws (four per 64-bit random number) instead of one float "
        "per element: on CPUs torch's dropout is a tenth of a small model's step. Default (null): on without a GPU.")
    fused_gelu: bool = Field(
        True, description="Run transformers' Python tanh-GELU (gelu_new, gelu_fast: T5 v1.1, GPT-2; eight "
        "elementwise passes forward and more backward) as torch's one fused kernel, the same function to float "
        "rounding. Training only: the saved model keeps its config.")
    seed: int = 42
    train_size: Optional[int] = Field(None, gt=0, description="Use only the first N training examples (after the validation split).")
    data_fraction: float = Field(
        1.0, gt=0, le=1, description="Train on this share of the training examples (after the validation split): a "
        "subset drawn with data_seed, nested (a smaller share's subset lies inside a larger one's).")
    data_seed: Optional[int] = Field(
        None, description="Seed of the validation carve and the data subset (default: seed). Sweeps fix it, so every "
        "method and training seed sees the same data.")
    logging_steps: int = Field(10, gt=0)
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list,
        description="Experiment trackers that receive the training curves (loss, each task's loss, the KD terms, "
        "validation accuracy), e.g. [tensorboard]; none by default. Offline-safe: tensorboard and mlflow write under "
        "the run folder, wandb runs offline unless WANDB_MODE says otherwise.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, v: Any) -> Any:
        if isinstance(v, str):  # "tensorboard", "tensorboard,wandb", "none"
            v = [t.strip() for t in v.split(",") if t.strip()]
        return [t for t in v if t != "none"] if isinstance(v, list) else v

    val_as_test: bool = Field(
        False, description="Score validation as the test evaluation scores the saved model: a copy of the student "
        "with LoRA merged, in bfloat16 where training runs in bf16 (else float32), at least 32 inputs to a batch, so "
        "model selection sees the test's numerics. Off (default): the training weights as they are, at the training "
        "batch size; on a 2-core CPU that was the faster (bench/results/validation.md: 0.80x with the copy).")
    val_max_new_tokens: int = Field(
        32, gt=0, description="Longest label generated when scoring validation accuracy (capped by max_target_length; "
        "a chain-of-thought student, method rationale-label, generates up to max_target_length)."
    )


class VerifyConfig(_Section):
    samples: int = Field(1, gt=0, description="Self-consistency: k teacher samples per input (k > 1 needs sampling.temperature > 0); the label is their majority vote.")
    against: Literal["auto", "gold", "majority", "none"] = Field(
        "auto",
        description="Keep a rationale only if its label agrees with: gold (the gold label), majority (the majority vote), "
        "auto (gold where the input has one, else the majority), none (keep every parsed rationale, as the paper did).",
    )
    min_agreement: float = Field(
        0.5, ge=0, lt=1,
        description="When checking against the majority with k > 1: drop inputs whose majority share is not above this (0.5 = a strict majority).",
    )


class AnnotateRun(_Section):
    task: TaskConfig
    split: str = Field(
        "train", description="The task's split to annotate (train, valid, test), or a carve of one: train[:-1000], "
        "valid[:50%].")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    limit: Optional[int] = Field(None, gt=0, description="Annotate only the first N examples.")
    shard: Optional[str] = Field(
        None, description="I/N: annotate only the examples whose input hash falls in shard I of N (0-based), so N "
        "processes or machines split a dataset, each writing to the same store; a final run without shard then "
        "collects them all from the store at no cost.")

    @field_validator("shard")
    @classmethod
    def _shard(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        try:
            i, n = (int(x) for x in v.split("/"))
        except ValueError:
            raise ValueError(f"shard must be I/N, e.g. 0/4, got {v!r}") from None
        if not (n > 0 and 0 <= i < n):
            raise ValueError(f"shard {v}: need 0 <= I < N")
        return v

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> "AnnotateRun":
        if self.verify.samples > 1 and self.teacher.sampling.temperature == 0:
            raise ValueError(
                f"verify.samples={self.verify.samples} with greedy decoding gives {self.verify.samples} identical answers: "
                "set teacher.sampling.temperature > 0 (e.g. 0.7)"
            )
        return self


class TrainRun(_Section):
    task: TaskConfig
    student: StudentConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    annotations: Optional[str] = Field(None, description="Annotation run directory (needed by distill and step-by-step).")
    split: str = Field(
        "train", description="The task's split to train on, or a carve of one (e.g. valid[:-2000]); never test.")
    limit: Optional[int] = Field(None, gt=0, description="Use only the first N examples of the split (before carving validation).")
    val_split: Optional[str] = Field(
        None,
        description="Select the model on this split of the task (e.g. valid); unset = carve "
        "training.val_fraction from the training split. Never test.",
    )


InferenceDtype = Literal["float32", "bfloat16", "auto"]  # weights at prediction: evaluation.inference_dtype


class SweepEval(_Section):
    split: str = "test"
    limit: Optional[int] = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    dtype: InferenceDtype = Field("float32", description="Weights at prediction (as in eval).")
    label_decoding: Literal["auto", "generate", "rank", "vocab"] = Field(
        "auto", description="As in eval. `generate` scores every method the same way (greedy decoding), where "
        "`auto` ranks a closed answer set for students that write the label alone.")


class SweepRun(_Section):
    """A grid of training runs: methods x data fractions x students x seeds, each evaluated."""

    task: TaskConfig
    annotations: Optional[str] = Field(None, description="Annotation run directory (needed by distill and step-by-step).")
    methods: list[MethodConfig] = Field(min_length=1, description="Methods, by name or as method sections.")
    fractions: list[float] = Field([1.0], min_length=1, description="Shares of the training data (nested subsets).")
    students: list[StudentConfig] = Field(min_length=1)
    seeds: list[int] = Field([0], min_length=1, description="Training seeds (initialisation and data order).")
    data_seed: int = Field(0, description="Seed of the validation carve and of the nested subsets: fixed across the grid.")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    split: str = "train"
    limit: Optional[int] = Field(None, gt=0)
    val_split: Optional[str] = None
    eval: SweepEval = Field(default_factory=SweepEval)

    @field_validator("methods", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        return [{"name": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("students", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        return [{"model": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("fractions")
    @classmethod
    def _shares(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0 < f <= 1]
        if bad:
            raise ValueError(f"fractions must lie in (0, 1], got {bad}")
        return sorted(set(v))


class EvalRun(_Section):
    task: TaskConfig
    model: str = Field(description="A training run directory or a model path.")
    split: str = Field("test", description="The task's split to score on, or a carve of one (e.g. test[:100]).")
    annotations: Optional[str] = Field(None, description="Annotation run on the same split, to report teacher accuracy beside the student's.")
    batch_size: int = Field(16, gt=0, description="Inputs predicted together.")
    max_new_tokens: Optional[int] = Field(
        None, gt=0, description="Longest label generated. Default: task-aware, the longest label the student was "
        "trained on plus a margin (a label needs a few tokens; free generation up to a fixed cap wastes time).")
    label_decoding: Literal["auto", "generate", "rank", "vocab"] = Field(
        "auto", description="generate: greedy decoding. rank: score every allowed answer (the classes, or the "
        "example's choices) in one pass and take the likeliest, no free generation. vocab: greedy decoding over "
        "the tokens of the labels the student was trained on (digits and signs for arithmetic): the output layer "
        "shrinks from the whole vocabulary to those rows, the largest cost of a small student's step. auto: rank "
        "where the task has a closed answer set, else generate.")
    limit: Optional[int] = Field(None, gt=0, description="Score only the first N examples of the split.")
    rationales: bool = Field(False, description="Also generate the rationale task's explanations.")
    dtype: InferenceDtype = Field(
        "float32", description="Weights at prediction: bfloat16 halves what each generated token reads (about 2x "
        "faster decoding of a small student on CPUs with AVX512-BF16); auto picks it where the hardware is fast.")


def _show(value: Any, limit: int = 80) -> str:
    """repr() for an error message: one line, cut to `limit` characters; never raises (repr of
    an int over 4300 digits does)."""
    try:
        text = repr(value)
    except ValueError:
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_errors(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        # a key with a newline or other control character is quoted: the message stays one line
        loc = ".".join(str(p) if str(p).isprintable() else _show(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (typo?)"
        elif e["type"] == "missing":
            msg = "required field missing"
        elif e["type"] == "value_error":  # our validators' messages already name the value and the fix
            msg = msg.removeprefix("Value error, ")
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {_show(e['input'])})"
        out.append(f"{loc}: {msg}")
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """`set_dotted(d, "training.learning_rate", 1e-4)` sets d["training"]["learning_rate"]."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`["training.learning_rate=1e-4"]` -> `[("training.learning_rate", 0.0001)]` (values parsed as YAML)."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected section.field=value, e.g. --set training.epochs=2")
        key, raw = pair.split("=", 1)
        value = _yaml(raw, f"--set {pair!r}") if raw.strip() else None
        if isinstance(value, str) and _SCI.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
        out.append((key.strip(), value))
    return out


_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml(text: str, where: str) -> Any:
    """yaml.safe_load, with every failure a one-line ConfigError. Besides YAMLError, PyYAML raises
    ValueError (`2001-13-45` read as a date; an int over 4300 digits) and RecursionError (deep nesting)."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: not valid YAML ({first}): fix the syntax") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found: check the path")
    try:
        text = p.read_text(encoding="utf-8")  # not the locale's encoding
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot be read ({e}): a config is a UTF-8 text file") from None
    data = _yaml(text, str(p)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def build(model: type[BaseModel], data: dict[str, Any], source: str = "config"):
    """Validate `data` against `model`, reporting every mistake in one ConfigError."""
    if _count_values(data) > MAX_VALUES:
        raise ConfigError(f"{source}: more than {MAX_VALUES} values, or a YAML alias inside its own anchor "
                          f"(`&a [*a]`): write the config out plainly")
    try:
        cfg = model.model_validate(data)
    except ValidationError as err:
        problems = _format_errors(err)
        noun = "problem" if len(problems) == 1 else "problems"
        raise ConfigError(f"{source}: {len(problems)} {noun}: " + "; ".join(problems)) from None
    # a run writes its config back out (runs.py): what cannot be written is refused now, not after
    # the run started (free-form fields such as teacher.engine_args take any value)
    try:
        to_yaml(cfg)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{source}: a value cannot be written back as YAML ({_show(str(e), 120)}): "
                          f"use plain strings, numbers, lists and mappings") from None
    return cfg


MAX_VALUES = 10_000  # a real config holds under 200


def _count_values(data: Any) -> int:
    """Values in `data`, repeats counted each time, stopping past MAX_VALUES: a self-referencing
    YAML alias (`&a [*a]`) or a "billion laughs" of nested aliases would otherwise make validation
    or to_yaml recurse forever or run for hours."""
    n, stack = 0, [data]
    while stack and n <= MAX_VALUES:
        node = stack.pop()
        n += 1
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend(node)
    return n


def coerce(model: type[BaseModel], cfg: BaseModel | dict[str, Any]):
    """The API accepts a validated config or a plain dict: `coerce(TrainRun, {"task": ...})`."""
    return cfg if isinstance(cfg, model) else build(model, cfg)


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
