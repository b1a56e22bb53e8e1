"""Parameter-golf training script: SP8192 11-layer XSA GPT, parallel Muon, full-Hessian GPTQ int6
(rANS) under rate control, sliding-window val_bpb of the artifact, score-first LoRA TTT.

Launch: torchrun --standalone --nproc_per_node=N train_gpt.py (N = 1..8; CPU works too).
Settings: environment variables (see Hyperparameters).

The file in the order a run goes (`main` at the end: its phases, in `train_and_score`):
settings (frozen, in parts; the model part is the artifact's header) -> the process (rank, device,
collectives, atomic files) -> data (shards, the training stream, validation tokens and their
bytes, CaseOps) -> model (its attention kernel an object it holds) -> optimizer (parallel Muon,
AdamW) -> training (one schedule, the timed loop) -> quantization (calibration, GPTQ, rate control)
and packing (the artifact, rANS, the code as shipped) -> evaluation (round trip, sliding windows,
n-gram tilt, score-first TTT, the artifact's scores) -> the run (log, files, results).
"""
from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import datetime
import difflib
import functools
import glob
import hashlib
import io
import json
import lzma
import math
import os
import re
import signal
import struct
import sys
import tempfile
import time
import tokenize
import traceback
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar
from typing import Callable, NamedTuple

# Inductor's mix-order reduction fused the embedding's backward with eight per-channel gradient
# sums into one 12 ms kernel per micro-step (H200, torch 2.11): off, 7 % less GPU time per step
os.environ.setdefault("TORCHINDUCTOR_MIX_ORDER_REDUCTION", "0")

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# FlashAttention (FA3 or FA4) is imported on demand: see choose_attention
try:  # FlexAttention: skips fully masked blocks
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except Exception:  # noqa: BLE001
    create_block_mask = flex_attention = None
ARTIFACT_CAP_BYTES, EVAL_LIMIT_SECONDS = 16_000_000, 600


class ConfigError(ValueError):
    """Impossible or inconsistent settings."""


class DataError(ValueError):
    """Missing or malformed shards / tokenizer."""


class ArtifactError(ValueError):
    """Artifact over the byte cap or unreadable."""


class OutputError(ValueError):
    """OUT_DIR unusable, a file not written, or a run's files already there."""


class ScoreError(ValueError):
    """A score that is not a number: a bug to find, never a result to write."""


class JobError(RuntimeError):
    """Another rank of the job is gone or stuck: said by each rank that waited for it."""


class RankError(RuntimeError):
    """A failure of this rank alone (its own reads, its own memory): said by that rank, with its number."""


class DivergedError(FloatingPointError):
    """Training diverged (non-finite gradients, all-reduced: every rank alike)."""


ONE_LINE_ERRORS = (ConfigError, DataError, ArtifactError, OutputError, ScoreError, JobError, RankError,
                   DivergedError)  # reported as one line
# said by every rank that has one (the others: by rank 0 only, every rank having the same)
EVERY_RANK_SAYS = (JobError, RankError)


# ----- settings: every setting from its environment variable, checked and frozen in parts

# Choices whose worth depends on the amount of training (README, "The 8xH100 configuration"): the
# defaults follow the 8xH100 records; PROFILE=1gpu takes what one GPU x 600 s measured on the proxy.
# A setting given explicitly wins over its profile's value.
PROFILES = {"8xh100": {}, "1gpu": {"mlp_mult": 3.0, "recur_passes": 0, "train_seq_schedule": ""}}


_TRUE_WORDS, _FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# removed settings -> replacements (a run setting one stops)
_REMOVED_SETTINGS = {"WARMDOWN_ITERS": "WARMDOWN_FRAC", "MUON_MOMENTUM_WARMUP_STEPS": "MUON_MOMENTUM_WARMUP_FRAC",
                     **dict.fromkeys(("EMA_DECAY", "SWA_ENABLED", "SWA_EVERY", "SWA_START_SCALE"), "EMA_HORIZON"),
                     "GPTQ_CLIP_QUANTILES": "CLIP_SIGMAS", "COMPRESSORS": "nothing (rANS + lzma)",
                     "VAL_EVERY": "nothing (score after training)", "TTT_CHUNK_TOKENS": "TTT_CHUNK",
                     "TTT_MOMENTUM": "TTT_LR (Adam)", "TTT_EPOCHS": "TTT_PHASES", "MUON_NS": "nothing (Polar Express)",
                     **dict.fromkeys(("LQER_TENSORS", "LQER_RANK"), "nothing (LQER: no gain per byte)"),
                     **dict.fromkeys(("BIGRAM_VOCAB", "BIGRAM_DIM", "VE_DIM", "VE_LAYERS", "ADAM_WD"),
                                     "nothing (BigramHash and value embeddings: no gain per byte)")}
# short names people use for settings, which the spelling rules below do not reach
_SETTING_ALIASES = {"SEQ_LEN": "TRAIN_SEQ_LEN", "ITERS": "ITERATIONS",
                    "LR": "MATRIX_LR, EMBED_LR or SCALAR_LR (the learning rates)"}
_NON_SETTING_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOG_NOTE", "AUTHOR", "GITHUB_ID",
                     "RUN_NAME", "BLURB")

def _meant_setting(key, names):
    """The setting that environment variable `key`, not itself one, looks meant for (wrong case,
    a misspelling, a short name as in _SETTING_ALIASES, or a setting's first word: TTT, SKIP_SLIDING),
    else None."""
    up = key.upper()
    if key in names or key in _NON_SETTING_VARS:
        return None
    if up in names:
        return up
    if up in _SETTING_ALIASES:
        return _SETTING_ALIASES[up]
    if f"{up}_ENABLED" in names:  # TTT=0
        return f"{up}_ENABLED"
    close = difflib.get_close_matches(up, names, n=1, cutoff=0.85)
    same_head = [n for n in names if n.split("_")[0] == up.split("_")[0]]
    return (close or difflib.get_close_matches(up, same_head, n=1, cutoff=0.6) or [None])[0]


def _layer_list(text, key):
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"{key}={text!r} must be a comma list of layer numbers") from None


@dataclass(frozen=True)
class ModelSettings:
    """The model part: what the artifact's header records, enough to rebuild the model that scores
    it (EVAL_ONLY). A field added here is in every new artifact's header, unless it declares
    metadata={"absent": VALUE}, the value that means the model as it was before the field existed:
    at that value the header leaves it out (older artifacts stay byte for byte what they were) and
    EVAL_ONLY reads a header lacking it as that value (header_config, settings_from_header)."""
    vocab_size: int = 8192
    bos_id: int = 1
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0  # the records' 4x (1gpu: 3x, -0.0049 sliding through bytes at ~900 steps)
    leaky_slope: float = 0.5
    xsa_layers: int = -1  # last N layers use XSA; -1: all
    # XSA's subtraction per head x (1 + tanh(alpha)), alpha learned from 0 (off: the header leaves it out)
    xsa_gate: bool = dataclasses.field(default=False, metadata={"absent": False})
    rope_dims: int = 16
    rope_base: float = 10000.0
    qk_gain_init: float = 5.0
    logit_softcap: float = 30.0
    quant_bits: int = 6  # the banks' GPTQ grid (and late QAT's)
    train_seq_len: int = 2048
    skip_gates: bool = True  # U-Net skips enter through sigmoid gates
    parallel_from: int = 8  # layers from here on run attention || MLP (>= NUM_LAYERS: off)
    recur_layers: str = "auto"  # consecutive layers run 1 + RECUR_PASSES times ("": off)
    recur_passes: int = 2  # the records' layers 3-5 x3 from 35 % (1gpu: off, it cost steps)
    attn_gate_width: int = 12  # per-head output gate from N input channels (0: off)
    doc_mask: bool = True  # attention never crosses a BOS

    @property
    def head_dim(self):
        return self.model_dim // self.num_heads

    @property
    def mlp_hidden(self):
        return int(self.mlp_mult * self.model_dim)

    def recur_layer_list(self, even_if_off=False):
        if self.recur_passes <= 0 and not even_if_off:
            return []
        if self.recur_layers == "auto":  # layers 3..5 of 11, scaled to the depth
            first = round(3 * self.num_layers / 11)
            return list(range(min(first, self.num_layers - 1), min(first + max(1, first), self.num_layers)))
        return _layer_list(self.recur_layers, "RECUR_LAYERS")


@dataclass(frozen=True)
class TrainingSettings:
    """The training part: budget, schedule (in fractions of the run: the same shape on 1 and 8
    GPUs), optimizers, EMA, late QAT."""
    iterations: int = 20000
    max_wallclock_seconds: float = 600.0
    gptq_reserve_seconds: float = -1.0  # -1: from model size
    train_batch_tokens: int = 786_432
    # progressive context, "LEN@FRACTION,...": each length from that fraction of the run on, tokens per
    # step unchanged; "" (or TRAIN_SEQ_LEN given without it): TRAIN_SEQ_LEN throughout
    train_seq_schedule: str = "1024@0,2048@0.3,3072@0.6"
    grad_accum_steps: int = 0  # 0: max(1, 4 // world_size)
    warmup_steps: int = 20  # compile warm-up, undone afterwards
    warmdown_frac: float = 0.85
    min_lr_scale: float = 0.1
    train_log_every: int = 100
    recur_start_frac: float = 0.35  # depth recurrence from this fraction of the run
    tied_embed_init_std: float = 0.005
    matrix_lr: float = 0.026
    muon_wd: float = 0.095
    muon_momentum: float = 0.97
    muon_momentum_start: float = 0.92
    muon_momentum_warmup_frac: float = 0.22
    muon_ns_steps: int = 5
    muon_row_norm: bool = True  # MuonEq-R: update rows normalised before Newton-Schulz
    embed_lr: float = 0.03
    scalar_lr: float = 0.02
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_eps: float = 1e-8
    embed_wd: float = 0.085
    grad_clip_norm: float = 0.3
    ema_horizon: float = 0.05  # EMA time constant, fraction of the run (0: off)
    qat_start_scale: float = 0.15  # 0 disables late QAT


@dataclass(frozen=True)
class QuantSettings:
    """The quantization part: calibration, GPTQ, the rate control and the artifact's target."""
    gptq_calib_seqs: int = 64
    gptq_calib_len: int = 2048
    gptq_block: int = 128
    gptq_damp: float = 0.01
    # SDClip: row step = clip_sigmas x row RMS / qmax; rate control tunes it
    clip_sigmas: float = 6.5  # first guess, and the late-QAT grid
    embed_bits: int = 7  # the tied embedding
    embed_clip_sigmas: float = 14.0  # 0: the row's absmax
    rate_tries: int = 3  # GPTQ + compress rounds of the rate control
    artifact_target_bytes: int = 15_950_000
    # AWQ-lite: input columns scaled by (activation RMS)^alpha before GPTQ (0: off); the scales of
    # qkv / out / up are stored (fp16, `awq.<kind>.<layer>`), down's fold into up's rows for free
    awq_alpha: float = 0.0
    awq_matrices: str = "qkv,out,up"  # of qkv, out, up, down

    def awq_kinds(self):
        """The Hessian kinds AWQ-lite scales ([] while AWQ_ALPHA is 0)."""
        return [k.strip() for k in self.awq_matrices.split(",") if k.strip()] if self.awq_alpha > 0 else []


@dataclass(frozen=True)
class EvalSettings:
    """The evaluation part: sliding windows, score-first TTT, the token n-gram tilt."""
    eval_seq_len: int = 2048
    eval_stride: int = 64
    eval_batch_seqs: int = 32
    eval_only: str = ""  # artifact path: only evaluate it
    skip_sliding_eval: bool = False
    # score-first TTT: per-document LoRA trained on each chunk after scoring it
    ttt_enabled: bool = True
    ttt_rank: int = 80
    ttt_chunk: int = 48
    ttt_batch_docs: int = 64
    # documents of at most TTT_SHORT_LEN targets (0: TTT_CHUNK) in a lanes pass of their own, in
    # chunks of TTT_SHORT_CHUNK (0: off; in one chunk, such a document gains nothing from TTT)
    ttt_short_chunk: int = 0
    ttt_short_len: int = 0
    # the adapters' recipe is the #1 record's (Adam beta1 0, eps 1e-10, x alpha/rank, A kept, lr 1e-4):
    # -0.0030 TTT on the proxy against AdamW(0.9) lr 3e-4 with a fresh A per document
    ttt_lr: float = 0.0001
    ttt_wd: float = 0.5
    ttt_beta1: float = 0.0  # the adapters' Adam
    ttt_beta2: float = 0.99
    ttt_eps: float = 1e-10
    ttt_alpha: float = 144.0  # adapter output x alpha / rank (0: x 1)
    ttt_keep_a: bool = True  # a row's A carries over to its next document (only B and Adam state reset)
    ttt_phases: int = 3
    ttt_global_lr: float = 0.002
    ttt_global_momentum: float = 0.9  # the global pass's SGD
    ttt_global_micro_rows: int = 8  # rows of EVAL_SEQ_LEN per forward in the global pass: bounded memory
    ttt_max_seconds: float = 480.0  # into the evaluation: adaptation stops, scoring goes on
    # token n-gram tilt (every scorer): p'(a) ~ p(a) e^(beta [a = hint]) where an earlier context hints
    ngram_tilt: bool = True
    ngram_max: int = 16  # longest context, tokens
    ngram_min: int = 1
    ngram_conf: float = 0.95  # least share of the context's earlier continuations the hint must have had
    ngram_min_count: int = 3  # a context proposes once seen this often (once: ~40 % of such hints right, proxy)
    ngram_beta: float = 1.0  # 2.625 with 0.8 / 2, the field's beta: +0.0048 on the proxy (RESULTS.md)
    ngram_lift: float = 0.6  # > 0, instead of a fixed beta: the hint's probability raised to this where below it


@dataclass(frozen=True)
class RunSettings:
    """The run part: data, tokenizer, seed, files, runtime providers."""
    # CaseOps SP8192 (tools/caseops_prep.py), scored on its byte sidecar: -0.012 sliding on the proxy
    data_path: str = "./data/datasets/fineweb10B_caseops8192"
    tokenizer_path: str = "./tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"  # in the repository
    seed: int = 42
    profile: str = "8xh100"  # 8xh100 (the submission) | 1gpu (proxy runs): see PROFILES
    run_id: str = ""  # "": seed<SEED>
    out_dir: str = "runs"  # a run refuses to start where its run id's files already are
    data_name: str = ""  # names the data in the log and submission.json, e.g. "FineWeb challenge shards"
    byte_sidecar: str = "auto"  # bytes per target from DATA_PATH's fineweb_val_bytes_*.bin (auto: if there) | 1 | 0
    val_tokens_limit: int = 0  # 0: full validation split
    attn_backend: str = "auto"  # auto (FA3, else FA4, else flex/sdpa) | fa3 | fa4 | flex | sdpa | math
    compile: str = "auto"  # auto (on for CUDA) | 1 | 0
    device: str = "auto"
    loader_prefetch: bool = False  # the next micro-batch read by a thread (pinned on CUDA): off until a GPU measures it
    # a collective waiting longer fails the job with one line (a rank stopped, stuck or gone); the longest
    # legitimate wait is a rank's lead in the compile warm-up or rank 0's rate control: minutes at most
    dist_timeout_seconds: float = 900.0


def settings_part(settings, cls):
    """The settings of part `cls` (one of SETTING_PARTS) on their own, from any settings holding them."""
    return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


SETTING_PARTS = {"model": ModelSettings, "training": TrainingSettings, "quant": QuantSettings, "eval": EvalSettings,
                 "run": RunSettings}


@dataclass(frozen=True)
class Hyperparameters(RunSettings, EvalSettings, QuantSettings, TrainingSettings, ModelSettings):
    """Every setting, each from its upper-case environment variable; frozen: what a run derives
    later (the QAT clip, an artifact's model in EVAL_ONLY) is a new value, never an assignment.
    `args.model` is the model part on its own (settings_part(args, part) any of SETTING_PARTS)."""

    @classmethod
    def from_env(cls, env=None, warn=None):
        """Each field from its upper-case variable; likely misspellings go to `warn`."""
        env = os.environ if env is None else env
        names = {f.name.upper(): f for f in dataclasses.fields(cls)}
        for key, new in _REMOVED_SETTINGS.items():
            if key in env:
                raise ConfigError(f"{key} is no longer a setting; use {new}")
        kwargs = {}
        for key, f in names.items():
            raw = env.get(key)
            if raw is None:
                continue
            try:
                if f.type == "bool":  # a str (postponed annotations)
                    word = raw.strip().lower()
                    if word not in _TRUE_WORDS + _FALSE_WORDS:
                        raise ValueError
                    kwargs[f.name] = word in _TRUE_WORDS
                elif f.type == "int":
                    kwargs[f.name] = int(float(raw)) if "e" in raw.lower() else int(raw)
                elif f.type == "float":
                    kwargs[f.name] = float(raw)
                else:
                    kwargs[f.name] = raw
            except (ValueError, OverflowError):  # OverflowError: an int of inf (1e999)
                raise ConfigError(f"{key}={raw!r} is not a valid {f.type}"
                                  + (f" (use one of {_TRUE_WORDS + _FALSE_WORDS})" if f.type == "bool" else "")) from None
        if "train_seq_len" in kwargs:  # a length given alone is the length throughout
            kwargs.setdefault("train_seq_schedule", "")
        profile = kwargs.get("profile", cls.profile)
        if profile not in PROFILES:
            raise ConfigError(f"PROFILE={profile} must be one of {', '.join(PROFILES)}")
        for name, value in PROFILES[profile].items():
            kwargs.setdefault(name, value)
        if warn is not None:
            for key in env:
                meant = _meant_setting(key, names)
                if meant:
                    warn(f"warning: environment variable {key} is not a setting; did you mean {meant}?")
        return cls(**kwargs)

    def train_seq_lens(self):
        """[(from fraction, length), ...] of the training context, fractions rising from 0."""
        if not self.train_seq_schedule.strip():
            return [(0.0, self.train_seq_len)]
        out = []
        for item in self.train_seq_schedule.split(","):
            try:
                length, frac = item.split("@")
                out.append((float(frac), int(length)))
            except ValueError:
                raise ConfigError(f"TRAIN_SEQ_SCHEDULE={self.train_seq_schedule!r} must be LEN@FRACTION,... "
                                  f"(e.g. 1024@0,2048@0.5)") from None
        return out

    def train_seq_len_at(self, progress):
        return [n for f, n in self.train_seq_lens() if f <= progress][-1]

    @property
    def longest_train_seq(self):
        return max(n for _, n in self.train_seq_lens())

    @property
    def model(self):
        return settings_part(self, ModelSettings)

    def check_finite(self):
        """inf passes every range check (NaN none): a float setting that is not a number stops here."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "float" and not math.isfinite(v):
                raise ConfigError(f"{f.name.upper()}={v} must be a finite number")

    def check_text(self):
        """Paths and names go into the log, the results and submission.json as UTF-8: a setting that is
        not UTF-8 (undecodable bytes in the environment) would fail there, after the run."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    raise ConfigError(f"{f.name.upper()}={os.fsencode(v)!r} is not valid UTF-8: use a path or "
                                      "name in UTF-8") from None

    def validate(self, world_size):
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        self.check_finite()
        self.check_text()

        def within(lo, hi, *keys):
            for key in keys:
                v = getattr(self, key)
                need(lo <= v <= hi, f"{key.upper()}={v} must be " + (f">= {lo}" if hi == math.inf else f"in {lo}..{hi}"))
        within(1, math.inf, "model_dim", "num_heads", "num_kv_heads", "train_seq_len", "train_batch_tokens",
               "num_layers", "rate_tries", "gptq_block", "eval_batch_seqs", "gptq_calib_seqs", "dist_timeout_seconds")
        # no setting takes a negative value but these two, whose -1 means "automatic"
        within(-1, math.inf, "gptq_reserve_seconds", "xsa_layers")
        within(0, math.inf, *(f.name for f in dataclasses.fields(self) if f.type in ("int", "float")
                              and f.name not in ("gptq_reserve_seconds", "xsa_layers")))
        within(0, 1, "warmdown_frac", "muon_momentum_warmup_frac", "min_lr_scale", "ema_horizon", "recur_start_frac",
               "ttt_beta1")
        within(2, 8, "quant_bits", "embed_bits")
        within(2, 65536, "vocab_size")  # uint16 shards
        within(2, math.inf, "gptq_calib_len")
        within(*CLIP_RANGE, "clip_sigmas")
        within(0, ARTIFACT_CAP_BYTES, "artifact_target_bytes")
        within(0, 1, "awq_alpha")
        odd = [k.strip() for k in self.awq_matrices.split(",") if k.strip() and k.strip() not in AWQ_KINDS]
        need(not odd, f"AWQ_MATRICES={self.awq_matrices!r}: {', '.join(map(repr, odd))} not among {', '.join(AWQ_KINDS)}")
        for key, choices in (("compile", ("auto", "0", "1")), ("device", ("auto", "cuda", "cpu")),
                             ("byte_sidecar", ("auto", "0", "1")), ("profile", tuple(PROFILES)),
                             ("attn_backend", ("auto", *_VARLEN_LOADERS, *ATTENTIONS))):
            need(getattr(self, key) in choices, f"{key.upper()}={getattr(self, key)} must be one of {', '.join(choices)}")
        need(self.model_dim % self.num_heads == 0, f"NUM_HEADS={self.num_heads} must divide MODEL_DIM={self.model_dim}")
        need(self.mlp_hidden >= 1, f"MLP_MULT={self.mlp_mult} leaves the MLP no hidden unit at MODEL_DIM={self.model_dim}")
        need(self.num_heads % self.num_kv_heads == 0, f"NUM_KV_HEADS={self.num_kv_heads} must divide NUM_HEADS={self.num_heads}")
        need(self.head_dim % 2 == 0 and self.rope_dims % 2 == 0, "head dim and ROPE_DIMS must be even for RoPE")
        within(0, self.head_dim, "rope_dims")
        within(0, self.vocab_size - 1, "bos_id")
        within(1, self.eval_seq_len, "eval_stride")
        within(0, self.model_dim, "attn_gate_width")
        need(not self.xsa_gate or self.xsa_layers != 0, "XSA_GATE=1 gates XSA, which XSA_LAYERS=0 turns off")
        rec = self.recur_layer_list(even_if_off=True)
        need(not rec or (rec == list(range(rec[0], rec[-1] + 1)) and 0 <= rec[0] and rec[-1] < self.num_layers),
             f"RECUR_LAYERS={self.recur_layers} must be consecutive layers in 0..{self.num_layers - 1}")
        if self.attn_backend in _VARLEN_LOADERS:
            need_varlen_provider(self.attn_backend)  # ConfigError: not importable
        accum = self.resolved_grad_accum(world_size)
        lens = self.train_seq_lens()
        fracs = [f for f, _ in lens]
        need(fracs[0] == 0 and all(a < b < 1 for a, b in zip(fracs, fracs[1:])),
             f"TRAIN_SEQ_SCHEDULE={self.train_seq_schedule}: fractions must rise from 0 and stay under 1")
        for _, n in lens:
            per_micro = world_size * accum * n
            length = f"the training length ({n})" if self.train_seq_schedule.strip() else f"TRAIN_SEQ_LEN({n})"
            need(n >= 1 and self.train_batch_tokens % per_micro == 0,
                 f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of world_size({world_size}) x "
                 f"grad_accum({accum}) x {length} = {per_micro}")
        combos = len(schedule_shapes(self))
        need(self.warmup_steps == 0 or self.warmup_steps >= combos,
             f"WARMUP_STEPS={self.warmup_steps} cannot compile every training shape ({combos}: the (length, "
             f"recurrence) pairs of the schedule): use 0 or >= {combos}")
        need(not 0 < self.qat_start_scale <= self.min_lr_scale, "QAT_START_SCALE must be 0 or above MIN_LR_SCALE")
        need(self.max_wallclock_seconds > 0 or self.iterations > 0, "set ITERATIONS or MAX_WALLCLOCK_SECONDS")
        within(0, 1, "ngram_conf")
        need(0 <= self.ngram_lift < 1, f"NGRAM_LIFT={self.ngram_lift} must be in [0, 1) (0: NGRAM_BETA's fixed tilt)")
        need(self.ttt_beta1 < 1 and self.ttt_eps > 0, "TTT_BETA1 must be below 1 and TTT_EPS above 0")
        for key in ("ttt_beta2", "ttt_global_momentum"):
            need(getattr(self, key) < 1, f"{key.upper()}={getattr(self, key)} must be below 1")
        if self.ngram_tilt:
            within(1, math.inf, "ngram_min")
            within(self.ngram_min, math.inf, "ngram_max")
        if self.ttt_enabled:
            within(1, math.inf, "ttt_rank", "ttt_batch_docs", "ttt_phases", "ttt_global_micro_rows")
            within(1, self.eval_seq_len - 1, "ttt_chunk")
            within(0, self.eval_seq_len - 1, "ttt_short_chunk")
            short = self.ttt_short_len or self.ttt_chunk
            need(self.ttt_short_chunk < short, f"TTT_SHORT_CHUNK={self.ttt_short_chunk} must be below TTT_SHORT_LEN "
                 f"({short}): a document of one chunk gains nothing")

    def resolved(self, world_size, device):
        """These settings with their "auto" and sentinel values made concrete for `world_size`
        processes on `device` (after validate): what the run's log and config_id record."""
        return dataclasses.replace(self, grad_accum_steps=self.resolved_grad_accum(world_size), device=device.type,
                                   compile=str(int(_use_compile(self, device))),
                                   byte_sidecar=str(int(use_byte_sidecar(self))),
                                   run_id=self.run_id or f"seed{self.seed}")

    def resolved_grad_accum(self, world_size):
        """Default micro-steps: 4 on 1 GPU, 2 on 2, 1 on 4 or 8."""
        if self.grad_accum_steps > 0:
            return self.grad_accum_steps
        if 8 % world_size != 0:
            raise ConfigError(f"world_size={world_size} does not divide 8: set GRAD_ACCUM_STEPS explicitly")
        return max(1, 4 // world_size)


# ----- the process: rank and device, collectives, compile, atomic files

@dataclass
class Run:
    """This process in the job: its rank among `world_size`, its device, rank 0's log and the
    phase timer. Not a setting, so not part of the configuration's fingerprint."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    log: object = print  # a callable taking one line
    timer: object = None  # PhaseTimer; a fresh one if not given
    began: bool = False  # its work (training, or EVAL_ONLY's scoring) has begun

    def __post_init__(self):
        self.timer = self.timer or PhaseTimer()


def _is_nccl():
    return dist.is_initialized() and dist.get_backend() == "nccl"


def _multi():
    return dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(t):
    if _multi():
        dist.all_reduce(t)
    return t


def _from_rank0(value, world_size, device):
    """Rank 0's float `value` on every rank (one rank: no trip through the device)."""
    if world_size == 1:
        return float(value)
    t = torch.full((), float(value), dtype=torch.float64, device=device)  # a fill: no copy that waits
    dist.broadcast(t, 0)
    return float(t)


def _use_compile(args, device):
    return args.compile == "1" or (args.compile == "auto" and device.type == "cuda")


def _maybe_compile(model, args, device):
    return torch.compile(model, dynamic=False) if _use_compile(args, device) else model


def _autocast(device):
    # no cast cache: a CUDA graph (TTT) must cast the weights at every replay
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)


def _cuda_graph(fn):
    """`fn` (fixed shapes, state updated in place) captured in a CUDA graph after a warm-up on a
    side stream; -> its replay. The warm-up runs `fn`: the caller resets what it touched."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # NCCL watchdog
        fn()
    return graph.replay


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_atomic(path, data):
    """Write `data` (bytes) to a temporary name beside `path`, then rename: a reader sees the old
    file or the new one whole; a failure (full disk, Ctrl-C) leaves no partial file behind."""
    tmp = f"{path}.partial{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {e.strerror or e} (any earlier file of that name is unchanged)") from None
        raise


class PhaseTimer:
    def __init__(self):
        self.times = {}

    def add(self, name, seconds):
        self.times[name] = self.times.get(name, 0.0) + seconds

    def since(self, name, t0):
        self.add(name, time.perf_counter() - t0)


def setup_distributed(device_pref, timeout_s=None):
    """(rank, world size, device); the process group, whose collectives fail after `timeout_s`."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("DEVICE=cuda but torch sees no CUDA device (use DEVICE=auto or cpu to run on the CPU)")
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
                                timeout=datetime.timedelta(seconds=timeout_s) if timeout_s else None)
    return rank, world, device


# what gloo's collectives raise (a plain RuntimeError) when a peer is gone or the wait timed out
_PEER_FAILURE = re.compile(r"/gloo/|[Tt]imed out|closed by peer|reset by peer|pair closure")


@contextlib.contextmanager
def peer_failures_named(timeout_s):
    """A collective that failed because another rank is gone, or waited past DIST_TIMEOUT_SECONDS
    (a rank stopped or stuck) -> a one-line JobError on each rank that sees it (the missing rank
    cannot say it)."""
    try:
        yield
    except RuntimeError as e:
        if not (isinstance(e, dist.DistError) or dist.is_initialized() and _PEER_FAILURE.search(str(e))):
            raise
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's source location
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
        raise JobError(f"rank {rank}: a collective failed: another rank is gone, stopped, or kept it waiting past "
                       f"DIST_TIMEOUT_SECONDS={timeout_s:g} ({why})") from None


def write_json(path, obj):
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def sha256_prefix(data):
    return hashlib.sha256(data).hexdigest()[:16]


def file_sha256(path):
    with open(path, "rb") as f:
        return sha256_prefix(f.read())


def on_rank0(fn, run, what):
    """fn() on rank 0 only; its failure stops every rank alike (none is left waiting in a collective)."""
    failure, out = None, None
    if run.rank == 0:
        try:
            out = fn()
        except (ArtifactError, OutputError) as e:
            failure = e
    if not _from_rank0(failure is None, run.world_size, run.device):
        raise failure or OutputError(f"rank 0 could not {what}")
    return out


# ----- data: shards, the training stream, the validation tokens and their bytes

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256


def read_shard_header(path):
    """Check a shard's header and size; return its token count."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    except OSError as e:
        raise DataError(f"cannot read shard {path}: {e.strerror}") from None
    if header.size < SHARD_HEADER_INTS:
        raise DataError(f"shard {path}: truncated header ({size} bytes)")
    if header[0] != SHARD_MAGIC:
        raise DataError(f"shard {path}: bad magic {header[0]} (expected {SHARD_MAGIC})")
    if header[1] != SHARD_VERSION:
        raise DataError(f"shard {path}: unsupported version {header[1]} (expected {SHARD_VERSION})")
    ntok = int(header[2])
    expected = SHARD_HEADER_INTS * 4 + 2 * ntok
    if ntok <= 0 or size != expected:
        raise DataError(f"shard {path}: header says {ntok} tokens ({expected} bytes) but file has {size} bytes")
    return ntok


def load_shard(path, vocab_size):
    """Memory-map a validated shard; check every id < vocab_size."""
    ntok = read_shard_header(path)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_INTS * 4, shape=(ntok,))
    top = int(tokens.max())
    if top >= vocab_size:
        raise DataError(f"shard {path}: token id {top} >= VOCAB_SIZE={vocab_size} (wrong tokenizer/vocab?)")
    return tokens


def find_shards(data_path, split):
    """DATA_PATH/fineweb_<split>_<number>.bin in order (split "val" leaves out the byte sidecar's
    fineweb_val_bytes_*.bin, split "val_bytes")."""
    if not os.path.isdir(data_path):
        raise DataError(f"DATA_PATH {data_path} is not a directory (download the challenge data first)")
    files = sorted(f for f in glob.glob(os.path.join(glob.escape(data_path), f"fineweb_{split}_*.bin"))
                   if re.fullmatch(rf"fineweb_{split}_\d+\.bin", os.path.basename(f)))
    if not files:
        raise DataError(f"no fineweb_{split}_*.bin shards in {data_path}")
    return files


def load_validation_tokens(data_path, vocab_size, limit=0):
    parts = [np.asarray(load_shard(f, vocab_size)) for f in find_shards(data_path, "val")]
    tokens = np.concatenate(parts).astype(np.int64)
    if limit > 0:
        tokens = tokens[: limit + 1]
    if tokens.size < 2:
        raise DataError(f"validation split in {data_path} has fewer than 2 tokens")
    return torch.from_numpy(tokens)


def load_byte_sidecar(data_path, val_tokens, bos_id, limit=0):
    """The validation byte sidecar (DATA_PATH/fineweb_val_bytes_*.bin, shard format): per val token,
    its bytes as the challenge counts them, case markers 0 (tools/caseops_prep.py). One per val token (the count of the val shards),
    0 on every BOS, cut like the val tokens by VAL_TOKENS_LIMIT -> int64 tensor."""
    want = sum(read_shard_header(f) for f in find_shards(data_path, "val"))
    files = find_shards(data_path, "val_bytes")
    counts = np.concatenate([np.asarray(load_shard(f, 65536)) for f in files]).astype(np.int64)
    if counts.size != want:
        raise DataError(f"byte sidecar in {data_path} has {counts.size} counts for {want} validation tokens: "
                        "make the val shards and the sidecar together (tools/caseops_prep.py)")
    counts = torch.from_numpy(counts[:limit + 1] if limit > 0 else counts)
    bad = torch.nonzero((val_tokens == bos_id) & (counts != 0)).flatten()
    if bad.numel():
        raise DataError(f"byte sidecar in {data_path} gives {int(counts[bad[0]])} bytes to the BOS at validation "
                        f"token {int(bad[0])} (a BOS stands for no text): sidecar and val shards do not match")
    return counts


class TokenStream:
    """Train shards in order, one memory-mapped at a time, wrapping around."""

    def __init__(self, files, vocab_size):
        for f in files:
            read_shard_header(f)  # fail early on any bad shard
        self.files, self.vocab_size = files, vocab_size
        self.file_idx, self.pos = 0, 0
        self.tokens = load_shard(files[0], vocab_size)

    def state(self):
        return self.file_idx, self.pos

    def restore(self, state, tokens=None):
        """Back to `state`; `tokens`: its shard, already loaded (by a copy of this stream)."""
        if state[0] != self.file_idx:
            self.tokens = load_shard(self.files[state[0]], self.vocab_size) if tokens is None else tokens
        self.file_idx, self.pos = state

    def _runs(self, n):
        """The next n tokens as (start, count) runs in the current shard, the stream moved past each."""
        while n > 0:
            if self.pos >= len(self.tokens):
                self.restore(((self.file_idx + 1) % len(self.files), 0))
            k = min(n, len(self.tokens) - self.pos)
            yield self.pos, k
            n, self.pos = n - k, self.pos + k

    def take(self, n, out=None):
        """The next n tokens as int64 (into `out`, n int64, if given)."""
        out, got = np.empty(n, dtype=np.int64) if out is None else out, 0
        for start, k in self._runs(n):
            out[got:got + k] = self.tokens[start:start + k]
            got += k
        return out

    def skip(self, n):
        """Past the next n tokens without reading them (another rank's), ending where take(n) would."""
        for _ in self._runs(n):
            pass


def read_rank_span(stream, span, run, pin=False):
    """This rank's `span` tokens of the next chunk of world_size spans (the others' are skipped) ->
    int64 tensor (in pinned memory if `pin`)."""
    stream.skip(run.rank * span)
    mine = torch.empty(span, dtype=torch.int64, pin_memory=pin) if pin else None
    tokens = stream.take(span, None if mine is None else mine.numpy())
    stream.skip((run.world_size - 1 - run.rank) * span)
    return torch.from_numpy(tokens) if mine is None else mine


def _prefetch_thread(device):
    """One thread; on CUDA it pins memory with the rank's GPU current (a new thread's is GPU 0)."""
    if device.type != "cuda":
        return ThreadPoolExecutor(1, "batch-prefetch")
    index = torch.cuda.current_device() if device.index is None else device.index
    return ThreadPoolExecutor(1, "batch-prefetch", torch.cuda.set_device, (index,))


def _read_ahead(stream, span, run, pin):
    """The prefetch thread's work, on its own copy of the stream -> (tokens, end state, its shard)."""
    return read_rank_span(stream, span, run, pin), stream.state(), stream.tokens


class DistributedLoader:
    """All ranks walk one stream, each reading its slice of each chunk. With `prefetch`, a thread reads
    the next micro-batch of the same shape ahead (pinned memory on CUDA); the stream moves only when a
    batch is handed out, so state()/restore() and a change of shape see the batches of the plain path."""

    def __init__(self, files, vocab_size, run, prefetch=False):
        self.stream = TokenStream(files, vocab_size)
        self.run = run
        self._pool = _prefetch_thread(run.device) if prefetch else None
        self._ahead = None  # ((stream state, seqs, seq_len) it was read for, future)

    def next_batch(self, seqs, seq_len):
        span, run = seqs * seq_len + 1, self.run
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == (self.stream.state(), seqs, seq_len):
            mine, end, shard = self._collect(ahead[1])
            self.stream.restore(end, shard)
        else:  # none read ahead, or for another position (a restore) or shape: read here
            mine = read_rank_span(self.stream, span, run)
        if self._pool is not None:
            self._ahead = ((self.stream.state(), seqs, seq_len), self._pool.submit(
                _read_ahead, copy.copy(self.stream), span, run, run.device.type == "cuda"))
        return tuple(t.view(seqs, seq_len).to(run.device, non_blocking=True) for t in (mine[:-1], mine[1:]))

    @staticmethod
    def _collect(future):
        try:
            return future.result()
        except ONE_LINE_ERRORS as e:  # the data's fault: every rank meets it
            raise type(e)(f"reading the next training batch ahead failed: {e}") from e
        except Exception as e:  # this rank's (its memory, its thread): said by it
            raise RankError(f"reading the next training batch ahead failed: {type(e).__name__}: {e}") from e

    def close(self):
        """Ends the prefetch thread (a batch it is reading is finished first)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._ahead = None, None


class ByteLUTs:
    """Bytes of each target from the SentencePiece model's pieces (the challenge's accounting)."""

    def __init__(self, base, space, boundary, markers=()):
        self.base, self.space, self.boundary = base, space, boundary
        self.markers = markers  # the CaseOps markers' ids, where they are pieces of the tokenizer

    @property
    def caseops(self):  # a CaseOps tokenizer: this table would count its markers' bytes
        return bool(self.markers)

    def to(self, device):
        return ByteLUTs(self.base.to(device), self.space.to(device), self.boundary.to(device), self.markers)

    def target_bytes(self, prev, tgt, pos=None):
        """UTF-8 bytes of `tgt`; a leading space counts only after a non-boundary token."""
        return self.base[tgt] + (self.space[tgt] & ~self.boundary[prev]).to(self.base.dtype)


class ByteSidecar:
    """Bytes of each target from the data's byte sidecar, by the target's position in the val tokens
    (CaseOps: the text's bytes without the case markers, which the tokenizer's table would count)."""

    def __init__(self, counts):
        self.counts = counts

    def to(self, device):
        return ByteSidecar(self.counts.to(device))

    def target_bytes(self, prev, tgt, pos):
        return self.counts[pos]


def load_tokenizer_luts(tokenizer_path, vocab_size):
    import sentencepiece as spm
    if not os.path.isfile(tokenizer_path):
        raise DataError(f"tokenizer {tokenizer_path} not found (TOKENIZER_PATH)")
    try:
        sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"tokenizer {tokenizer_path} is not a SentencePiece model: {e}") from None
    if sp.vocab_size() != vocab_size:
        raise DataError(f"tokenizer {tokenizer_path} has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}")
    base = torch.zeros(vocab_size, dtype=torch.int64)
    space, boundary = torch.zeros(vocab_size, dtype=torch.bool), torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(vocab_size):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True  # BOS/EOS/UNK: zero bytes, start a fresh text
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            if piece.startswith("\u2581"):
                space[i], piece = True, piece[1:]
            base[i] = len(piece.encode("utf-8"))
    markers = tuple(sp.piece_to_id(c) for c in (CASE_TITLE, CASE_ALLCAPS, CASE_CAPNEXT, CASE_ESC))
    return ByteLUTs(base, space, boundary, markers if sp.unk_id() not in markers else ())


def has_byte_sidecar(data_path):
    return bool(glob.glob(os.path.join(glob.escape(data_path), "fineweb_val_bytes_*.bin")))


def byte_sidecar_as_given():
    """BYTE_SIDECAR as the user gave it, for messages (the settings hold it resolved: auto -> 0 or 1)."""
    return f"BYTE_SIDECAR={os.environ.get('BYTE_SIDECAR', 'auto')}"


def use_byte_sidecar(args):
    """BYTE_SIDECAR: 1 or 0, or auto: whether DATA_PATH has fineweb_val_bytes_*.bin."""
    return has_byte_sidecar(args.data_path) if args.byte_sidecar == "auto" else args.byte_sidecar == "1"


def load_byte_source(args, val_tokens, luts, sidecar):
    """What counts the bytes of each target -> (the tokenizer's table or the data's byte sidecar,
    a note for the data: line). A CaseOps tokenizer needs the sidecar: its table counts the markers."""
    if not sidecar:
        if luts.caseops:
            raise DataError(f"tokenizer {args.tokenizer_path} is a CaseOps tokenizer: its byte table counts the "
                            "case markers, so it needs the byte sidecar fineweb_val_bytes_*.bin in DATA_PATH "
                            f"({byte_sidecar_as_given()}; tools/caseops_prep.py writes it)")
        return luts, "bytes from the tokenizer's table"
    if not has_byte_sidecar(args.data_path):
        raise DataError(f"BYTE_SIDECAR=1 but {args.data_path} has no fineweb_val_bytes_*.bin (tools/caseops_prep.py "
                        "writes it)")
    counts = load_byte_sidecar(args.data_path, val_tokens, args.bos_id, args.val_tokens_limit)
    table = check_sidecar_against_table(counts, val_tokens, luts, args.data_path)
    sha = sha256_prefix(counts.numpy().astype("<u2").tobytes())
    return ByteSidecar(counts), (f"bytes from the byte sidecar ({int(counts[1:].sum())} bytes, sha256 {sha}; the "
                                 f"tokenizer's table counts {table})")


# The sidecar's total against the tokenizer's table's count of the same tokens: tools/caseops_prep.py's
# sidecar is the table's count less the case markers' bytes, exactly; a sidecar that counts the text
# before the tokenizer's normalizer (collapsed whitespace, NFKC) differs by 0.003 % on FineWeb and
# 0.45 % on the proxy. This margin on either side accepts both and refuses counts that do not belong.
SIDECAR_TABLE_MARGIN = 0.01
# a count above what any piece stands for is a run of whitespace the normalizer collapsed into one
# token (a sidecar of the text before it): rare in real text, so at most this share of the targets
SIDECAR_OVERLONG_SHARE = 0.001


def check_sidecar_against_table(counts, val_tokens, luts, data_path):
    """A sidecar is trusted only as far as the tokenizer's table vouches for it (all zeros trained and
    then divided by zero; counts of 60,000 gave a bpb of 0.00009): its total must lie between the
    table's total less the case markers' bytes and the table's total, within SIDECAR_TABLE_MARGIN,
    and at most SIDECAR_OVERLONG_SHARE of the counts may exceed the most any piece stands for -> the
    table's total."""
    tgt = val_tokens[1:]
    table = luts.target_bytes(val_tokens[:-1], tgt)
    want, total = int(table.sum()), int(counts[1:].sum())
    marks = int(table[torch.isin(tgt, torch.tensor(luts.markers, dtype=tgt.dtype))].sum()) if luts.markers else 0
    lo, hi = (want - marks) * (1 - SIDECAR_TABLE_MARGIN), want * (1 + SIDECAR_TABLE_MARGIN)
    if not lo <= total <= hi:
        between = f"{want - marks} (less the case markers' {marks}) and {want}" if marks else f"{want}"
        raise DataError(f"byte sidecar in {data_path} counts {total} bytes where the tokenizer's table counts "
                        f"{between} for the same tokens (more than {SIDECAR_TABLE_MARGIN:.0%} apart): the sidecar "
                        "does not belong to these shards and this tokenizer")
    most = int((luts.base + luts.space.to(luts.base.dtype)).max())
    over = torch.nonzero(counts > most).flatten()
    if over.numel() > SIDECAR_OVERLONG_SHARE * max(1, counts.numel() - 1):
        raise DataError(f"byte sidecar in {data_path} gives more bytes than any piece of the tokenizer stands for "
                        f"({most}) to {over.numel()} validation tokens (e.g. {int(counts[over[0]])} to token "
                        f"{int(over[0])}; at most {SIDECAR_OVERLONG_SHARE:.1%} may, whitespace runs)")
    return want


def describe_data(args, train_files, val_tokens, bytes_note="bytes from the tokenizer's table"):
    """What the run reads, in one line: DATA_NAME, the train shards, the validation documents and
    tokens with a fingerprint, the tokenizer with its fingerprint, what counts the bytes."""
    name = args.data_name or "unnamed data (DATA_NAME not set)"
    train = (f"{len(train_files)} train shards ({sum(read_shard_header(f) for f in train_files)} tokens), "
             if train_files else "")
    docs = int((val_tokens == args.bos_id).sum())
    val_sha = sha256_prefix(val_tokens.numpy().astype("<u2").tobytes())
    return (f"{name}: {args.data_path}, {train}validation {docs} documents, {val_tokens.numel() - 1} targets "
            f"(sha256 {val_sha}); tokenizer {os.path.basename(args.tokenizer_path)} (sha256 "
            f"{file_sha256(args.tokenizer_path)}); {bytes_note}")


def sample_documents(tokens, bos_id, n):
    """Up to `n` whole documents (the tokens between two BOS), evenly spaced -> [(index, token list)]."""
    starts = np.flatnonzero(tokens == bos_id)
    picks = np.unique(np.linspace(0, len(starts) - 2, n).round().astype(int)) if len(starts) > 1 else []
    return [(int(i), tokens[starts[i] + 1:starts[i + 1]].tolist()) for i in picks]


# Shards made by a tokenizer re-encode to themselves through it: every document of the proxy's CaseOps
# and plain shards did (1,792 each), the other tokenizer's almost none (16 and 0 of 1,792). The
# tolerance keeps one odd document from stopping a run and changes nothing between the two.
REENCODE_SAMPLE, REENCODE_TOLERANCE = (48, 16), 1 / 16  # documents from val and the first train shard


def check_data_fits_tokenizer(args, val_tokens, train_files=()):
    """Before any work: the validation tokens start with a BOS (the challenge's data starts every
    document with one: none is 0 documents scored), and documents decoded and encoded again through
    TOKENIZER_PATH give back their tokens (shards and tokenizer belong together)."""
    import sentencepiece as spm
    val = val_tokens.numpy()
    if val[0] != args.bos_id:
        raise DataError(f"the validation tokens in {args.data_path} start with {int(val[0])}, not BOS_ID={args.bos_id} "
                        "(every document starts with a BOS): wrong BOS_ID, or shards made without BOS")
    docs = [("validation", i, d) for i, d in sample_documents(val, args.bos_id, REENCODE_SAMPLE[0])]
    if train_files:
        head = np.asarray(load_shard(train_files[0], args.vocab_size)[:1 << 20])
        docs += [("train", i, d) for i, d in sample_documents(head, args.bos_id, REENCODE_SAMPLE[1])]
    sp = spm.SentencePieceProcessor(model_file=args.tokenizer_path)
    bad = [(split, i) for split, i, d in docs if sp.encode(sp.decode(d)) != d]
    if len(bad) > REENCODE_TOLERANCE * len(docs):
        raise DataError(f"{len(bad)} of {len(docs)} sampled documents of {args.data_path} (e.g. {bad[0][0]} document "
                        f"{bad[0][1]}) do not re-encode to their tokens through TOKENIZER_PATH={args.tokenizer_path}: "
                        "the shards were made by another tokenizer")


def load_scoring_data(args, run, luts, train_files=()):
    """The validation tokens and what counts their bytes (the tokenizer's table `luts` or the data's
    sidecar), named in the log's data: line -> (tokens and byte source on the device, the data
    line, whether the sidecar counts). Nothing of them reaches training (size_varlen_segments
    runs at evaluation time)."""
    val_tokens = load_validation_tokens(args.data_path, args.vocab_size, args.val_tokens_limit)
    check_data_fits_tokenizer(args, val_tokens, train_files)
    sidecar = use_byte_sidecar(args)
    byte_source, bytes_note = load_byte_source(args, val_tokens, luts, sidecar)
    data = describe_data(args, train_files, val_tokens, bytes_note)
    run.log(f"data: {data}")
    return val_tokens.to(run.device), byte_source.to(run.device), data, sidecar


# ----- CaseOps: capitals as marker characters (tools/caseops_prep.py makes such data)
# Over maximal runs of ASCII letters: all-lower unchanged; all-caps of 2+ letters -> ALLCAPS + lower;
# otherwise TITLE first if the first letter is a capital (a Title word, a single capital), then the
# lower-case letters, each later capital preceded by CAPNEXT. A literal marker character gets ESC.
# The tokenizer has the markers as pieces of their own; caseops_decode inverts it exactly.
CASE_TITLE, CASE_ALLCAPS, CASE_CAPNEXT, CASE_ESC = "\ue001", "\ue002", "\ue003", "\ue004"
# a run that has a capital (the lookbehind starts matches at a run's start only: linear time)
_CASE_WORD = re.compile("(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*|[\ue001-\ue004]")
_CASE_MARK = re.compile("\ue004(.)|\ue002([a-z]+)|[\ue001\ue003]([a-z])", re.S)


def _case_word(m):
    w = m.group()
    if w >= CASE_TITLE:  # a literal marker character
        return CASE_ESC + w
    if w.isupper() and len(w) > 1:
        return CASE_ALLCAPS + w.lower()
    head = CASE_TITLE + w[0].lower() if w[0].isupper() else w[0]
    return head + "".join(CASE_CAPNEXT + c.lower() if c.isupper() else c for c in w[1:])


def caseops_transform(text):
    """The CaseOps text of `text`."""
    return _CASE_WORD.sub(_case_word, text)


def caseops_decode(text):
    """The text caseops_transform was given."""
    return _CASE_MARK.sub(lambda m: m[1] or (m[2] or m[3]).upper(), text)


# ----- model

def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)  # autocast would return fp32


def sdclip_scales(W, clip_sigmas, qmax):
    """SDClip row scales: `clip_sigmas` (<= 0: absmax) x row RMS / qmax, rounded to fp16."""
    W = W.detach().float()
    absmax = not torch.is_tensor(clip_sigmas) and clip_sigmas <= 0
    clip = W.abs().amax(-1) if absmax else clip_sigmas * W.square().mean(-1).sqrt()
    return (clip.clamp_min(1e-8) / qmax).half().clamp_min(6e-8).float()


def fake_quantize_rows(w, bits, clip_sigmas):
    """Late QAT: nearest point of the GPTQ grid (tensor clip: no recompile)."""
    qmax = 2 ** (bits - 1) - 1
    scale = sdclip_scales(w, clip_sigmas, qmax)[..., None].to(w.dtype)
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


# ----- varlen attention: FlashAttention over the rows' tokens packed into one sequence (the rows are
# full length, so packing is a reshape), causal within segments that start at every row start and,
# with DOC_MASK, at every BOS; keys/values keep their Hkv heads (GQA in the kernel)

class VarlenProvider(NamedTuple):
    """A varlen attention kernel, causal within each segment [cu[i], cu[i+1]) of the packed tokens:
    forward(q, k, v, cu_seqlens, max_seqlen, scale) -> (out, lse) and
    backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale) -> (dq, dk, dv), with q, out,
    dout (tokens, H, D), k, v (tokens, Hkv, D), lse (H, tokens) float32 (natural log of each row's
    softmax sum over scale * q.k), cu_seqlens int32."""
    name: str
    forward: Callable
    backward: Callable


def _fa4_provider():
    # flash-attn-4 (CuTe DSL, JIT-compiled): the two calls its flash_attn_varlen_func's
    # autograd.Function makes (flash_attn/cute/interface.py, 4.0.0b36); the forward returns
    # (out, lse, ...) with lse (H, tokens) for varlen, the backward (dq, dk, dv)
    from flash_attn.cute import interface as fa4

    def forward(q, k, v, cu, max_seqlen, scale):
        res = fa4._flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen,
                                  max_seqlen_k=max_seqlen, softmax_scale=scale, causal=True, return_lse=True)
        return res[0], res[1]

    def backward(dout, q, k, v, out, lse, cu, max_seqlen, scale):
        return fa4._flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=scale, causal=True, cu_seqlens_q=cu,
                                   cu_seqlens_k=cu, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)[:3]
    return VarlenProvider("fa4", forward, backward)


def _keyword_call(fn, names):
    """fn called by keyword with `names` (`causal` goes to `is_causal` where that is its name); its
    other parameters without a default get None. FA3 builds order and name these differently."""
    import inspect
    sig = inspect.signature(getattr(fn, "_init_fn", fn))  # _init_fn: the function of a torch custom op
    rename = {"causal": "is_causal"} if "causal" not in sig.parameters else {}
    wanted = {rename.get(n, n) for n in names}
    if not wanted <= set(sig.parameters):
        raise TypeError(f"{fn.__name__}{sig} lacks {sorted(wanted - set(sig.parameters))}")
    fill = {n: None for n, p in sig.parameters.items() if p.default is p.empty and n not in wanted
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return lambda **kw: fn(**fill, **{rename.get(n, n): x for n, x in kw.items()})


def _fa3_provider():
    # FlashAttention-3 (hopper/flash_attn_interface.py): the private forward and backward its
    # flash_attn_varlen_func wraps; the forward returns (out, softmax_lse, ...), the backward
    # writes into dq, dk, dv (what it returns differs between builds)
    import flash_attn_interface as fa3
    fwd = _keyword_call(fa3._flash_attn_forward, ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                                  "max_seqlen_k", "softmax_scale", "causal"))
    bwd = _keyword_call(fa3._flash_attn_backward, ("dout", "q", "k", "v", "out", "softmax_lse", "cu_seqlens_q",
                                                   "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dq", "dk", "dv",
                                                   "softmax_scale", "causal"))

    def forward(q, k, v, cu, max_seqlen, scale):
        res = fwd(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
                  softmax_scale=scale, causal=True)
        return res[0], res[1]

    def backward(dout, q, k, v, out, lse, cu, max_seqlen, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        bwd(dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen, dq=dq, dk=dk, dv=dv, softmax_scale=scale, causal=True)
        return dq, dk, dv
    return VarlenProvider("fa3", forward, backward)


_VARLEN_LOADERS = {"fa3": _fa3_provider, "fa4": _fa4_provider}  # ATTN_BACKEND=auto tries them in this order
_VARLEN_MODULES = {"fa3": "flash_attn_interface (FlashAttention-3)", "fa4": "flash_attn.cute (flash-attn-4)"}
_VARLEN_PROVIDERS = {}  # name -> VarlenProvider, or why it is not usable (str); each loaded once


def varlen_provider(name):
    """The provider `name` (fa3 | fa4), or a str saying why it cannot be used."""
    if name not in _VARLEN_PROVIDERS:
        try:
            _VARLEN_PROVIDERS[name] = _VARLEN_LOADERS[name]()
        except Exception as e:  # noqa: BLE001 - not installed, or a build without the calls we make
            _VARLEN_PROVIDERS[name] = f"{type(e).__name__}: {e}"
    return _VARLEN_PROVIDERS[name]


def need_varlen_provider(name):
    provider = varlen_provider(name)
    if isinstance(provider, str):
        raise ConfigError(f"ATTN_BACKEND={name} but {_VARLEN_MODULES[name]} is not usable: {provider}")
    return provider


_VARLEN_KERNELS = {}  # provider name -> VarlenProvider: what the ops call (see register_varlen_kernel)


def register_varlen_kernel(provider):
    """Make `provider` the kernel the varlen ops run under its name (a later one of the same name
    replaces it) -> the name. The ops take the name, not the provider: torch.compile keeps them as
    single nodes of one graph."""
    _VARLEN_KERNELS[provider.name] = provider
    return provider.name


def _kernel(name):
    if name not in _VARLEN_KERNELS:
        raise RuntimeError(f"varlen attention without a provider: no kernel {name!r} is registered")
    return _VARLEN_KERNELS[name]


def _checked(kernel, what, got, want):
    """`got` tensors of the provider have the (shape, dtype) of `want`, else a clear error."""
    for i, (t, (shape, dtype)) in enumerate(zip(got, want)):
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise RuntimeError(f"varlen attention provider {kernel}: {what} output {i} is "
                               f"{tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
    return tuple(t.contiguous() for t in got)  # the fake kernels promise contiguous outputs


# custom ops: torch.compile keeps them as single nodes (dynamo cannot trace FA4's CuTe launcher),
# so the compiled model stays one graph, and nothing in them syncs with the host (CUDA graphs)
@torch.library.custom_op("pgolf::varlen_attention", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, str kernel) "
                                "-> (Tensor, Tensor)")
def _varlen_fwd(q, k, v, cu_seqlens, max_seqlen, kernel):
    got = _kernel(kernel).forward(q, k, v, cu_seqlens, max_seqlen, q.size(-1) ** -0.5)
    N, H, _ = q.shape
    return _checked(kernel, "forward", got, ((q.shape, q.dtype), ((H, N), torch.float32)))


@_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, kernel):
    return q.new_empty(q.shape), q.new_empty((q.size(1), q.size(0)), dtype=torch.float32)


@torch.library.custom_op("pgolf::varlen_attention_backward", mutates_args=(),
                         schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                                "Tensor cu_seqlens, int max_seqlen, str kernel) -> (Tensor, Tensor, Tensor)")
def _varlen_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, kernel):
    got = _kernel(kernel).backward(dout.contiguous(), q, k, v, out, lse, cu_seqlens, max_seqlen, q.size(-1) ** -0.5)
    return _checked(kernel, "backward", got, tuple((t.shape, t.dtype) for t in (q, k, v)))


@_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, kernel):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, ctx.max_seqlen, ctx.kernel = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)


def _varlen_backward(ctx, dout, dlse):  # lse only feeds the backward: dlse is ignored
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    return (*_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.kernel), None, None, None)


_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, kernel):
    """q (tokens,H,D), k, v (tokens,Hkv,D) -> (tokens,H,D): causal attention within each segment
    [cu_seqlens[i], cu_seqlens[i+1]) (at most `max_seqlen` long), by the registered provider `kernel`."""
    return _varlen_fwd(q, k, v, cu_seqlens, max_seqlen, kernel)[0]


# The kernels launch blocks for every segment of cu_seqlens, empty or not: FA4's varlen scheduler
# runs (tokens + segments x (tile_m - 1)) / tile_m blocks per head, so B*T segments (room for a
# BOS at every token) would launch ~tile_m times the blocks needed. The fixed size is instead
# B + max(B*T / VARLEN_MIN_MEAN_TOKENS, B x bos_per_row, VARLEN_MIN_EXTRA) segments
# (varlen_capacity). Training's bos_per_row is 0, whatever the validation data: a training batch
# denser than that (a mean under 128 tokens per document) loses its last splits. Scoring's is the
# most BOS any validation window holds, set at evaluation time (size_varlen_segments): it never
# drops a document start; TTT's global pass makes room for its own rows (VarlenAttention.room_for)
VARLEN_MIN_MEAN_TOKENS, VARLEN_MIN_EXTRA = 128, 256


def varlen_capacity(B, T, bos_per_row=0):
    """Segments in the buffer of B rows of T tokens with room for `bos_per_row` document starts per row."""
    N = B * T
    return min(N, B + max(N // VARLEN_MIN_MEAN_TOKENS, B * bos_per_row, VARLEN_MIN_EXTRA))


def most_document_starts(tokens, bos_id, window):
    """The most BOS any `window` consecutive tokens of `tokens` hold."""
    counts = torch.cat([torch.zeros(1, dtype=torch.int64), (tokens == bos_id).to(torch.int64).cumsum(0)])
    n = min(window, tokens.numel())
    return int((counts[n:] - counts[:-n]).max())


def varlen_segments(ids, bos_id, doc_mask, max_segments=None):
    """int32 (max_segments + 1,) starts of the segments of the packed rows `ids` (B,T): every row
    start and (doc_mask) every BOS, then the total B*T repeated (empty segments). Built on the
    device without a host sync (fixed size). Beyond `max_segments` (default: varlen_capacity with
    no room asked for), the last BOS starts are dropped, never a row start: those documents
    then see the previous one of their row, as without DOC_MASK."""
    B, T = ids.shape
    N = B * T
    if not doc_mask:
        return torch.arange(0, N + 1, T, dtype=torch.int32, device=ids.device)
    if max_segments is None:
        max_segments = varlen_capacity(B, T)
    if not B <= max_segments <= N:
        raise ValueError(f"max_segments={max_segments} must be in {B}..{N} (rows..tokens)")
    pos = torch.arange(N, device=ids.device)
    row_start = pos % T == 0
    bos = (ids.reshape(-1) == bos_id) & ~row_start
    keep = row_start | (bos & (torch.cumsum(bos, 0) <= max_segments - B))
    # the k-th kept start goes to slot k; the others all write the total into the last slot,
    # which holds it anyway (so the duplicate writes agree)
    slot = torch.where(keep, torch.cumsum(keep, 0) - 1, max_segments)
    cu = torch.full((max_segments + 1,), N, dtype=torch.int32, device=ids.device)
    return cu.scatter(0, slot, torch.where(keep, pos, N).to(torch.int32))


class VarlenMask(NamedTuple):
    """The mask of the varlen backends: segment starts (varlen_segments) and the row length."""
    cu_seqlens: torch.Tensor
    max_seqlen: int


def varlen_self_check(provider, device):
    """None if `provider` computes a small two-document causal attention (GQA) and its gradients as
    plain math does on `device`, else why not: an FA build whose private calls take or return other
    things than the ones made here is found at start, not mid-run."""
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(256, h, 64, device=device, dtype=dtype, generator=g) for h in (4, 2, 2))
    dout = torch.randn_like(q)
    cu = torch.tensor([0, 100, 256], dtype=torch.int32, device=device)
    pos = torch.arange(256, device=device)
    doc = (pos >= 100).int()
    mask = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    qh, kh, vh = ref[0].transpose(0, 1), *(t.repeat_interleave(2, 1).transpose(0, 1) for t in ref[1:])
    want_out = _math_attention(qh, kh, vh, mask).transpose(0, 1)
    want_out.backward(dout.float())
    try:
        out, lse = provider.forward(q, k, v, cu, 256, 64 ** -0.5)
        got = (out, *provider.backward(dout, q, k, v, out, lse, cu, 256, 64 ** -0.5))
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, (want_out.detach(), *(t.grad for t in ref))):
        err = float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)) if a.shape == b.shape else math.inf
        if not err <= 0.05:  # bf16 kernels: ~1 %; a wrong layout or call: ~100 %
            return f"its {what} differs from math attention's by {err:.3g} of its largest value"
    return None


def choose_attention(name, device, doc_mask=False):
    """ATTN_BACKEND resolved for `device` -> (the attention the model holds, its description for the
    log): varlen:fa3, varlen:fa4 (FA3 or FA4 over the packed segments, with or without document
    masking, after a self-check on the device), flex, sdpa or math (CPU); with auto, why a
    provider was passed over."""
    provider = need_varlen_provider(name) if name in _VARLEN_LOADERS else None  # on CPU too: a clear error
    passed_over = []
    if device.type != "cuda":
        name, provider = "math", None
    elif name == "auto":
        for candidate in _VARLEN_LOADERS:
            provider = varlen_provider(candidate)
            why = provider if isinstance(provider, str) else varlen_self_check(provider, device)
            if why is None:
                break
            if not isinstance(provider, str):  # importable but wrong: say so
                passed_over.append(f"{candidate} failed its self-check: {why}")
            provider = None
        if provider is None:
            name = "flex" if doc_mask else "sdpa"
    elif provider is not None:
        why = varlen_self_check(provider, device)
        if why is not None:
            raise ConfigError(f"ATTN_BACKEND={name}: {_VARLEN_MODULES[name]} failed its self-check: {why}")
    if name == "flex" and flex_attention is None:
        raise ConfigError("ATTN_BACKEND=flex but torch.nn.attention.flex_attention is not available")
    attention = VarlenAttention(provider) if provider is not None else ATTENTIONS[name]()
    return attention, attention.name + (f" ({'; '.join(passed_over)})" if passed_over else "")


def document_mask(ids, bos_id):
    """(B,1,T,T) bool: causal, and no token of rows `ids` sees one before its document's BOS."""
    T = ids.size(1)
    doc = torch.cumsum((ids == bos_id).int(), dim=1)
    causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


class Attention:
    """Causal attention, the model's choice of kernel: __call__(q, k, v, mask) with q (B,T,H,D), k, v
    (B,T,Hkv,D) (GQA) -> (B,T,H,D); mask(ids, bos_id, doc_mask) builds the mask of rows `ids` for it.
    The base masks: None (plain causal) or, with DOC_MASK, the dense document_mask; a dense mask
    also comes from TTT's cache (queries offset into cached keys). One subclass per kernel, named
    in ATTENTIONS (ATTN_BACKEND) or built by choose_attention (varlen)."""

    def mask(self, ids, bos_id, doc_mask):
        return document_mask(ids, bos_id) if doc_mask else None

    def room_for(self, rows, bos_id):
        """A context in which batches as dense in documents as `rows` keep every document start."""
        return contextlib.nullcontext()


class MathAttention(Attention):
    """Plain matrix products, KV heads repeated: CPU, and the reference."""
    name = "math"

    def __call__(self, q, k, v, mask=None):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return _math_attention(q, k, v, mask).transpose(1, 2)


class SdpaAttention(Attention):
    """PyTorch's scaled_dot_product_attention."""
    name = "sdpa"

    def __call__(self, q, k, v, mask=None):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # masked SDPA with grad (TTT): repeat KV heads, or GQA falls back to math
        gqa = mask is None or not torch.is_grad_enabled()
        if not gqa:
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return out.transpose(1, 2)


class FlexAttention(SdpaAttention):
    """FlexAttention with a block mask (skips fully masked blocks) in compiled training only: it
    crashed in inference on H200 and is slow uncompiled; elsewhere SDPA with the dense mask."""
    name = "flex"

    def mask(self, ids, bos_id, doc_mask):
        if not (torch.is_grad_enabled() and torch.compiler.is_compiling()):
            return super().mask(ids, bos_id, doc_mask)
        B, T = ids.shape
        doc = torch.cumsum((ids == bos_id).int(), dim=1) if doc_mask else torch.zeros_like(ids, dtype=torch.int32)

        def same_doc_causal(b, h, q, kv):
            return (q >= kv) & (doc[b, q] == doc[b, kv])
        return create_block_mask(same_doc_causal, B, None, T, T, device=ids.device)

    def __call__(self, q, k, v, mask=None):
        if mask is None or isinstance(mask, torch.Tensor):
            return super().__call__(q, k, v, mask)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=True).transpose(1, 2)


class VarlenAttention(SdpaAttention):
    """A FlashAttention varlen kernel (`provider`, a VarlenProvider) over the rows packed into one
    sequence: its mask is a VarlenMask, whose buffer has room for `bos_per_row` document starts per
    row (varlen_capacity; 0: training's, whatever the validation data holds). Other masks (TTT's
    chunks over their cache) go to SDPA."""

    def __init__(self, provider, bos_per_row=0):
        self.kernel = register_varlen_kernel(provider)
        self.name = "varlen:" + provider.name
        self.bos_per_row = bos_per_row

    def mask(self, ids, bos_id, doc_mask):
        B, T = ids.shape
        return VarlenMask(varlen_segments(ids, bos_id, doc_mask, varlen_capacity(B, T, self.bos_per_row)), T)

    def __call__(self, q, k, v, mask=None):
        if not isinstance(mask, VarlenMask):
            return super().__call__(q, k, v, mask)
        B, T, H, D = q.shape
        q, k, v = (t.reshape(B * T, *t.shape[2:]).contiguous() for t in (q, k, v))  # v may be a view of qkv
        return varlen_attention(q, k, v, mask.cu_seqlens, mask.max_seqlen, self.kernel).view(B, T, H, D)

    def size_for(self, tokens, bos_id, window):
        """Room for as many document starts per row as any `window` of `tokens` holds, so that no
        batch of its windows drops one -> that count."""
        self.bos_per_row = most_document_starts(tokens, bos_id, window)
        return self.bos_per_row

    @contextlib.contextmanager
    def room_for(self, rows, bos_id):
        """Inside: room for as many document starts per row as any of `rows` holds."""
        saved = self.bos_per_row
        if rows.numel():
            self.bos_per_row = max(saved, int((rows[:, 1:] == bos_id).sum(1).max()))
        try:
            yield
        finally:
            self.bos_per_row = saved


ATTENTIONS = {"math": MathAttention, "sdpa": SdpaAttention, "flex": FlexAttention}  # ATTN_BACKEND -> kernel


def _math_attention(q, k, v, mask=None):
    att = (q @ k.transpose(-1, -2)) * (q.size(-1) ** -0.5)
    if mask is None:  # equal lengths: a cache always comes with its mask
        mask = q.new_ones(q.size(-2), k.size(-2), dtype=torch.bool).tril()
    att = att.masked_fill(~mask, float("-inf"))
    return att.float().softmax(-1).to(v.dtype) @ v


class Rotary(nn.Module):
    """Partial RoPE of each head's first `dims` dims (half-split pairs)."""

    def __init__(self, dims, base, max_len):
        super().__init__()
        self.dims = dims
        inv = 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float32) / max(dims, 1)))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x, start=0):  # x: (B,T,H,D) at positions start..
        if self.dims == 0:
            return x
        T, half = x.size(1), self.dims // 2
        cos, sin = self.cos[start:start + T, None, :].to(x.dtype), self.sin[start:start + T, None, :].to(x.dtype)
        x1, x2, rest = x[..., :half], x[..., half:self.dims], x[..., self.dims:]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest), dim=-1)


class LayerWeights(NamedTuple):
    """One layer's matrices: views of its rows of the GPT's banks (GPT.layer_weights)."""
    q: torch.Tensor  # (MODEL_DIM, MODEL_DIM)
    k: torch.Tensor  # (NUM_KV_HEADS x head dim, MODEL_DIM)
    v: torch.Tensor
    out: torch.Tensor  # (MODEL_DIM, MODEL_DIM)
    up: torch.Tensor  # (MLP hidden, MODEL_DIM)
    down: torch.Tensor  # (MODEL_DIM, MLP hidden)


class LayerContext(NamedTuple):
    """What every layer takes from its model: the rotary embedding, the attention, and the hooks
    capture(layer, kind, x) (GPTQ's Hessians) and adapt(layer, kind, x, y) -> y (TTT's adapters)."""
    rotary: nn.Module
    attention: Attention
    capture: Callable
    adapt: Callable


class Block(nn.Module):
    """A transformer layer; its matrices live in the GPT's banks."""

    def __init__(self, args, layer):
        super().__init__()
        d = args.model_dim
        self.layer = layer
        self.heads = (args.num_heads, args.num_kv_heads, args.head_dim)  # H, Hkv, D
        self.leaky_slope = args.leaky_slope
        self.ln_scale = 1.0 / math.sqrt(layer + 1)
        self.use_xsa = args.xsa_layers < 0 or layer >= args.num_layers - args.xsa_layers
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        self.q_gain = nn.Parameter(torch.full((args.num_heads,), args.qk_gain_init))
        self.parallel = layer >= args.parallel_from
        if args.attn_gate_width > 0:  # zero init: every head's gate starts at 1
            self.attn_gate = nn.Parameter(torch.zeros(args.num_heads, args.attn_gate_width))
        if args.xsa_gate and self.use_xsa:  # alpha per head, zero init: gate 1 + tanh(0) = 1 is plain XSA
            self.xsa_gate = nn.Parameter(torch.zeros(args.num_heads))

    def forward(self, x, x0, w, ctx, mask, cache=None, slot=0):
        """-> new residual stream, MLP output. `w`: this layer's LayerWeights; `ctx`: the model's
        LayerContext; `mask`: from ctx.attention; `cache` (TTT): earlier keys/values per layer pass `slot`."""
        a = self.layer
        B, T, _ = x.shape
        H, Hkv, D = self.heads
        mix = self.resid_mix.to(x.dtype)
        x_in = mix[0] * x + mix[1] * x0
        h = rms_norm(x_in) * self.ln_scale
        ctx.capture(a, "qkv", h)
        # one GEMM for q, k, v (and one for its gradient)
        qkv = ctx.adapt(a, "qkv", h, F.linear(h, torch.cat((w.q, w.k, w.v))))
        q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        q, k, v_own = rms_norm(q), rms_norm(k), v
        if cache is not None:  # cached pre-RoPE: window positions from 0
            k, v = cache.extend(slot, k, v)
        q, k = ctx.rotary(q, k.size(1) - T), ctx.rotary(k)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        q, k = q.to(v.dtype), k.to(v.dtype)  # rms_norm may run in fp32 under autocast
        y = ctx.attention(q, k, v, mask)
        if self.use_xsa:  # remove each head's component along its own token's value
            yg = y.view(B, T, Hkv, H // Hkv, D)
            vh = F.normalize(v_own.float(), dim=-1).to(y.dtype).unsqueeze(3)
            own = (yg * vh).sum(-1, keepdim=True)
            if hasattr(self, "xsa_gate"):  # head h = kv head h // (H / Hkv), its (h % (H / Hkv))th query
                own = own * (1 + torch.tanh(self.xsa_gate)).to(y.dtype).view(Hkv, H // Hkv, 1)
            y = (yg - own * vh).view(B, T, H, D)
        if hasattr(self, "attn_gate"):  # per-head gate in (0, 2)
            gate = 2 * torch.sigmoid(0.5 * F.linear(h[..., :self.attn_gate.size(1)], self.attn_gate.to(h.dtype)))
            y = y * gate[..., None].to(y.dtype)
        y = y.reshape(B, T, H * D)
        ctx.capture(a, "out", y)
        # scales act on the weight rows: cheaper gradient than on activations
        x = x_in + ctx.adapt(a, "out", y, F.linear(y, w.out * self.attn_scale[:, None]))
        if not self.parallel:  # parallel layers: the MLP reads the attention's input
            h = rms_norm(x) * self.ln_scale
        ctx.capture(a, "up", h)
        u = F.leaky_relu(ctx.adapt(a, "up", h, F.linear(h, w.up)), self.leaky_slope).square()
        ctx.capture(a, "down", u)
        m = ctx.adapt(a, "down", u, F.linear(u, w.down * self.mlp_scale[:, None]))
        return x + m, m


class GPT(nn.Module):
    """The language model. Each feature, its setting and where it lives:
    - matrices in four banks (q/out, k/v, MLP up, MLP down; `banks`), for parallel Muon and GPTQ
      by bank row; MODEL_DIM, NUM_LAYERS, NUM_HEADS / NUM_KV_HEADS (GQA), MLP_MULT;
    - input: token embedding (tied with the head), RMSNorm, SmearGate, not across a BOS (`embed`);
    - attention (`Block.forward`): q/k RMSNorm, partial RoPE (ROPE_DIMS), per-head q gain
      (QK_GAIN_INIT), document masking (DOC_MASK), XSA (XSA_LAYERS; gated per head: XSA_GATE), a
      per-head output gate (ATTN_GATE_WIDTH); its kernel (`attention`, ATTN_BACKEND: choose_attention);
    - MLP: LeakyReLU(LEAKY_SLOPE)^2; layers from PARALLEL_FROM run it beside the attention, their
      outputs summed into one lane (`lane_mix`);
    - U-Net skips between the two halves, through sigmoid gates (SKIP_GATES; `hidden`);
    - depth recurrence: RECUR_LAYERS run 1 + RECUR_PASSES times once on (`layer_order`);
    - head: tied, softcapped logits (LOGIT_SOFTCAP; `logits_from_hidden`);
    - late QAT: straight-through fake quantization of the banks on the GPTQ grid (`_bank_weights`);
    - TTT: per-document LoRA adapters (`adapt`) and a key/value cache of earlier chunks (`cache`)."""

    def __init__(self, args, attention=None, max_len=2048, init_std=0.005, qat_clip=6.5):
        """`args`: the model part of the settings (ModelSettings: what the artifact's header holds);
        `max_len`: the longest sequence it will see (RoPE's table); `init_std`: the embedding's
        initial spread; `qat_clip`: late QAT's first grid clip."""
        super().__init__()
        self.args = a = args
        self.attention = attention if attention is not None else MathAttention()  # no module: the state_dict is the same
        d, L, kv = a.model_dim, a.num_layers, a.num_kv_heads * a.head_dim
        self.tok_emb = nn.Embedding(a.vocab_size, d)
        nn.init.normal_(self.tok_emb.weight, std=init_std)
        # banks: qo = [q_0..q_{L-1}, out_0..out_{L-1}], kv = [k_0.., v_0..]
        self.qo_bank = nn.Parameter(torch.empty(2 * L, d, d))
        self.kv_bank = nn.Parameter(torch.empty(2 * L, kv, d))
        self.up_bank = nn.Parameter(torch.empty(L, a.mlp_hidden, d))
        self.down_bank = nn.Parameter(torch.zeros(L, d, a.mlp_hidden))
        for i in range(L):
            for m in (self.qo_bank[i], self.kv_bank[i], self.kv_bank[L + i], self.up_bank[i]):
                nn.init.orthogonal_(m.data)
        self.qo_bank.data[L:].zero_()  # output projections start at zero
        self.blocks = nn.ModuleList(Block(a, l) for l in range(L))
        self.num_enc = L // 2
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_enc, L - self.num_enc), d))
        if a.skip_gates:  # per channel share of the stream the skip replaces
            self.skip_gates = nn.Parameter(torch.zeros_like(self.skip_weights))
        if a.parallel_from < L:  # stream + lane_mix * (sum of parallel MLP outputs)
            self.lane_mix = nn.Parameter(torch.zeros(d))
        self.recur_layers = a.recur_layer_list()
        # evaluation runs the recurrence; training turns it on late
        self.recurrence_active = bool(self.recur_layers)
        self.smear_w = nn.Parameter(torch.zeros(d))
        self.rotary = Rotary(a.rope_dims, a.rope_base, max_len)
        self.register_buffer("qat_mix", torch.zeros(()), persistent=False)
        self.register_buffer("qat_clip", torch.tensor(float(qat_clip)), persistent=False)
        self._capture = None
        self.adapters = None  # TTT's per-document LoRA

    def adapt(self, layer, kind, x, y):
        return y if self.adapters is None else y + self.adapters(layer, kind, x)

    def banks(self):
        return {"qo": self.qo_bank, "kv": self.kv_bank, "up": self.up_bank, "down": self.down_bank}

    def layer_weights(self, w, layer):
        """Layer `layer`'s matrices from the banks `w` (banks() or their QAT copies)."""
        L = self.args.num_layers
        return LayerWeights(w["qo"][layer], w["kv"][layer], w["kv"][L + layer], w["qo"][L + layer], w["up"][layer],
                            w["down"][layer])

    def capture(self, layer, kind, x):
        if self._capture is not None:
            self._capture(layer, kind, x)

    def _bank_weights(self):
        w = self.banks()
        if not (torch.is_grad_enabled() and self.training):
            return w
        # late QAT: straight-through fake quantization (tensor switch: no recompile)
        return {k: t + self.qat_mix * (fake_quantize_rows(t, self.args.quant_bits, self.qat_clip) - t).detach()
                for k, t in w.items()}

    def embed(self, ids, prev=None):
        """Token embedding, RMSNorm, SmearGate; nothing crosses a BOS. `prev`: tokens before `ids`
        (TTT chunks) for the first position's smear."""
        if prev is not None:
            return self.embed(torch.cat((prev, ids), 1))[:, prev.size(1):]
        a = self.args
        x = self.tok_emb(ids)
        is_bos = ids == a.bos_id
        x = rms_norm(x)
        x_prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        g = torch.sigmoid(self.smear_w).to(x.dtype) * (~is_bos).unsqueeze(-1).to(x.dtype)
        return x + g * (x_prev - x)

    def layer_order(self):
        """Layers in run order (with recurrence on, the RECUR_LAYERS block repeats)."""
        order = list(range(self.args.num_layers))
        if self.recurrence_active and self.recur_layers:
            end = self.recur_layers[-1] + 1
            order = order[:end] + self.recur_layers * self.args.recur_passes + order[end:]
        return order

    def hidden(self, ids, cache=None):
        prev, mask = (None, None) if cache is None else cache.chunk(ids)
        x = self.embed(ids, prev)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x0 = x
        w = self._bank_weights()
        if cache is None:
            mask = self.attention.mask(ids, self.args.bos_id, self.args.doc_mask)
        ctx = LayerContext(self.rotary, self.attention, self.capture, self.adapt)
        order = self.layer_order()
        last_pass = {l: i for i, l in enumerate(order)}
        skips, lane = [], None
        for i, l in enumerate(order):
            final = last_pass[l] == i  # U-Net skips pair the layers' last passes
            if final and l >= self.num_enc and skips:
                j = l - self.num_enc
                skip = self.skip_weights[j].to(x.dtype) * skips.pop()
                if hasattr(self, "skip_gates"):
                    x = torch.lerp(x, skip, torch.sigmoid(self.skip_gates[j]).to(x.dtype))
                else:
                    x = x + skip
            x, m = self.blocks[l](x, x0, self.layer_weights(w, l), ctx, mask, cache, i)
            if self.blocks[l].parallel:
                lane = m if lane is None else lane + m
            if final and l < self.num_enc:
                skips.append(x)
        if lane is not None:
            x = x + self.lane_mix.to(x.dtype) * lane
        return rms_norm(x)

    def logits_from_hidden(self, h):
        logits = self.adapt(-1, "head", h, F.linear(h, self.tok_emb.weight)).float()
        c = self.args.logit_softcap
        return c * torch.tanh(logits / c) if c > 0 else logits

    def forward(self, ids, targets=None, reduction="mean", cache=None):
        """Logits; with `targets`, their cross entropy (the scorers tilt the logits: `target_nll`)."""
        logits = self.logits_from_hidden(self.hidden(ids, cache))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
        return loss if reduction == "mean" else loss.view(targets.shape)

    def param_groups(self):
        """Muon banks, the embedding table, gains."""
        banks = list(self.banks().values())
        named = dict(self.named_parameters())
        tables = [named[n] for n in EMBED_TABLES]
        taken = {id(p) for p in banks + tables}
        scalars = [p for p in self.parameters() if id(p) not in taken]
        return banks, tables, scalars


def build_model(args, device, attention=None):
    """The seeded model on `device`, holding `attention` (default: ATTN_BACKEND's for `device`, math on CPU)."""
    if attention is None:
        attention = choose_attention(args.attn_backend, device, args.doc_mask)[0]
    torch.manual_seed(args.seed)
    return GPT(args.model, attention, max(args.longest_train_seq, args.eval_seq_len, args.gptq_calib_len),
               args.tied_embed_init_std, args.clip_sigmas).to(device)


# ----- optimizer: parallel Muon on the banks, AdamW for the rest

# Polar Express: the minimax odd quintic of each iteration (tools/polar_express.py)
POLAR_EXPRESS_COEFFS = ((8.386464162225812, -24.36964994371728, 17.725116517530434),
                        (4.142307386676976, -3.0181404252012447, 0.5525975307690401),
                        (3.9285939967086696, -2.872330367692898, 0.5365258516486148),
                        (3.276250648937841, -2.4117831443389117, 0.4860086014020963),
                        (2.301824959283198, -1.676277824901709, 0.42295236416328996))


def ns_coeffs(args):
    c = POLAR_EXPRESS_COEFFS
    return tuple(c[min(i, len(c) - 1)] for i in range(args.muon_ns_steps))


def newton_schulz(G, coeffs=POLAR_EXPRESS_COEFFS, dtype=torch.bfloat16):
    """Approximately orthogonalize a batch of matrices: a quintic per (a, b, c) of `coeffs`."""
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in coeffs:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if transposed else X


def reduce_scatter_avg(full, shard_rows):
    """Start averaging `full` over ranks; the waiter yields this rank's shard."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if _is_nccl():
        out = full.new_empty((shard_rows,) + tuple(full.shape[1:]))
        work = dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.AVG, async_op=True)
        return lambda: (work.wait(), out)[1]
    work = dist.all_reduce(full, async_op=True)
    return lambda: (work.wait(), full[rank * shard_rows:(rank + 1) * shard_rows].div_(world))[1]


def all_gather_rows(shard):
    """Start gathering all ranks' shards along dim 0; returns a waiter."""
    world = dist.get_world_size()
    if _is_nccl():
        out = shard.new_empty((shard.size(0) * world,) + tuple(shard.shape[1:]))
        work = dist.all_gather_into_tensor(out, shard.contiguous(), async_op=True)
        return lambda: (work.wait(), out)[1]
    parts = [torch.empty_like(shard) for _ in range(world)]
    work = dist.all_gather(parts, shard.contiguous(), async_op=True)
    return lambda: (work.wait(), torch.cat(parts))[1]


class ParallelMuon:
    """Muon on 3-D banks, sharded over ranks along the layer axis."""

    def __init__(self, banks, lr, weight_decay, coeffs, world_size, ns_fn=newton_schulz, row_norm=False):
        self.banks = sorted(banks, key=lambda p: -p.numel())  # longest comm first
        self.lr, self.weight_decay, self.coeffs, self.momentum = lr, weight_decay, coeffs, 0.95
        self.world, self.ns_fn, self.row_norm = world_size, ns_fn, row_norm
        self.state = {}
        for p in self.banks:
            n, r, c = p.shape
            shard = -(-n // world_size)
            self.state[p] = {"rows": shard * world_size, "shard": shard, "scale": math.sqrt(max(1.0, r / c)),
                             "buf": p.new_zeros((shard, r, c), dtype=torch.float32)}

    def reset(self):
        for st in self.state.values():
            st["buf"].zero_()

    def launch_grad_sync(self):
        self._waiters = []
        for p in self.banks:
            st, g = self.state[p], p.grad
            if self.world == 1:
                self._waiters.append(lambda g=g: g)
                continue
            full = g.new_zeros((st["rows"],) + tuple(g.shape[1:]))
            full[: g.size(0)].copy_(g)
            self._waiters.append(reduce_scatter_avg(full, st["shard"]))

    def wait_grad_sync(self):
        self._shards = [w() for w in self._waiters]
        return self._shards

    @torch.no_grad()
    def step(self, clip_coef=1.0):
        """`clip_coef`: a float, or a device tensor (clip_coefficient's: applied even where it is 1)."""
        mu, lr, wd = self.momentum, self.lr, self.weight_decay
        pending = []
        for p, g in zip(self.banks, self._shards):
            st = self.state[p]
            if torch.is_tensor(clip_coef) or clip_coef != 1.0:
                g = g * clip_coef
            buf = st["buf"]
            buf.mul_(mu).add_(g)
            u = g.add(buf, alpha=mu)
            if self.row_norm:  # MuonEq-R
                u = u / (u.norm(dim=-1, keepdim=True) + 1e-7)
            update = self.ns_fn(u, self.coeffs) * st["scale"]
            pending.append((p, all_gather_rows(update) if self.world > 1 else (lambda u=update: u)))
        for p, wait in pending:  # gathers overlap later Newton-Schulz
            update = wait()[: p.size(0)]
            p.mul_(1.0 - lr * wd).add_(update.to(p.dtype), alpha=-lr)
        self._shards = None


def clip_coefficient(norm, clip):
    """clip / (norm + 1e-6) where the float32 `norm` > clip, else 1, computed on norm's device (no
    wait for the host) in float64 as Python did with float(norm), then float32 as the kernels round a
    Python scalar for float32 gradients: the same bits, and x * 1 is x."""
    n = norm.double()
    return torch.where(n > clip, torch.full_like(n, clip) / (n + 1e-6), 1.0).float()


def flat_all_reduce_avg(tensors):
    """Average small tensors over ranks in one flat buffer; returns a waiter."""
    if not _multi() or not tensors:
        return lambda: None
    flat = torch.cat([t.reshape(-1) for t in tensors])
    work = dist.all_reduce(flat, async_op=True)

    def finish():
        work.wait()
        flat.div_(dist.get_world_size())
        off = 0
        for t in tensors:
            t.copy_(flat[off:off + t.numel()].view_as(t))
            off += t.numel()
    return finish


class Optimizers:
    """Muon for banks + AdamW for the rest; gradient sync and clipping."""

    def __init__(self, model, args, world_size, device):
        banks, tables, scalars = model.param_groups()
        self.args = args
        ns_fn = torch.compile(newton_schulz) if _use_compile(args, device) else newton_schulz
        self.muon = ParallelMuon(banks, args.matrix_lr, args.muon_wd, ns_coeffs(args), world_size, ns_fn, args.muon_row_norm)
        groups = [{"params": tables, "lr": args.embed_lr, "weight_decay": args.embed_wd},
                  # gains, gates, mixes: no decay (it pulls them to 0)
                  {"params": scalars, "lr": args.scalar_lr, "weight_decay": 0.0}]
        groups = [dict(g, base_lr=g["lr"]) for g in groups if g["params"]]
        self.adam = torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                                      fused=device.type == "cuda")
        self.other_params = [p for g in groups for p in g["params"]]

    def set_schedule(self, lr_scale, momentum):
        """Learning rates x lr_scale; Muon's momentum (both the schedule's: schedule_at)."""
        for g in self.adam.param_groups:
            g["lr"] = g["base_lr"] * lr_scale
        self.muon.lr = self.args.matrix_lr * lr_scale
        self.muon.momentum = momentum

    def step(self):
        """Sync, clip by global norm, step both; returns the norm (a float32 tensor on the device: read it
        with the loss, one wait per step)."""
        for p in self.other_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.muon.launch_grad_sync()
        finish_small = flat_all_reduce_avg([p.grad for p in self.other_params])
        shards = self.muon.wait_grad_sync()
        finish_small()
        bank_sq = _all_reduce_sum(torch.stack([s.float().square().sum() for s in shards]).sum())  # disjoint shards
        small_sq = sum(p.grad.float().square().sum() for p in self.other_params)
        norm = torch.sqrt(bank_sq + small_sq)
        coef = 1.0
        if self.args.grad_clip_norm > 0:
            coef = clip_coefficient(norm, self.args.grad_clip_norm)
            torch._foreach_mul_([p.grad for p in self.other_params], coef)
        self.adam.step()
        self.muon.step(coef)
        return norm

    def zero_grad(self):
        self.adam.zero_grad(set_to_none=True)
        for p in self.muon.banks:
            p.grad = None

    def state_dict(self):
        return {"adam": copy.deepcopy(self.adam.state_dict())}

    def load_state_dict(self, state):
        self.adam.load_state_dict(state["adam"])
        self.muon.reset()


# ----- training: one schedule, the timed loop

def _numel(params):
    return sum(p.numel() for p in params)


def estimate_gptq_reserve(n_params, calib_tokens_per_rank=0):
    """Seconds for calibration and two rate-control rounds (3.2 s each at 37 M parameters, H200),
    the calibration's forward passes at 1.5 us per token (the record run: 64 x 2048 in 0.19 s): a
    calibration too large for the clock is refused before training, not found after it."""
    return 4.0 + 0.2e-6 * n_params + 1.5e-6 * calib_tokens_per_rank


def run_progress(args, step, elapsed_s, budget_s):
    """Fraction of the run done: ITERATIONS or the budget, whichever binds first."""
    p = step / args.iterations if args.iterations > 0 else 0.0
    if budget_s > 0:
        p = max(p, elapsed_s / budget_s)
    return min(1.0, p)


class StepPlan(NamedTuple):
    """Every time-dependent quantity of a training step."""
    lr_scale: float  # x every learning rate
    muon_momentum: float
    seq_len: int  # the training context
    qat_on: bool  # late QAT (it stays on: the lr scale only falls)
    recurrence_on: bool  # depth recurrence


def schedule_at(args, progress):
    """The run's whole schedule, a pure function of `progress` (the fraction done, 0..1) -> StepPlan:
    learning rates x 1.0, then linear to 0 over the last WARMDOWN_FRAC, floored at MIN_LR_SCALE; Muon
    momentum warmed up over MUON_MOMENTUM_WARMUP_FRAC; the context TRAIN_SEQ_SCHEDULE gives; late QAT
    once the lr scale is below QAT_START_SCALE (0: never); depth recurrence from RECUR_START_FRAC."""
    s = (1.0 - progress) / args.warmdown_frac if args.warmdown_frac > 0 else 1.0
    lr_scale = max(args.min_lr_scale, min(1.0, s))
    warm = min(1.0, progress / args.muon_momentum_warmup_frac) if args.muon_momentum_warmup_frac > 0 else 1.0
    return StepPlan(lr_scale, (1 - warm) * args.muon_momentum_start + warm * args.muon_momentum,
                    args.train_seq_len_at(progress), args.qat_start_scale > 0 and lr_scale < args.qat_start_scale,
                    bool(args.recur_layer_list()) and progress >= args.recur_start_frac)


def schedule_shapes(args):
    """The (context length, recurrence on) pairs the schedule takes before the run's end, in order:
    the shapes of the training graphs. It changes only where a length or the recurrence starts."""
    starts = sorted({0.0, args.recur_start_frac, *(f for f, _ in args.train_seq_lens())})
    return list(dict.fromkeys((s.seq_len, s.recurrence_on) for s in (schedule_at(args, p) for p in starts if p < 1)))


def ema_weight(args, p0, p1):
    """The EMA's move towards the weights over a step from progress p0 to p1: its time constant is
    EMA_HORIZON of the run, whatever the step time (0: no average, 1.0)."""
    return 1.0 - math.exp(-(p1 - p0) / args.ema_horizon) if args.ema_horizon > 0 else 1.0


class SharedClock:
    """Rank 0's training clock, broadcast each step so all ranks decide alike."""

    def __init__(self, run, clock=time.perf_counter):
        self.run, self.clock = run, clock
        self.t0 = clock()

    def start(self):
        self.t0 = self.clock()

    def local(self):
        return self.clock() - self.t0

    def shared(self, ahead=0.0):  # rank 0's `ahead` too
        return _from_rank0(self.local() + ahead if self.run.rank == 0 else 0.0, self.run.world_size, self.run.device)


def qat_clip_for_budget(model, args, budget_bytes, run):
    """The clip at which the weights would fill the rate band (QAT trains onto it)."""
    clip = args.clip_sigmas
    if run.rank == 0:
        size = len(compress(pack_entries(quantize_model(model, None, args, args.clip_sigmas), args)[0]))
        clip = clip_for_size_change(model, args, args.clip_sigmas, (1 + RATE_BAND) / 2 * budget_bytes - size)
    return _from_rank0(clip, run.world_size, run.device)


@dataclass
class TrainStats:
    steps: int
    train_seconds: float
    step_avg_ms: float
    peak_mem_mib: float
    reserve_seconds: float  # kept for calibration and the rate control
    qat_step: int | None
    qat_clip: float  # the grid the weights were trained onto (CLIP_SIGMAS without late QAT): the rate control's start
    final_train_loss: float
    raw_weights: list | None  # the last step's weights, where EMA replaced them


def training_budget(args, model, world_size=1):
    """Seconds the training loop may run: MAX_WALLCLOCK_SECONDS less the reserve for calibration and
    rate control (0: no limit) on `world_size` ranks -> (budget, reserve)."""
    reserve = args.gptq_reserve_seconds
    if reserve < 0:
        calib = -(-args.gptq_calib_seqs // world_size) * args.gptq_calib_len  # as collect_hessians reads them
        reserve = estimate_gptq_reserve(_numel(model.parameters()), calib)
    budget = args.max_wallclock_seconds - reserve if args.max_wallclock_seconds > 0 else 0.0
    if args.max_wallclock_seconds > 0 and budget <= 0:
        raise ConfigError(f"MAX_WALLCLOCK_SECONDS={args.max_wallclock_seconds} leaves no time after the "
                          f"{reserve:.1f}s quantization reserve")
    return budget, reserve


def compile_warmup(args, model, opt, loader, one_step, run):
    """WARMUP_STEPS steps compile the graphs (every shape of the schedule: no recompile mid-run);
    weights, optimizer and data position are then restored."""
    t0 = time.perf_counter()
    saved = ({k: v.detach().clone() for k, v in model.state_dict().items()}, opt.state_dict(), loader.stream.state())
    shapes, start = schedule_shapes(args), schedule_at(args, 0.0)
    first_step = {}  # per shape, its first step's seconds: mostly its compile
    for i in range(args.warmup_steps):
        seq_len, recurrence = shape = shapes[i * len(shapes) // args.warmup_steps]
        model.recurrence_active = recurrence
        t_step = time.perf_counter()
        one_step(start._replace(seq_len=seq_len, recurrence_on=recurrence))
        if run.device.type == "cuda":  # the step's kernels done: its time is its compile and its work
            torch.cuda.synchronize(run.device)
        first_step.setdefault(shape, time.perf_counter() - t_step)
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    loader.stream.restore(saved[2])
    _sync(run.device)
    run.timer.since("compile_warmup (not counted)", t0)
    per_shape = ", ".join(f"{n}{' recurrent' * r} {s:.1f}s" for (n, r), s in first_step.items())
    run.log(f"compile warm-up: {args.warmup_steps} steps in {time.perf_counter() - t0:.1f}s, state restored "
            f"(first step of each shape: {per_shape})")


def start_late_qat(args, model, budget_bytes, step, scale, run):
    """Fake quantization on from here, on the grid at which the weights would fill the budget
    (without one, CLIP_SIGMAS's) -> that grid's clip."""
    t0 = time.perf_counter()
    clip = qat_clip_for_budget(model, args, budget_bytes, run) if budget_bytes > 0 else args.clip_sigmas
    model.qat_clip.fill_(clip)
    model.qat_mix.fill_(1.0)
    run.log(f"late QAT on at step {step} (lr scale {scale:.3f}), grid clip {clip:.3f} sigmas "
            f"(chosen in {time.perf_counter() - t0:.1f}s)")
    return clip


def finalize_weights(args, model, ema, run):
    """The EMA weights replace the raw ones (returned, to be scored after the artifact); QAT off."""
    if model.recur_layers and not model.recurrence_active:
        run.log("WARNING: the run ended before depth recurrence started; the artifact is evaluated with it")
    model.recurrence_active = bool(model.recur_layers)
    t0, raw = time.perf_counter(), None
    if ema is not None:
        with torch.no_grad():
            raw = [p.detach().clone() for p in model.parameters()]
            for p, t in zip(model.parameters(), ema):
                p.copy_(t.to(p.dtype))
        run.log(f"final weights: EMA (time constant {args.ema_horizon} of the run)")
    model.qat_mix.zero_()
    run.timer.since("weights_average", t0)
    return raw


def micro_batch_seqs(args, world_size, accum, seq_len):
    """Sequences per micro-step at this context length: the same tokens per step at every length."""
    return args.train_batch_tokens // (world_size * accum * seq_len)


def train_step(args, compiled, opt, loader, accum, run, plan):
    """One optimizer step at `plan`'s learning rates, momentum and context -> (mean loss, grad norm)."""
    opt.set_schedule(plan.lr_scale, plan.muon_momentum)
    total = torch.zeros((), device=run.device)
    for _ in range(accum):
        x, y = loader.next_batch(micro_batch_seqs(args, run.world_size, accum, plan.seq_len), plan.seq_len)
        with _autocast(run.device):
            loss = compiled(x, y)
        (loss / accum).backward()
        total += loss.detach()
    norm = opt.step()
    opt.zero_grad()
    return total / accum, norm


def log_batch(args, run, accum, budget, reserve):
    """The batch at each context length and the time the training loop may take."""
    rows = " then ".join(f"{micro_batch_seqs(args, run.world_size, accum, n)} seqs x {n}"
                         + (f" from {f:.0%}" if f > 0 else "") for f, n in args.train_seq_lens())
    run.log(f"batch: {args.train_batch_tokens} tokens/step = {run.world_size} ranks x {accum} micro-steps x "
            f"{rows}; training budget {budget:.1f}s (reserve {reserve:.1f}s for GPTQ)")


def log_step_times(run, steps, elapsed, qat_step, shape_starts):
    """With several shapes (`shape_starts`: [((length, recurrent), step, seconds)], the clock at each
    switch), each shape's step time, and the step time before depth recurrence and with it."""
    recur_at = next(((s, t) for (_, recurrent), s, t in shape_starts if recurrent), None)
    if len(shape_starts) > 1:
        ends = [(s, t) for _, s, t in shape_starts[1:]] + [(steps, elapsed)]
        run.log("step time by shape: " + ", ".join(
            f"{n}{' recurrent' * r} {(t1 - t0) / (s1 - s0) * 1000:.1f} ms ({s1 - s0} steps)"
            for ((n, r), s0, t0), (s1, t1) in zip(shape_starts, ends) if s1 > s0)
            + (" (late QAT's start in its shape)" if qat_step is not None else ""))
    if recur_at is not None and steps > recur_at[0] > 0:
        run.log(f"step time: {recur_at[1] / recur_at[0] * 1000:.1f} ms before depth recurrence ({recur_at[0]} steps), "
                f"{(elapsed - recur_at[1]) / (steps - recur_at[0]) * 1000:.1f} ms with it ({steps - recur_at[0]} steps"
                + (", late QAT's start included)" if qat_step is not None and qat_step >= recur_at[0] else ")"))


def train(args, model, compiled, opt, loader, run, clock, budget_bytes=0):
    """The timed training loop: each step's learning rates, momentum, context, depth recurrence and
    late QAT from schedule_at at the fraction of the run done (steps or time), the EMA from
    ema_weight -> TrainStats."""
    device, log = run.device, run.log
    accum = args.resolved_grad_accum(run.world_size)
    budget, reserve = training_budget(args, model, run.world_size)
    log_batch(args, run, accum, budget, reserve)
    one_step = functools.partial(train_step, args, compiled, opt, loader, accum, run)
    if args.warmup_steps > 0:
        compile_warmup(args, model, opt, loader, one_step, run)
    params = list(model.parameters())
    ema = [p.detach().float().clone() for p in params] if args.ema_horizon > 0 else None
    step, elapsed, progress, step_s = 0, 0.0, 0.0, 0.0
    qat_step, qat_clip = None, args.clip_sigmas
    _sync(device)
    if run.world_size > 1:
        dist.barrier()  # the ranks start the clock together
    start = schedule_at(args, 0.0)
    model.recurrence_active = start.recurrence_on
    shape_starts = [((start.seq_len, start.recurrence_on), 0, 0.0)]  # the shapes run: (length, recurrent), step, s
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # the warm-up compiled every shape
    clock.start()
    while True:
        plan = schedule_at(args, progress)
        (seq_len, recurrent), _, _ = shape_starts[-1]
        if (plan.seq_len, plan.recurrence_on) != (seq_len, recurrent):
            shape_starts.append(((plan.seq_len, plan.recurrence_on), step, elapsed))
        if plan.seq_len != seq_len:
            log(f"training context {plan.seq_len} from step {step} ({elapsed:.1f}s, progress {progress:.3f})")
        if plan.recurrence_on and not recurrent:
            model.recurrence_active = True
            log(f"depth recurrence on at step {step} ({elapsed:.1f}s, {step_s * 1000:.1f} ms/step so far"
                + ("; compiled in the warm-up" if args.warmup_steps >= 2 else "") + f"): layers run {model.layer_order()}")
        if plan.qat_on and qat_step is None:
            qat_step, qat_clip = step, start_late_qat(args, model, budget_bytes, step, plan.lr_scale, run)
        loss, norm = one_step(plan)
        loss_v, norm = torch.stack([loss, norm]).tolist()  # the one wait for the device: the clock measures finished work
        if not math.isfinite(norm):  # all-reduced: all ranks stop alike
            raise DivergedError(f"non-finite gradients at step {step}, loss {loss_v} (lower the learning rates?)")
        step += 1
        elapsed = clock.shared()
        step_s = elapsed / step
        new_progress = run_progress(args, step, elapsed, budget)
        if ema is not None:
            torch._foreach_lerp_(ema, [p.detach() for p in params], ema_weight(args, progress, new_progress))
        progress = new_progress
        # stop before a step that would end past the budget
        last = (args.iterations > 0 and step >= args.iterations) or (budget > 0 and elapsed + step_s > budget)
        if args.train_log_every > 0 and (step % args.train_log_every == 0 or step <= 5 or last):
            left = max(0.0, budget - elapsed) if budget > 0 else (args.iterations - step) * step_s
            log(f"step:{step} train_loss:{loss_v:.4f} grad_norm:{norm:.3f} lr_scale:{plan.lr_scale:.3f} "
                f"progress:{progress:.3f} elapsed:{elapsed:.1f}s step_avg:{step_s * 1000:.1f}ms eta:{left:.0f}s")
        if last:
            break
    run.timer.add("training", elapsed)
    raw = finalize_weights(args, model, ema, run)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    log(f"training done: {step} steps in {elapsed:.1f}s ({step_s * 1000:.1f} ms/step), peak memory {peak:.0f} MiB, "
        f"{recompiled} graphs compiled on the clock")
    log_step_times(run, step, elapsed, qat_step, shape_starts)
    return TrainStats(step, elapsed, step_s * 1000, peak, reserve, qat_step, qat_clip, loss_v, raw)


# ----- quantization: calibration, GPTQ, rate control

CLIP_RANGE = (3.0, 64.0)  # rate-control clips (sigmas); under ~3 clipping costs more
RATE_BAND = 0.985  # rate control stops once the model fills this much of its budget
# Gaussian rows predict the trained model's bytes to 2 % (15.43 vs 15.74 MB at clip 8.93, the 600 s
# proxy run); half their bits is a floor that never refuses a target the model can fit
LEAST_BITS_SHARE = 0.5
EMBED_TABLES = ("tok_emb.weight",)  # quantized at EMBED_BITS
# AWQ-lite's Hessian kinds (down: folded into up's rows, nothing stored), its scales' range, and their
# grid: powers of 2^(1/32) (<= 1.1 % off rms^alpha), whose repeating fp16 values lzma stores ~40 % smaller
AWQ_KINDS, AWQ_SCALE_RANGE, AWQ_SCALE_STEPS_PER_OCTAVE = ("qkv", "out", "up", "down"), (0.01, 100.0), 32


def upper_cholesky_of_inverse(H):
    """Upper U' with U'^T U' = H^-1 (reverse Cholesky, inverted)."""
    U = torch.linalg.cholesky(H.flip(-2, -1)).flip(-2, -1)
    eye = torch.eye(H.size(-1), device=H.device, dtype=H.dtype).expand_as(H)
    return torch.linalg.solve_triangular(U, eye, upper=True)


def _gptq_pass(W, Hinv_u, s, qmax, block):
    """One GPTQ sweep with fixed row scales s (n, r)."""
    W = W.clone()
    n, r, c = W.shape
    Q = torch.empty_like(W)
    inv_s = 1.0 / s
    for i1 in range(0, c, block):
        i2 = min(i1 + block, c)
        W1 = W[:, :, i1:i2].clone()
        E1 = torch.empty_like(W1)
        U1 = Hinv_u[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, :, i]
            q = torch.clamp(torch.round(w * inv_s), -qmax, qmax)
            Q[:, :, i1 + i] = q
            e = (w - q * s) / U1[:, i, i][:, None]
            W1[:, :, i + 1:] -= e[:, :, None] * U1[:, i, i + 1:][:, None, :]
            E1[:, :, i] = e
        if i2 < c:
            W[:, :, i2:] -= E1 @ Hinv_u[:, i1:i2, i2:]
    return Q


def gptq_quantize(W, H, qmax, clip_sigmas, block=128, damp=0.01):
    """GPTQ of W (n, r, c) with Hessians H (None: round to nearest) -> int8 codes, fp16 scales."""
    W = W.float().clone()
    n, r, c = W.shape
    H = torch.eye(c, device=W.device).expand(n, c, c).clone() if H is None else H.float().clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag <= 0
    W.masked_fill_(dead[:, None, :], 0.0)
    s = sdclip_scales(W, clip_sigmas, qmax)
    diag.add_(dead.float())
    diag.add_(damp * diag.mean(-1, keepdim=True))
    perm = torch.argsort(diag, dim=-1, descending=True, stable=True)
    inv_perm = torch.argsort(perm, dim=-1)
    Wp = W.gather(2, perm[:, None, :].expand(n, r, c))
    Hp = H.gather(1, perm[:, :, None].expand(n, c, c)).gather(2, perm[:, None, :].expand(n, c, c))
    Q = _gptq_pass(Wp, upper_cholesky_of_inverse(Hp), s, qmax, block)
    Q = Q.gather(2, inv_perm[:, None, :].expand(n, r, c))
    return Q.to(torch.int8), s.half()


class HessianCollector:
    """H = X^T X of each quantized linear's input, keyed (layer, kind)."""

    def __init__(self):
        self.H, self.rows = {}, 0

    def __call__(self, layer, kind, x):
        X = x.detach().reshape(-1, x.size(-1)).float()
        key = (layer, kind)
        if key not in self.H:
            self.H[key] = X.new_zeros(X.size(1), X.size(1))
        self.H[key].addmm_(X.T, X)
        if key == (0, "qkv"):
            self.rows += X.size(0)

    def averaged(self):
        rows = torch.tensor(float(self.rows), device=next(iter(self.H.values())).device)
        for t in [*self.H.values(), rows]:
            _all_reduce_sum(t)
        return {k: H / rows for k, H in self.H.items()}


def bank_hessian_keys(args):
    """For each bank, the Hessian key of each of its matrices."""
    def keys(kind):
        return [(l, kind) for l in range(args.num_layers)]
    return {"qo": keys("qkv") + keys("out"), "kv": keys("qkv") * 2, "up": keys("up"), "down": keys("down")}


@torch.no_grad()
def collect_hessians(model, args, loader, run):
    """Hessians from the next GPTQ_CALIB_SEQS training sequences."""
    t0 = time.perf_counter()
    per_rank = -(-args.gptq_calib_seqs // run.world_size)
    collector = HessianCollector()
    model._capture = collector
    try:
        with _autocast(run.device):
            for b0 in range(0, per_rank, 8):
                x, _ = loader.next_batch(min(8, per_rank - b0), args.gptq_calib_len)
                collector(-1, "head", model.hidden(x))  # the tied head's input
    finally:
        model._capture = None
    hessians = collector.averaged()
    _sync(run.device)
    run.log(f"calibration: {per_rank * run.world_size} training seqs x {args.gptq_calib_len} tokens, "
            f"Hessians in {time.perf_counter() - t0:.2f}s")
    return hessians


AWQ_PREFIX = "awq."  # artifact entries `awq.<kind>.<layer>`: one input scale per column of that input's matrices


def awq_scales(hessians, args):
    """AWQ-lite's input scales per (layer, kind) of AWQ_MATRICES: s = (activation RMS)^AWQ_ALPHA from
    the calibration Hessian's diagonal, geometric mean 1 over the live channels (dead ones: 1), on the
    AWQ_SCALE_STEPS_PER_OCTAVE grid within AWQ_SCALE_RANGE, fp16 values (as stored: quantization and
    dequantization divide by the same s)."""
    scales = {}
    for kind in args.awq_kinds():
        for layer in range(args.num_layers):
            ms = hessians[(layer, kind)].diagonal().float()  # mean square of each input channel
            live = ms > 0
            log2_s = torch.zeros_like(ms)
            if live.any():
                log2_s[live] = 0.5 * args.awq_alpha * ms[live].log2()
                log2_s[live] -= log2_s[live].mean()
            steps = torch.round(log2_s * AWQ_SCALE_STEPS_PER_OCTAVE)
            scales[(layer, kind)] = torch.exp2(steps / AWQ_SCALE_STEPS_PER_OCTAVE).clamp(*AWQ_SCALE_RANGE).half().float()
    return scales


def awq_transform(banks, hessians, args):
    """The banks and Hessians as GPTQ takes them under AWQ-lite: each matrix's input columns times its
    input's scale s, the Hessian diag(1/s) H diag(1/s) (the same error measure: (W - Q/s) H (W - Q/s)^T
    = (Ws - Q) H' (Ws - Q)^T); down's scale folded into up's rows as s^-1/2 (LeakyReLU^2 is homogeneous
    of degree 2: exact in float) -> (banks, Hessians, the scales to store). Off, or without Hessians:
    the inputs unchanged, no scales."""
    scales = awq_scales(hessians, args) if hessians is not None else {}
    if not scales:
        return banks, hessians, {}
    keys = bank_hessian_keys(args)
    scaled = {}
    for name, bank in banks.items():
        ones = bank.new_ones(bank.size(-1), dtype=torch.float32)
        cols = torch.stack([scales.get(key, ones).to(bank.device) for key in keys[name]])
        scaled[name] = bank.detach().float() * cols[:, None, :]
    if "down" in args.awq_kinds():
        fold = torch.stack([scales[(layer, "down")] for layer in range(args.num_layers)]).to(scaled["up"].device)
        scaled["up"] = scaled["up"] * fold.rsqrt()[:, :, None]
    transformed = {key: H / (scales[key][:, None] * scales[key][None, :]).to(H.device, H.dtype) if key in scales else H
                   for key, H in hessians.items()}
    return scaled, transformed, {key: s for key, s in scales.items() if key[1] != "down"}


@torch.no_grad()
def quantize_model(model, hessians, args, clip_sigmas, rank=0, world_size=1):
    """Banks by GPTQ at `clip_sigmas`, the embedding at EMBED_BITS, the rest fp16."""
    keys = bank_hessian_keys(args)
    qmax = 2 ** (args.quant_bits - 1) - 1
    entries = {}
    banks, bank_hessians, awq = awq_transform(model.banks(), hessians, args)
    for bank_name, bank in banks.items():
        n = bank.size(0)
        mine = list(range(rank, n, world_size))
        q = bank.new_zeros(bank.shape, dtype=torch.int8)
        s = bank.new_zeros(bank.shape[:2], dtype=torch.float16)
        if mine:
            H = None if hessians is None else torch.stack([bank_hessians[keys[bank_name][i]] for i in mine])
            q[mine], s[mine] = gptq_quantize(bank.detach()[mine], H, qmax, clip_sigmas, args.gptq_block, args.gptq_damp)
        if world_size > 1:  # rows filled by one rank each: exact sums
            dist.all_reduce(q)
            dist.all_reduce(s)
        for i in range(n):
            entries[f"{bank_name}_bank.{i}"] = IntEntry(args.quant_bits, q[i], s[i])
    for name, t in model.state_dict().items():
        if name.endswith("_bank"):
            continue
        if name in EMBED_TABLES:
            H = (hessians or {}).get((-1, "head"))  # the tied head's input
            q, s = gptq_quantize(t[None], None if H is None else H[None], 2 ** (args.embed_bits - 1) - 1,
                                 args.embed_clip_sigmas, args.gptq_block, args.gptq_damp)
            entries[name] = IntEntry(args.embed_bits, q[0], s[0])
        else:
            entries[name] = FloatEntry(t.detach().half().cpu())
    for (layer, kind), scale in awq.items():  # after the model's own: without AWQ the artifact is what it was
        entries[f"{AWQ_PREFIX}{kind}.{layer}"] = FloatEntry(scale.half().cpu())
    return entries


@dataclass
class IntEntry:
    """A quantized matrix of the artifact: int8 codes (rows, cols), one fp16 step per row."""
    bits: int
    q: torch.Tensor
    scale: torch.Tensor
    kind: ClassVar[str] = "int"

    def __post_init__(self):
        self.q, self.scale = self.q.cpu(), self.scale.cpu()


@dataclass
class FloatEntry:
    """A tensor the artifact keeps in fp16."""
    value: torch.Tensor
    kind: ClassVar[str] = "float"


def order0_bits(counts):
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@torch.no_grad()
def code_entropy_bytes(model, args, clip_sigmas):
    """Order-0 entropy (bytes) of the banks' codes: predicts artifact size changes."""
    qmax = 2 ** (args.quant_bits - 1) - 1
    total = 0.0
    for bank in model.banks().values():
        W = bank.detach().float()
        s = sdclip_scales(W, clip_sigmas, qmax)
        codes = torch.clamp(torch.round(W / s[..., None]), -qmax, qmax).long() + qmax
        total += order0_bits(torch.bincount(codes.flatten()).cpu().numpy()) * codes.numel() / 8
    return total


def gaussian_code_bits(clip_sigmas, qmax):
    """Order-0 entropy (bits per weight) of unit-Gaussian rows rounded on the SDClip grid."""
    step = clip_sigmas / qmax
    edges = (torch.arange(-qmax, qmax, dtype=torch.float64) + 0.5) * step
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.special.ndtr(edges), torch.ones(1, dtype=torch.float64)])
    p = cdf.diff()
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def least_model_bytes(model, args):
    """A floor under the packed model's size, known before training: the banks on the widest grid the
    rate control may choose and the embedding on its own at LEAST_BITS_SHARE of a Gaussian's bits per
    weight, one byte per row scale and per float value."""
    qmax = 2 ** (args.quant_bits - 1) - 1
    banks = list(model.banks().values())
    bits = sum(b.numel() for b in banks) * gaussian_code_bits(CLIP_RANGE[1], qmax)
    other = sum(b.shape[0] * b.shape[1] for b in banks)
    for name, t in model.state_dict().items():
        if name in EMBED_TABLES:  # EMBED_CLIP_SIGMAS=0 (row absmax) is at most the widest clip too
            bits += t.numel() * gaussian_code_bits(args.embed_clip_sigmas or CLIP_RANGE[1], 2 ** (args.embed_bits - 1) - 1)
            other += t.shape[0]
        elif not name.endswith("_bank"):
            other += t.numel()
    other += args.num_layers * args.model_dim * len(set(args.awq_kinds()) - {"down"})  # AWQ-lite's stored scales
    return int(LEAST_BITS_SHARE * bits / 8 + other)


def clip_for_size_change(model, args, clip_sigmas, delta_bytes):
    """The clip whose code entropy differs from that at `clip_sigmas` by `delta_bytes`."""
    base = code_entropy_bytes(model, args, clip_sigmas)
    lo, hi = CLIP_RANGE
    for _ in range(24):
        mid = math.sqrt(lo * hi)
        if code_entropy_bytes(model, args, mid) - base > delta_bytes:
            lo = mid  # too many bytes: wider clip
        else:
            hi = mid
    return hi


class ScaledBanks(NamedTuple):
    """AWQ-lite's scaled banks in a model's place, for the size model (which reads `banks()`)."""
    scaled: dict

    def banks(self):
        return self.scaled


@dataclass
class Quantized:
    entries: dict  # name -> int or float entry
    data: bytes | None  # the compressed artifact (rank 0; None elsewhere)
    clip_sigmas: float
    tries: list  # (clip, bytes) of each round


def quantize_to_budget(model, hessians, args, budget, run, clock=None, tokenizer_sha="", byte_sidecar=False,
                       start_clip=None):
    """Rate control: GPTQ, compress, move the clip (from `start_clip`, else CLIP_SIGMAS) until the
    model fills RATE_BAND of the budget (RATE_TRIES rounds, up to 4 more while nothing fits; none
    past the clock's budget once one fits) -> Quantized. The artifact records `tokenizer_sha` and
    `byte_sidecar`."""
    clip, tries, best = args.clip_sigmas if start_clip is None else start_clip, [], None
    # the size model predicts from the banks GPTQ quantizes (AWQ-lite: their scaled columns)
    sized = ScaledBanks(awq_transform(model.banks(), hessians, args)[0]) if args.awq_kinds() and hessians else model
    for attempt in range(args.rate_tries + 4):
        if attempt >= args.rate_tries and best[0][0] == 1:
            break
        t0 = time.perf_counter()
        entries = quantize_model(model, hessians, args, clip, run.rank, run.world_size)
        data = compress(pack_entries(entries, args, tokenizer_sha, byte_sidecar)[0]) if run.rank == 0 else None
        size = int(_from_rank0(len(data) if run.rank == 0 else 0, run.world_size, run.device))
        tries.append((clip, size))
        run.log(f"rate control {attempt}: clip {clip:.3f} sigmas -> {size} bytes (budget {budget})")
        fits = size <= budget
        key = (1, -clip) if fits else (0, -size)
        if best is None or key > best[0]:
            best = (key, entries, data, clip)
        if fits and (size >= RATE_BAND * budget or clip <= CLIP_RANGE[0]):
            break
        if best[0][0] == 1 and clock and 0 < args.max_wallclock_seconds < clock.shared(time.perf_counter() - t0):
            break
        if attempt + 1 < args.rate_tries or not fits:  # rank 0 picks the next clip
            aim = ((1 + RATE_BAND) / 2) ** max(1, attempt + 2 - args.rate_tries) * budget
            new_clip = clip_for_size_change(sized, args, clip, aim - size) if run.rank == 0 else 0.0
            new_clip = _from_rank0(new_clip, run.world_size, run.device)
            if new_clip == clip:
                break
            clip = new_clip
    return Quantized(best[1], best[2], best[3], tries)


def dequantize_entries(entries, args):
    """Entries -> state dict; a bank matrix with an AWQ-lite input scale s is Q / s (per column)."""
    state, banks, awq = {}, {}, {}
    for name, e in entries.items():
        t = e.q.float() * e.scale.float()[:, None] if e.kind == "int" else e.value.float()
        if name.startswith(AWQ_PREFIX):
            kind, layer = name[len(AWQ_PREFIX):].split(".")
            awq[(int(layer), kind)] = t
        elif "_bank." in name:
            bank, idx = name.rsplit(".", 1)
            banks.setdefault(bank, {})[int(idx)] = t
        else:
            state[name] = t
    keys = bank_hessian_keys(args) if awq else {}
    stray = set(awq) - {key for bank_keys in keys.values() for key in bank_keys}
    if stray:
        raise ArtifactError(f"AWQ scales for inputs the model lacks: {sorted(stray)}")
    for bank, rows in banks.items():
        bank_keys = keys.get(bank.removesuffix("_bank"), ())
        for i, key in enumerate(bank_keys):
            if key in awq:
                rows[i] = rows[i] / awq[key]
        state[bank] = torch.stack([rows[i] for i in range(len(rows))])
    return state


# ----- packing: the artifact's format, rANS, the code as shipped

ARTIFACT_MAGIC = b"PGQ1"
TOKENIZER_KEY = "tokenizer_sha256"  # beside the model config: the tokenizer the artifact was scored with
SIDECAR_KEY = "byte_sidecar"  # true: scored on the data's byte sidecar (absent: the tokenizer's table)


def header_config(args):
    """The header's model part: every ModelSettings field but those at their declared "absent"
    value (the model before the field existed), which older artifacts lack."""
    fields = dataclasses.fields(ModelSettings)
    return {f.name: getattr(args, f.name) for f in fields
            if "absent" not in f.metadata or getattr(args, f.name) != f.metadata["absent"]}


def settings_from_header(config, path):
    """A header's model part (TOKENIZER_KEY and SIDECAR_KEY taken out) -> every ModelSettings field:
    a field it lacks is its "absent" value; one lacking without it, or one unknown, is another revision."""
    fields = dataclasses.fields(ModelSettings)
    odd = (set(config) - {f.name for f in fields}) | {f.name for f in fields
                                                       if f.name not in config and "absent" not in f.metadata}
    if odd:
        raise ArtifactError(f"{path} was written by another revision (settings {', '.join(sorted(odd))})")
    return {f.name: config[f.name] if f.name in config else f.metadata["absent"] for f in fields}


def pack_entries(entries, args, tokenizer_sha="", byte_sidecar=False):
    """JSON header (model config, with the tokenizer's fingerprint if given and whether a byte sidecar
    scored it), int values, then scales and floats -> (blob, values_offset, n_values)."""
    table, values, rest = [], [], []
    voff = roff = 0
    for name, e in entries.items():
        if e.kind == "int":
            qb = e.q.numpy().astype(np.int8).tobytes()
            sb = e.scale.numpy().astype("<f2").tobytes()
            table.append({"name": name, "kind": "int", "bits": e.bits, "shape": list(e.q.shape),
                          "voff": voff, "roff": roff})
            values.append(qb)
            rest.append(sb)
            voff, roff = voff + len(qb), roff + len(sb)
        else:
            vb = e.value.numpy().astype("<f2").tobytes()
            table.append({"name": name, "kind": "float", "shape": list(e.value.shape), "roff": roff})
            rest.append(vb)
            roff += len(vb)
    config = header_config(args)  # the header is the model part
    if tokenizer_sha:
        config[TOKENIZER_KEY] = tokenizer_sha
    if byte_sidecar:  # only then: a table-scored artifact stays byte for byte what it was
        config[SIDECAR_KEY] = True
    header = json.dumps({"config": config, "tensors": table}, separators=(",", ":")).encode()
    head = ARTIFACT_MAGIC + struct.pack("<II", len(header), voff) + header
    return head + b"".join(values) + b"".join(rest), len(head), voff


def unpack_entries(blob):
    if blob[:4] != ARTIFACT_MAGIC:
        raise ArtifactError("artifact payload has a bad magic (not a packed model)")
    hlen, vlen = struct.unpack("<II", blob[4:12])
    header = json.loads(blob[12:12 + hlen])
    vbase, rbase = 12 + hlen, 12 + hlen + vlen
    entries = {}
    for t in header["tensors"]:
        shape, n = t["shape"], int(np.prod(t["shape"]))  # 1 for a scalar
        if t["kind"] == "int":
            q = np.frombuffer(blob, dtype=np.int8, count=n, offset=vbase + t["voff"]).reshape(shape)
            s = np.frombuffer(blob, dtype="<f2", count=shape[0], offset=rbase + t["roff"])
            entries[t["name"]] = IntEntry(t["bits"], torch.from_numpy(q.copy()), torch.from_numpy(s.copy()))
        else:
            v = np.frombuffer(blob, dtype="<f2", count=n, offset=rbase + t["roff"]).reshape(shape)
            entries[t["name"]] = FloatEntry(torch.from_numpy(v.copy()))
    return entries, header["config"]


CODEC_TAG = b"R"  # int codes by rANS, the rest by lzma
# interleaved rANS: 32-bit states, 16-bit words, 15-bit frequencies, one table per tensor
# (0.2 % over the codes' order-0 entropy; lzma: 7 %)
RANS_LANES, RANS_PREC, RANS_LOW = 4096, 15, 1 << 16


def rans_lanes(n):
    """Lanes for n symbols: each ends with a 4-byte state, so few for small inputs."""
    return min(RANS_LANES, max(1, n // 1024))


def _int_tensors(blob):
    """Offset, size and [(count, alphabet size)] per tensor of a packed model's int8 values;
    else (0, 0, [])."""
    try:
        hlen, vlen = struct.unpack_from("<II", blob, 4)
        tensors = json.loads(blob[12:12 + hlen])["tensors"] if blob[:4] == ARTIFACT_MAGIC else []
        return 12 + hlen, vlen, [(int(np.prod(t["shape"])), 2 ** t["bits"] - 1) for t in tensors if t["kind"] == "int"]
    except (struct.error, ValueError, KeyError, TypeError):
        return 0, 0, []


def _rans_tables(freqs):
    """Per tensor, padded: frequency and cumulative frequency of each symbol."""
    F = np.zeros((len(freqs), max((f.size for f in freqs), default=1)), np.uint64)
    for i, f in enumerate(freqs):
        F[i, :f.size] = f
    return F, np.cumsum(F, 1) - F


def rans_encode(values, tensors):
    """int8 values (tensor after tensor, in [-(A-1)/2, (A-1)/2]) -> tables, lane states, words."""
    M, n = 1 << RANS_PREC, values.size
    f_all, c_all, freqs, lo = np.empty(n, np.uint64), np.empty(n, np.uint64), [], 0
    for c, A in tensors:
        sym = values[lo:lo + c].astype(np.int64) + A // 2
        h = np.bincount(sym, minlength=A)
        if h.size > A or sym.min(initial=0) < 0:
            raise ValueError("an int value lies outside its tensor's range")
        f = np.where(h > 0, np.maximum(1, h * M // max(c, 1)), 0)
        f[np.argmax(f)] += M - f.sum()  # the largest absorbs the rounding: still >= 1
        freqs.append(f)
        f_all[lo:lo + c], c_all[lo:lo + c] = f[sym], (np.cumsum(f) - f)[sym]
        lo += c
    N = rans_lanes(n)
    x, out = np.full(min(n, N), RANS_LOW, np.uint64), []
    for lo in range(-(-n // N) * N - N, -1, -N):  # last symbols first
        f, c = f_all[lo:lo + N], c_all[lo:lo + N]
        xs = x[:f.size]
        big = xs >= f << np.uint64(32 - RANS_PREC)  # renormalise first: x stays < 2^32
        out.append(xs[big])
        xs[big] >>= np.uint64(16)
        x[:f.size] = (xs // f << np.uint64(RANS_PREC)) + xs % f + c
    words = np.concatenate([o[::-1] for o in reversed(out)] + [np.zeros(0, np.uint64)])
    return b"".join(f.astype("<u2").tobytes() for f in freqs) + x.astype("<u4").tobytes() + words.astype("<u2").tobytes()


def rans_decode(data, tensors):
    M, n = 1 << RANS_PREC, sum(c for c, _ in tensors)
    ends = np.cumsum([c for c, _ in tensors])
    off, freqs = 0, []
    for _, A in tensors:
        freqs.append(np.frombuffer(data, "<u2", A, off).astype(np.uint64))
        off += 2 * A
    if any(f.sum() != M for f in freqs):
        raise ArtifactError("artifact is corrupt (rANS frequency table)")
    F, C = _rans_tables(freqs)
    slot_sym = np.stack([np.repeat(np.arange(F.shape[1]), F[i].astype(np.int64)) for i in range(len(freqs))]) \
        if freqs else np.zeros((0, M), np.int64)
    N = rans_lanes(n)
    lanes = min(n, N)
    x = np.frombuffer(data, "<u4", lanes, off).astype(np.uint64)
    words = np.frombuffer(data, "<u2", offset=off + 4 * lanes).astype(np.uint64)
    sym, ptr = np.empty(n, np.int64), 0
    for lo in range(0, n, N):
        t = np.searchsorted(ends, np.arange(lo, min(n, lo + N)), side="right")  # each symbol's tensor
        xs = x[:t.size]
        slot = (xs & np.uint64(M - 1)).astype(np.int64)
        s = slot_sym[t, slot]
        xs = F[t, s] * (xs >> np.uint64(RANS_PREC)) + slot.astype(np.uint64) - C[t, s]
        low = np.flatnonzero(xs < RANS_LOW)[::-1]
        xs[low] = xs[low] << np.uint64(16) | words[ptr:ptr + low.size]
        ptr += low.size
        x[:t.size], sym[lo:lo + t.size] = xs, s
    if ptr != words.size or (x != RANS_LOW).any():
        raise ArtifactError("artifact is corrupt (rANS stream)")
    for (c, A), end in zip(tensors, ends):
        sym[end - c:end] -= A // 2
    return sym.astype(np.int8)


def compress(blob):
    """tag, lzma length, has-codes flag, CRC-32 of the int values (rANS has no check of its own);
    lzma(blob without its int values); rANS(int values)."""
    voff, vlen, tensors = _int_tensors(blob)
    if not tensors or voff + vlen > len(blob) or vlen != sum(c for c, _ in tensors):
        voff = vlen = 0  # not a packed model: all of it to lzma
    values = np.frombuffer(blob, np.int8, vlen, voff)
    codes = rans_encode(values, tensors) if vlen else b""
    rest = lzma.compress(blob[:voff] + blob[voff + vlen:], preset=9 | lzma.PRESET_EXTREME)
    return CODEC_TAG + struct.pack("<IBI", len(rest), bool(vlen), zlib.crc32(values)) + rest + codes


def decompress(data):
    if data[:1] != CODEC_TAG:
        raise ArtifactError(f"unknown artifact codec tag {data[:1]!r}")
    if len(data) < 10:
        raise ArtifactError("artifact is truncated")
    n, has_codes, crc = struct.unpack_from("<IBI", data, 1)
    end = 10 + n
    if len(data) < end:
        raise ArtifactError("artifact is truncated")
    if has_codes > 1:
        raise ArtifactError("artifact is corrupt (header)")
    try:
        rest = lzma.decompress(data[10:end])
    except lzma.LZMAError:
        raise ArtifactError("artifact is corrupt (lzma part)") from None
    if not has_codes:
        if end != len(data):
            raise ArtifactError("artifact has trailing bytes")
        return rest
    voff, vlen, tensors = _int_tensors(rest)
    if not tensors or end == len(data):
        raise ArtifactError("artifact is truncated (no int codes)")
    try:
        values = rans_decode(data[end:], tensors)
    except (ValueError, IndexError):
        raise ArtifactError("artifact is corrupt or truncated (rANS)") from None
    if zlib.crc32(values) != crc:
        raise ArtifactError("artifact is corrupt (checksum of the int codes)")
    return rest[:voff] + values.tobytes() + rest[voff:]


def write_artifact(path, data, code_bytes):
    total = code_bytes + len(data)
    if total > ARTIFACT_CAP_BYTES:
        raise ArtifactError(f"artifact is {total} bytes (code {code_bytes} + model {len(data)}) > cap {ARTIFACT_CAP_BYTES}")
    write_atomic(path, data)
    return total


def load_artifact(path):
    """Read an artifact file -> (quantized entries, model config)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ArtifactError(f"cannot read artifact {path}: {e.strerror}") from None
    try:
        return unpack_entries(decompress(data))
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"artifact {path} is corrupt: {e}") from None


# ----- code as shipped
# The file that ships as train_gpt.py is this source without its comments, blank lines and
# docstrings, lzma-compressed into a latin-1 string literal that decodes and runs it (the records'
# practice); the artifact counts that file's bytes.
_SHIP_ESCAPES = {0: b"\\000", 10: b"\\n", 13: b"\\r", 34: b'\\"', 92: b"\\\\"}  # other bytes stand for themselves


def _docstrings(tree):
    """The docstring statements of the module, its classes and functions."""
    return [node.body[0] for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
            and isinstance(node.body[0].value.value, str)]


def minified(source):
    """The code that ships for `source` (bytes): its own lines less comments, blank lines and
    docstrings (a docstring on lines of its own becomes ""), cut by the tokenizer, never rewritten:
    the same on every Python version. Checked to parse to the source's syntax tree, those
    docstrings emptied."""
    text = source.decode()
    lines = text.splitlines(keepends=True)
    tree = ast.parse(text)
    doc_lines = {d.lineno for d in _docstrings(tree)}
    drop, cut, docs = set(), {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        (r0, c0), (r1, c1) = tok.start, tok.end
        if tok.type == tokenize.COMMENT:
            if lines[r0 - 1][:c0].strip():
                cut[r0 - 1] = c0
            else:
                drop.add(r0 - 1)
        elif tok.type == tokenize.NL and not lines[r0 - 1].strip():
            drop.add(r0 - 1)
        elif (tok.type == tokenize.STRING and r0 in doc_lines and r0 - 1 not in docs and not lines[r0 - 1][:c0].strip()
              and not lines[r1 - 1][c1:].split("#")[0].strip()):
            docs[r0 - 1] = (r1 - 1, c0)
    out, i = [], 0
    while i < len(lines):
        if i in docs:
            end, c0 = docs[i]
            out.append(lines[i][:c0] + '""\n')
            i = end + 1
            continue
        if i not in drop:
            out.append(lines[i][:cut[i]].rstrip() + "\n" if i in cut else lines[i])
        i += 1
    code = "".join(out)
    for d in _docstrings(tree):
        if d.lineno - 1 in docs:
            d.value.value = ""
    if ast.dump(ast.parse(code)) != ast.dump(tree):
        raise ValueError("the minified code does not parse to the source's syntax tree")
    return code.encode()


def shipped_form(source):
    """The self-extracting file for `source` (bytes): it sets SHIPPED_SOURCE (the minified code)
    and executes it."""
    return _self_extracting(minified(source))


def _self_extracting(code):
    packed = lzma.compress(code, format=lzma.FORMAT_RAW,
                           filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    literal = b"".join(_SHIP_ESCAPES.get(b, bytes((b,))) for b in packed)
    return (b'# -*- coding: latin-1 -*-\nimport lzma as L\nSHIPPED_SOURCE=L.decompress("' + literal
            + b'".encode("latin-1"),L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}])\n'
            b'exec(compile(SHIPPED_SOURCE,"train_gpt.py","exec"))\n')


@functools.cache  # the file does not change while it runs
def code_as_shipped():
    """(the code that runs as shipped, bytes counted): run through the shipped file, its code and
    that file's size; run from the source, the minified source and the size of its shipped form."""
    with open(os.path.abspath(__file__), "rb") as f:
        own = f.read()
    source = globals().get("SHIPPED_SOURCE")
    if source is not None:
        return source, len(own)
    code = minified(own)  # once: the shipped form wraps it
    return code, len(_self_extracting(code))


# ----- evaluation: round trip, sliding windows

FINEWEB_VAL_BYTES_EST = 151e6  # ~62 M sp1024 validation tokens at ~0.41 tokens per byte: for TTT's 8-GPU estimate


def sliding_windows(n_targets, seq_len, stride):
    """Windows (start, length, first_scored_offset): each target scored once."""
    windows, scored = [], 0
    while scored < n_targets:
        end = min(scored + (seq_len if scored == 0 else stride), n_targets)
        start = max(0, end - seq_len)
        windows.append((start, end - start, scored - start))
        scored = end
    return windows


def rank_share(items, rank, world_size):
    """Contiguous split of a list across ranks."""
    per = -(-len(items) // world_size)
    return items[rank * per:(rank + 1) * per]


@torch.no_grad()
def score_windows(score_fn, tokens, byte_source, windows, batch, device, on_score=None):
    """Sum (nll, bytes, tokens, untilted nll) over the scored parts; batches padded to a shape.
    `byte_source` (ByteLUTs or ByteSidecar) counts each target's bytes from its previous token,
    itself and its position in `tokens`."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for b0 in range(0, len(windows), batch):
        part = windows[b0:b0 + batch]
        valid = torch.arange(batch, device=device) < len(part)
        part = part + [part[-1]] * (batch - len(part))
        length = part[0][1]
        assert all(w[1] == length for w in part), "windows of one batch must share a length"
        starts = torch.tensor([w[0] for w in part], device=device)
        first = torch.tensor([w[2] for w in part], device=device)
        pos = torch.arange(length, device=device)
        idx = starts[:, None] + pos[None, :]
        x, y = tokens[idx], tokens[idx + 1]
        nll = score_fn(x, y, idx + 1).double()
        plain, nll = (nll, nll) if nll.dim() == 2 else nll  # with hints: (untilted, tilted)
        mask = (pos[None, :] >= first[:, None]) & valid[:, None]
        sums[0] += (nll * mask).sum()
        sums[3] += (plain * mask).sum()
        sums[1] += (byte_source.target_bytes(x, y, idx + 1).double() * mask).sum()
        sums[2] += mask.sum()
        if on_score is not None:
            for s, ln, f in windows[b0:b0 + batch]:
                on_score(s + f, s + ln)
    return sums


def _metrics(sums):
    loss, nbytes, ntok, plain = (float(v) for v in sums)
    return {"val_loss": loss / ntok, "val_bpb": loss / math.log(2) / nbytes, "tokens": int(ntok), "bytes": int(nbytes),
            "untilted_bpb": plain / math.log(2) / nbytes}  # = val_bpb without n-gram hints


def evaluate(score_fn, tokens, byte_source, seq_len, stride, batch, run, on_score=None):
    """val_loss, val_bpb over all targets of `tokens` (stride = seq_len: non-overlapping)."""
    n = tokens.numel() - 1
    seq_len = min(seq_len, n)
    mine = rank_share(sliding_windows(n, seq_len, stride), run.rank, run.world_size)
    return _metrics(_all_reduce_sum(score_windows(score_fn, tokens, byte_source, mine, batch, run.device, on_score)))


def make_score_fn(model, device, hints=None, beta=0.0, lift=0.0, compile=False):
    """score(x, y, y_pos) -> per-target nll; with `hints`, (untilted, tilted by `hints[y_pos]`) stacked,
    the tilt NGRAM_BETA's `beta` or NGRAM_LIFT's `lift` (tilted_nll). `compile`: the model and the
    tilt in one compiled graph, as the model alone would be (the float logits stay inside it)."""
    nll = torch.compile(target_nll, dynamic=False) if compile else target_nll

    def score(x, y, y_pos):
        with _autocast(device):
            return nll(model, x, y, None if hints is None else hints[y_pos], beta, lift)
    return score


# ----- token n-gram tilt: hints from the tokens before each target (known once they are scored)

_CTX_MUL, _PAIR_MUL, _GROUP_MUL = -7046029254386353131, -4417276706812531889, 1609587929392839161  # odd; int64 wraps


def _earlier_events(keys, time):
    """Per event (a key at a time; ties: scored together): how many events of its key come before
    it (earlier time, or the same time and a lower index), how many of them at an earlier time
    (`seen`: those it may use), and the index of the last of these (-1: none)."""
    by_time = torch.sort(time, stable=True).indices
    order = by_time[torch.sort(keys[by_time], stable=True).indices]  # by key, then time, then index
    sk, st = keys[order], time[order]
    k = torch.arange(sk.numel(), device=keys.device)
    new_key = torch.ones_like(sk, dtype=torch.bool)
    new_key[1:] = sk[1:] != sk[:-1]
    new_block = new_key.clone()
    new_block[1:] |= st[1:] != st[:-1]
    key_start = torch.cummax(torch.where(new_key, k, 0), 0).values
    block_start = torch.cummax(torch.where(new_block, k, 0), 0).values
    before, seen, last = (torch.empty_like(k) for _ in range(3))
    before[order], seen[order] = k - key_start, block_start - key_start
    last[order] = torch.where(block_start > key_start, order[(block_start - 1).clamp_min(0)], -1)
    return before, seen, last


def document_starts(tokens, bos_id):
    """Per position, where its document starts (its BOS; 0 before the first)."""
    i = torch.arange(tokens.numel(), device=tokens.device)
    return torch.cummax(torch.where(tokens == bos_id, i, 0), 0).values


def ngram_hints(tokens, args, schedule=None):
    """hints[k] for the target tokens[k] (-1: none; hints[0] = -1). Each target, once scored, is an
    event: its contexts tokens[k-n:k] inside its document, and itself. `schedule`: (phase, lane,
    step) per target (None: the stream's order, a phase per target); target k may use the events of
    earlier phases and those of its own lane (rank) in its phase at earlier steps: tokens scored
    before it on any reading of "before". Of its contexts (NGRAM_MIN <= n <= NGRAM_MAX) seen at
    least NGRAM_MIN_COUNT times so, the longest proposes what followed its latest occurrence: a
    hint if at least NGRAM_CONF of those occurrences went on so."""
    t = tokens.long()
    n_in = t.numel() - 1  # input i predicts t[i + 1]
    if schedule is None:
        phase, lane_step = torch.arange(1, n_in + 1, device=t.device), None
    else:
        phase, lane, step = (x[1:].to(t.device) for x in schedule)
        lane_step = (phase * (int(lane.max()) + 1) + lane, step)  # (phase, lane) as one group
    room = torch.arange(n_in, device=t.device) - document_starts(t, args.bos_id)[:n_in] + 1  # BOS..i
    hint = torch.full((n_in,), -1, dtype=torch.long, device=t.device)
    conf = torch.zeros(n_in, device=t.device)
    ctx = torch.zeros(n_in, dtype=torch.long, device=t.device)
    for n in range(1, min(args.ngram_max, n_in) + 1):
        ctx[n - 1:] = ctx[n - 1:] * _CTX_MUL + t[:n_in - n + 1] + 1  # ctx[i]: t[i-n+1..i]
        if n < args.ngram_min:
            continue
        inside = torch.nonzero(room >= n).flatten()  # contexts that stay in their document
        keys = ctx[inside]
        pairs = keys * _PAIR_MUL + t[inside + 1] + 1  # context and what followed
        _, seen, last = _earlier_events(keys, phase[inside])  # earlier phases
        pair_before, pair_seen, _ = _earlier_events(pairs, phase[inside])
        j = last.clamp_min(0)
        agree = pair_before[j] + 1
        if lane_step is not None:  # and this lane's earlier steps of this phase: later than all those
            group, step = (x[inside] for x in lane_step)
            _, seen_b, last_b = _earlier_events(keys * _GROUP_MUL + group, step)
            pair_before_b, _, _ = _earlier_events(pairs * _GROUP_MUL + group, step)
            jb = last_b.clamp_min(0)
            mine = seen_b > 0
            agree = torch.where(mine, pair_before_b[jb] + 1 + pair_seen[jb], agree)
            j, seen = torch.where(mine, jb, j), seen + seen_b
        has = seen >= max(1, args.ngram_min_count)  # longer contexts found override shorter ones
        share = agree.float() / seen.clamp_min(1).float()
        hint[inside] = torch.where(has, t[inside[j] + 1], hint[inside])
        conf[inside] = torch.where(has, share, conf[inside])
    return torch.cat((hint.new_full((1,), -1), torch.where(conf >= args.ngram_conf, hint, -1)))


def ttt_schedule(tokens, args, world_size):
    """(phase, lane, step) per target of `tokens` as TTT scores it on `world_size` ranks: the phase
    (from 1), the rank (lane) and that rank's chunk step within the phase (target 0: zeros)."""
    spans = document_spans(tokens, args.bos_id)
    phase, lane, step = (torch.zeros(tokens.numel(), dtype=torch.long) for _ in range(3))
    for rank in range(world_size):
        for ph, mine in enumerate(ttt_phase_shares(spans, args, Run(rank, world_size))):
            k = 0  # the phase's steps count on across its passes
            for p in ttt_passes(args):
                lanes = Lanes(p.docs(mine), args.ttt_batch_docs, p.chunk)
                for _ in lanes.steps():
                    for lo, hi in lanes.scored_ranges():  # targets lo+1..hi
                        phase[lo + 1:hi + 1], lane[lo + 1:hi + 1], step[lo + 1:hi + 1] = ph + 1, rank, k
                    k += 1
    return phase, lane, step


def tilted_nll(logits, y, hints, beta, lift=0.0):
    """(-log p(y), -log p'(y)) with p'(a) = p(a) e^(beta [a = h]) / (1 + p(h) (e^beta - 1)): the
    hint h's probability scaled up, renormalised over the whole vocabulary; no hint: p' = p. With
    `lift` > 0, beta per target raises p(h) to `lift` where below it (p'(h) = max(p(h), lift))."""
    logits = logits.float()
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").view(y.shape)  # as unhinted
    lse = torch.logsumexp(logits, -1)
    # the shift only scores, it never trains: detached, so where the model is sure of a hint
    # (p(h) = 1, log-odds inf) no 0 x inf reaches the adapters' gradients
    log_ph = (logits.gather(-1, hints.clamp_min(0)[..., None]).squeeze(-1) - lse).detach()
    return nll, nll + torch.where(hints >= 0, tilt_shift(log_ph, (y == hints).float(), beta, lift), 0)


def tilt_shift(log_ph, right, beta, lift=0.0):
    """A hinted target's -log p'(y) - (-log p(y)), from log p(hint) and [y = hint] (tilted_nll)."""
    if lift > 0:  # p'(h) = max(p(h), lift), the rest x (1 - p'(h)) / (1 - p(h)): closed form, no overflow
        hit = (log_ph - math.log(lift)).clamp_max(0)
        miss = (torch.log(-torch.expm1(log_ph)) - math.log1p(-lift)).clamp_min(0)
        return torch.where(right > 0, hit, miss)
    if torch.is_tensor(beta):
        return torch.log1p(torch.expm1(beta) * log_ph.exp()) - beta * right
    # a setting: e^beta - 1 on the host, in log_ph's precision (no host-to-device copy: TTT captures
    # this in a CUDA graph)
    scale = torch.tensor(beta, dtype=log_ph.dtype).expm1().item()
    return torch.log1p(scale * log_ph.exp()) - beta * right


def target_nll(model, x, y, hints=None, beta=0.0, lift=0.0, cache=None):
    """`model`'s per-target nll of `y` given `x`; with `hints` (per target, -1: none), the
    (untilted, tilted) nll stacked (tilted_nll with `beta`, `lift`)."""
    if hints is None:
        return model(x, y, reduction="none", cache=cache)
    return torch.stack(tilted_nll(model(x, cache=cache), y, hints, beta, lift))


class DocAdapters:
    """Per-document rank-r LoRA of each bank matrix and the head: x A^T B^T, B zero-init; row i
    of x is a document's; AdamW per row, each row counting its steps since its reset. A CUDA graph
    replays `step` with the numbers it was captured with: what may change between steps is a
    device tensor changed in place (the learning rate `lr`: `lr.fill_(v)`; the step counts),
    the rest are settings."""

    def __init__(self, args, docs, device):
        d, kv, hid, r = args.model_dim, args.num_kv_heads * args.head_dim, args.mlp_hidden, args.ttt_rank
        io = {"qkv": (d, d + 2 * kv), "out": (d, d), "up": (d, hid), "down": (hid, d)}
        io = {(l, k): v for l in range(args.num_layers) for k, v in io.items()} | {(-1, "head"): (d, args.vocab_size)}
        self.A = {k: torch.zeros(docs, r, i, device=device, requires_grad=True) for k, (i, o) in io.items()}
        self.B = {k: torch.zeros(docs, o, r, device=device, requires_grad=True) for k, (i, o) in io.items()}
        self.params = list(self.A.values()) + list(self.B.values())
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]
        self.steps = torch.zeros(docs, device=device)
        # float64: the decay 1 - lr * wd rounds as it did from Python numbers
        self.lr = torch.tensor(args.ttt_lr, dtype=torch.float64, device=device)
        self.wd, self.b1, self.b2, self.eps = args.ttt_wd, args.ttt_beta1, args.ttt_beta2, args.ttt_eps
        self.scale = args.ttt_alpha / r if args.ttt_alpha > 0 else 1.0
        self.keep_a, self.fresh_a = args.ttt_keep_a, torch.ones(docs, dtype=torch.bool, device=device)
        self.gen = torch.Generator(device=device).manual_seed(args.seed)

    @torch.no_grad()
    def reset(self, rows):
        """Fresh adapters and Adam state for `rows` (an index tensor); with TTT_KEEP_A, a row's A
        is drawn once and then learns on across its documents."""
        redraw = (self.fresh_a[rows] | (not self.keep_a)).view(-1, 1, 1)  # no host sync
        for k, A in self.A.items():
            new = torch.randn(len(rows), *A.shape[1:], generator=self.gen, device=A.device) * A.size(-1) ** -0.5
            A[rows] = torch.where(redraw, new, A[rows])
            self.B[k][rows] = 0
        self.fresh_a[rows] = False
        for m, v in self.moments:
            m[rows], v[rows] = 0, 0
        self.steps[rows] = 0

    @torch.no_grad()
    def step(self):
        b1, b2, eps = self.b1, self.b2, self.eps
        self.steps += 1
        c1, c2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
        decay = 1 - self.lr * self.wd
        for p, (m, v) in zip(self.params, self.moments):
            g, shape = p.grad, (-1,) + (1,) * (p.dim() - 1)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.mul_(decay).sub_(self.lr * (m / c1.view(shape)) / ((v / c2.view(shape)).sqrt_() + eps))
            g.zero_()

    def __call__(self, layer, kind, x):
        A, B = self.A[(layer, kind)], self.B[(layer, kind)] * self.scale
        return torch.bmm(torch.bmm(x, A.mT.to(x.dtype)), B.mT.to(x.dtype))


class KVCache:
    """Per layer pass, each row's last `keep` keys (pre-RoPE) and values, detached, and (`prev`)
    its last token (the smear's), in fixed buffers updated in place (slots before a document's start are
    masked): a chunk step has fixed shapes and addresses, so one CUDA graph replays it."""

    def __init__(self, keep, rows, chunk, bos_id, device):
        self.keep, self.bos_id, self.kv = keep, bos_id, {}
        self.prev = torch.full((rows, 1), bos_id, device=device)
        self.mask = torch.zeros(rows, 1, chunk, keep + chunk, dtype=torch.bool, device=device)

    def start(self, c, fresh=None):
        """Before each row's chunk c (a (rows,) tensor): its chunk c - 1 is cached (c = 0 masks
        all of it); rows `fresh` (an index tensor) start a document."""
        C, K = self.mask.size(2), self.keep
        if fresh is not None:
            self.prev[fresh] = self.bos_id
        j, i = torch.arange(K + C, device=c.device), torch.arange(C, device=c.device)[:, None]
        self.mask.copy_((j >= K - (c * C).clamp(max=K)[:, None, None, None]) & (j <= K + i))

    def chunk(self, ids):
        """The tokens before chunk `ids` and its mask over cache + chunk."""
        prev = self.prev.clone()
        self.prev.copy_(ids[:, -1:])
        return prev, self.mask

    def extend(self, slot, k, v):
        if slot not in self.kv:
            self.kv[slot] = tuple(t.new_zeros(t.size(0), self.keep, *t.shape[2:]) for t in (k, v))
        k, v = (torch.cat(pair, 1) for pair in zip(self.kv[slot], (k, v)))
        for buf, t in zip(self.kv[slot], (k, v)):
            buf.copy_(t[:, -self.keep:].detach())
        return k, v


def _to_device(values, device):
    """`values` on `device` from pinned memory: the host does not wait for the GPU."""
    t = torch.tensor(values)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def document_spans(tokens, bos_id):
    """(start, end) of every document's inputs; the spans cover every target once."""
    n = tokens.numel() - 1
    starts = [0] + [int(i) for i in torch.nonzero(tokens[1:n] == bos_id).flatten() + 1]
    return list(zip(starts, starts[1:] + [n]))


def ttt_phase_shares(spans, args, run):
    """Each phase's documents (TTT_PHASES consecutive parts of the split), this rank's share of
    each, longest first."""
    per_phase = -(-len(spans) // args.ttt_phases)
    for ph in range(0, len(spans), per_phase):
        yield sorted(spans[ph:ph + per_phase], key=lambda se: se[0] - se[1])[run.rank::run.world_size]


class ChunkPass(NamedTuple):
    """One lanes pass of a TTT phase: its documents of more than `longer_than` and at most `up_to`
    targets, in chunks of `chunk` tokens that attend to the `keep` tokens before them (cached)."""
    chunk: int
    keep: int
    longer_than: int = 0
    up_to: float = math.inf

    def docs(self, mine):
        return [(s, e) for s, e in mine if self.longer_than < e - s <= self.up_to]


def ttt_passes(args):
    """The lanes passes of every TTT phase, in the order they run: all documents in chunks of
    TTT_CHUNK; with TTT_SHORT_CHUNK, only those of more than TTT_SHORT_LEN targets (0: TTT_CHUNK),
    then the short ones in chunks of TTT_SHORT_CHUNK, each chunk seeing all of its document before
    it. Long documents first: they keep the queue's order (longest first, the short ones were its
    tail), and where TTT_MAX_SECONDS stops the adapting within a phase, the documents that gain
    least from it lose it."""
    main = ChunkPass(args.ttt_chunk, args.eval_seq_len - args.ttt_chunk)
    if not args.ttt_short_chunk:
        return [main]
    C, short = args.ttt_short_chunk, args.ttt_short_len or args.ttt_chunk
    keep = min(args.eval_seq_len, -(-short // C) * C) - C  # a short document's chunks before its last
    return [main._replace(longer_than=short), ChunkPass(C, keep, up_to=short)]


class Lanes:
    """TTT_BATCH_DOCS rows, each running documents one after another, the next (longest first) as
    soon as its own ends: per row, its document's start and length and the chunk it is at."""

    def __init__(self, docs, rows, chunk_len):
        self.queue, self.chunk_len = iter(docs), chunk_len
        self.start, self.length, self.chunk = [0] * rows, [0] * rows, [0] * rows

    def refill(self):
        """Rows done with their document take the next (none left: an empty row) -> the fresh rows."""
        for r in range(len(self.start)):
            if self.chunk[r] * self.chunk_len >= self.length[r]:
                s, e = next(self.queue, (0, 0))
                self.start[r], self.length[r], self.chunk[r] = s, e - s, 0
        return [r for r in range(len(self.start)) if self.chunk[r] == 0 < self.length[r]]

    def busy(self):
        return any(self.length)

    def steps(self):
        """Walk the chunk steps until every document is done: per step (before advancing past it),
        the rows that start a document."""
        while True:
            fresh = self.refill()
            if not self.busy():
                return
            yield fresh
            self.advance()

    def a_later_chunk_learns(self):
        return any((k + 1) * self.chunk_len < n for k, n in zip(self.chunk, self.length))

    def scored_ranges(self):
        """The token ranges this step scores."""
        C = self.chunk_len
        return [(s + k * C, s + min(n, (k + 1) * C)) for s, n, k in zip(self.start, self.length, self.chunk) if n > k * C]

    def advance(self):
        self.chunk = [k + 1 for k in self.chunk]


def ttt_global_pass(model, tokens, docs, args, run, monitor=None):
    """Between phases: SGD (TTT_GLOBAL_MOMENTUM) on the documents just scored, in rows of EVAL_SEQ_LEN
    tokens; every rank takes as many steps, gradients averaged over all rows of all ranks."""
    window, rows, micro, device = args.eval_seq_len, args.ttt_batch_docs, args.ttt_global_micro_rows, run.device
    xs = torch.cat([tokens[s:e] for s, e in docs] + [tokens[:0]])
    ys = torch.cat([tokens[s + 1:e + 1] for s, e in docs] + [tokens[:0]])
    have = xs.numel() // window  # whole rows
    haves = torch.zeros(run.world_size, device=device)
    haves[run.rank] = have
    _all_reduce_sum(haves)
    sgd = torch.optim.SGD(model.parameters(), lr=args.ttt_global_lr, momentum=args.ttt_global_momentum)
    # the global pass packs the shortest documents together, denser than any validation window
    with model.attention.room_for(xs[:have * window].view(-1, window), args.bos_id):
        for r0 in range(0, int(haves.max()), rows):
            r1 = min(r0 + rows, have)
            step_rows = float((haves - r0).clamp(0, rows).sum())  # mean over all ranks
            for m0 in range(r0, r1, micro):
                m1 = min(m0 + micro, r1)
                with _autocast(device):
                    loss = model(xs[m0 * window:m1 * window].view(-1, window), ys[m0 * window:m1 * window].view(-1, window))
                (loss * ((m1 - m0) * run.world_size / step_rows)).backward()
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat_all_reduce_avg([p.grad for p in model.parameters()])()
            sgd.step()
            sgd.zero_grad(set_to_none=True)
            if monitor is not None and r1 > r0:
                monitor("global", r0 * window, r1 * window)  # offsets in this rank's rows


class TTTChunkStep:
    """A chunk step of TTT's lanes at one ChunkPass's chunk length: TTT_BATCH_DOCS rows in fixed
    buffers (inputs, targets, the targets' positions in the stream, which are inside a document, the
    hints) with their own key/value cache; scores into `sums` (as score_windows'), then, training,
    steps each row's adapters on its own mean untilted loss. On CUDA, scoring and scoring then
    training are each one captured graph: kernel launches, not the GPU, bound the eager step."""

    def __init__(self, model, adapters, byte_source, sums, chunk_pass, args, device, hinted):
        rows, C = args.ttt_batch_docs, chunk_pass.chunk
        self.model, self.adapters, self.byte_source, self.sums, self.args = model, adapters, byte_source, sums, args
        self.cache = KVCache(chunk_pass.keep, rows, C, args.bos_id, device)
        self.x, self.y = (torch.full((rows, C), v, device=device) for v in (args.bos_id, 0))
        self.y_pos = torch.ones(rows, C, dtype=torch.long, device=device)  # the targets' positions in `tokens`
        self.inside = torch.zeros(rows, C, dtype=torch.bool, device=device)
        self.hint = torch.full((rows, C), -1, device=device) if hinted else None
        self.run = {t: functools.partial(self.step, t) for t in (True, False)}
        if device.type == "cuda":  # the warm-ups score and train on empty rows: the caller resets `sums`
            self.cache.start(torch.zeros(rows, dtype=torch.long, device=device))
            self.run = {t: _cuda_graph(f) for t, f in self.run.items()}

    def load(self, lanes, fresh, tokens, hints):
        """Each row's chunk at `lanes`' step; the rows `fresh` start a document: adapters reset."""
        C, device = self.x.size(1), self.x.device
        c, ln, st = _to_device([lanes.chunk, lanes.length, lanes.start], device)[:, :, None]
        fresh = _to_device(fresh, device) if fresh else None
        if fresh is not None:
            self.adapters.reset(fresh)
        self.cache.start(c[:, 0], fresh)
        pos = c * C + torch.arange(C, device=device)
        self.inside.copy_(pos < ln)  # after a document's end: never attended
        idx = st + torch.where(self.inside, pos, 0)
        self.x.copy_(torch.where(self.inside, tokens[idx], self.args.bos_id))
        self.y.copy_(torch.where(self.inside, tokens[idx + 1], 0))
        if self.hint is not None:
            self.hint.copy_(torch.where(self.inside, hints[idx + 1], -1))
        self.y_pos.copy_(idx + 1)

    def step(self, train):  # fixed shapes: the buffers, the cache and the adapters in place
        args, x, y, inside = self.args, self.x, self.y, self.inside
        with torch.set_grad_enabled(train), _autocast(x.device):
            out = target_nll(self.model, x, y, self.hint, args.ngram_beta, args.ngram_lift, self.cache).float()
        nll, scored = (out, out) if self.hint is None else (out[0], out[1])  # adapters learn the model's own loss
        nll, scored = (torch.where(inside, t, 0) for t in (nll, scored))
        nbytes = (self.byte_source.target_bytes(x, y, self.y_pos) * inside).sum()
        self.sums.add_(torch.stack([scored.detach().sum(), nbytes, inside.sum(), nll.detach().sum()]).double())
        if train:  # each document's adapters get their own mean loss
            (nll.sum(1) / inside.sum(1).clamp_min(1)).sum().backward()
            self.adapters.step()

    def __call__(self, train):
        self.run[train]()


def evaluate_with_ttt(model, tokens, byte_source, args, run, monitor=None, started=None, hints=None):
    """Score-first TTT: each TTT_CHUNK is scored, then trains its document's adapters; between
    phases, SGD on the scored documents. Chunks attend to cached keys of the document's last
    EVAL_SEQ_LEN - TTT_CHUNK tokens; with TTT_SHORT_CHUNK, each phase's short documents follow
    in smaller chunks (ttt_passes). The scores are tilted by `hints` (per position of `tokens`)
    if given, the adapters learn the untilted loss; adaptation stops TTT_MAX_SECONDS after `started` (the
    evaluation's start; default: now). `monitor` is for tests."""
    rows, device = args.ttt_batch_docs, run.device
    spans = document_spans(tokens, args.bos_id)
    model.eval().qat_mix.zero_()
    model.requires_grad_(False)
    adapters = DocAdapters(args, rows, device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # as score_windows'
    if run.world_size > 1:
        dist.barrier()
    t0, adapting, stopped, steps, n_tok = time.perf_counter(), True, False, 0, 0
    stop_at = (started or t0) + args.ttt_max_seconds
    model.adapters, passes = adapters, ttt_passes(args)
    chunk_steps = [TTTChunkStep(model, adapters, byte_source, sums, p, args, device, hints is not None) for p in passes]
    sums.zero_()  # the CUDA graphs' warm-ups scored empty rows
    shares = list(ttt_phase_shares(spans, args, run))
    if len(passes) > 1:
        short = passes[-1].docs(spans)
        run.log(f"ttt short lane: {len(short)} documents of <= {passes[-1].up_to} targets "
                f"({sum(e - s for s, e in short)} targets) in chunks of {passes[-1].chunk}, after the others in each phase")
    for phase, mine in enumerate(shares):
        for p, chunk_step in zip(passes, chunk_steps):
            lanes = Lanes(p.docs(mine), rows, p.chunk)
            for fresh in lanes.steps():
                chunk_step.load(lanes, fresh, tokens, hints)
                adapting = adapting and time.perf_counter() < stop_at  # local clock: this rank's adapters only
                train_now = adapting and lanes.a_later_chunk_learns()
                chunk_step(train_now)
                ranges = lanes.scored_ranges()
                n_tok += sum(hi - lo for lo, hi in ranges)
                steps += train_now
                for kind in ("score", "train")[:1 + train_now] if monitor else ():
                    for lo, hi in ranges:
                        monitor(kind, lo, hi)
        over = torch.tensor(float(not adapting or time.perf_counter() >= stop_at), device=device)
        if run.world_size > 1:
            dist.all_reduce(over, op=dist.ReduceOp.MAX)
        if over.item() and not stopped:
            run.log(f"ttt: {args.ttt_max_seconds}s into the evaluation after {steps} adapter steps; scoring only from here")
        adapting, stopped = not over.item(), bool(over.item())
        if adapting and phase + 1 < len(shares):
            model.requires_grad_(True).adapters = None
            ttt_global_pass(model, tokens, mine, args, run, monitor)
            model.requires_grad_(False).adapters = adapters
        run.log(f"ttt phase {phase + 1}/{len(shares)} done at {time.perf_counter() - t0:.1f}s: "
                f"{n_tok} targets scored here, {steps} adapter steps, val_bpb so far "
                + (f"{_metrics(sums)['val_bpb']:.5f}" if n_tok else "-"))
    model.requires_grad_(True).adapters = None
    out = _metrics(_all_reduce_sum(sums))
    seconds = time.perf_counter() - t0
    total = _all_reduce_sum(torch.tensor(float(n_tok), dtype=torch.float64, device=device)).item()
    out.update(ttt_steps=steps, seconds=seconds, tokens_per_s_per_gpu=total / seconds / run.world_size)
    return out


# ----- evaluation of the artifact

def _scores(r):
    return f"val_loss:{r['val_loss']:.8f} val_bpb:{r['val_bpb']:.8f}"


def _check_finite(r, label):
    bad = [k for k in ("val_bpb", "untilted_bpb") if k in r and not math.isfinite(r[k])]
    if bad:
        raise ScoreError(f"the {label} score is {r[bad[0]]} ({bad[0]}): not a result; no results file or "
                         f"submission.json is written")


def _untilted(r, tilted):  # the same pass's score without the n-gram hints: the tilt's ablation row
    return f"untilted val_bpb {r['untilted_bpb']:.8f}, tilt {r['val_bpb'] - r['untilted_bpb']:+.5f}; " if tilted else ""


def evaluate_artifact(args, model, path, val_tokens, byte_source, run, started, entries=None):
    """Load the artifact (or its decoded `entries`) into `model`; plain, sliding, TTT evaluation;
    the time since `started` (the evaluation's start) against the limit."""
    t0 = time.perf_counter()
    entries = entries or load_artifact(path)[0]
    try:
        model.load_state_dict(dequantize_entries(entries, args), strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path}: its tensors do not match the model its header describes ({first})") from None
    model.eval()
    run.timer.since("eval_artifact_load", t0)
    hints = ttt_hints = None
    tilt = "n-gram tilt, " if args.ngram_tilt else ""
    if args.ngram_tilt:  # on the evaluation's clock, for the scorers that run; TTT scores in its own order
        t0 = time.perf_counter()
        orders = {}
        if not args.skip_sliding_eval:
            orders["stream order"] = hints = ngram_hints(val_tokens, args)
        if args.ttt_enabled:
            orders["TTT's order"] = ttt_hints = ngram_hints(val_tokens, args, ttt_schedule(val_tokens.cpu(), args, run.world_size))
        run.timer.since("eval_ngram_hints", t0)
        for name, h in orders.items():
            hinted = h[1:] >= 0
            right = float((h[1:] == val_tokens[1:])[hinted].float().mean()) if bool(hinted.any()) else 0.0
            run.log(f"n-gram tilt ({name}): hints for {float(hinted.float().mean()):.1%} of the targets "
                    f"(after the fact: {right:.1%} of them right); " + (f"lift to {args.ngram_lift}" if args.ngram_lift > 0
                                                                          else f"beta {args.ngram_beta}"))
        run.log(f"n-gram hints built in {time.perf_counter() - t0:.1f}s")
    res = {}

    def timed_eval(key, phase, label, stride, note="", hints=None):
        t0 = time.perf_counter()
        score = make_score_fn(model, run.device, hints, args.ngram_beta, args.ngram_lift, _use_compile(args, run.device))
        res[key] = evaluate(score, val_tokens, byte_source, args.eval_seq_len, stride, args.eval_batch_seqs, run)
        run.timer.since(phase, t0)
        run.log(f"final_int{args.quant_bits}_{label} {_scores(res[key])} ({note}{_untilted(res[key], hints is not None)}"
                f"{time.perf_counter() - t0:.1f}s)")
        _check_finite(res[key], label)

    # the round trip, a diagnostic against the float score, untilted
    timed_eval("roundtrip", "eval_roundtrip_plain", "roundtrip", args.eval_seq_len)
    if not args.skip_sliding_eval:
        timed_eval("sliding", "eval_sliding", "sliding_window", args.eval_stride, f"{tilt}stride {args.eval_stride}, ", hints)
    if args.ttt_enabled:
        t0 = time.perf_counter()
        res["ttt"] = t = evaluate_with_ttt(model, val_tokens, byte_source, args, run, started=started, hints=ttt_hints)
        run.timer.since("eval_ttt", t0)
        ref = "sliding" if "sliding" in res else "roundtrip"
        run.log(f"final_int{args.quant_bits}_ttt {_scores(t)} ({tilt}{_untilted(t, args.ngram_tilt)}"
                f"{t['val_bpb'] - res[ref]['val_bpb']:+.5f} bpb vs {ref}, "
                f"{t['ttt_steps']} adapter steps, {t['seconds']:.1f}s, {t['tokens_per_s_per_gpu']:.0f} tokens/s per GPU)")
        _check_finite(t, "TTT")
        fineweb_tokens = FINEWEB_VAL_BYTES_EST * t["tokens"] / t["bytes"]
        run.log(f"ttt estimate (indicative): FineWeb's validation (~{FINEWEB_VAL_BYTES_EST / 1e6:.0f} MB, ~{fineweb_tokens / 1e6:.1f} M "
                f"tokens at this data's tokens per byte) on 8 GPUs of this speed: "
                f"~{fineweb_tokens / (8 * t['tokens_per_s_per_gpu']):.0f}s of TTT")
    res["seconds"] = secs = time.perf_counter() - started
    run.log(f"evaluation: {secs:.1f}s from its start to the last score (limit {EVAL_LIMIT_SECONDS}s)"
            + (": WARNING, NOT compliant" if secs > EVAL_LIMIT_SECONDS else ""))
    return res


def log_timing_table(run):
    run.log("phase timings:")
    for name, sec in run.timer.times.items():
        run.log(f"  {name:<34s} {sec:9.2f} s")


def size_varlen_segments(attention, val_tokens, args, run):
    """At evaluation time, with a varlen `attention` and DOC_MASK: room for every document start a
    scored row can hold."""
    if isinstance(attention, VarlenAttention) and args.doc_mask:
        window = args.eval_seq_len
        n = attention.size_for(val_tokens, args.bos_id, window)
        run.log(f"varlen attention: room for {n} document starts per row (the most any {window} validation "
                f"tokens hold)")


def score_float_weights(args, model, stats, val_tokens, byte_source, run):
    """Plain val_bpb of the final (averaged) float weights, then of the raw ones -> (result, raw bpb).
    Its compiled scorer is the artifact's round trip's: that one compiles nothing on the evaluation clock."""
    t0 = time.perf_counter()
    score = make_score_fn(model, run.device, compile=_use_compile(args, run.device))
    plain_eval = functools.partial(evaluate, score, val_tokens, byte_source,
                                   args.eval_seq_len, args.eval_seq_len, args.eval_batch_seqs, run)
    pre = plain_eval()
    run.log(f"prequant_float {_scores(pre)}" + (" (EMA weights)" if stats.raw_weights is not None else ""))
    raw_bpb = None
    if stats.raw_weights is not None:
        with torch.no_grad():
            for p, t in zip(model.parameters(), stats.raw_weights):
                p.copy_(t)
        raw_bpb = plain_eval()["val_bpb"]
        run.log(f"prequant_float_raw_weights val_bpb:{raw_bpb:.8f} (EMA {pre['val_bpb'] - raw_bpb:+.5f} bpb)")
    run.timer.since("eval_prequant_plain", t0)
    return pre, raw_bpb


# ----- the run: log, files, results, the phases

class Logger:
    """Rank 0 prints each line and writes it to the run's log, a file created new (never appended
    to: a run does not mix itself into another's)."""

    def __init__(self, path, rank):
        self.rank, self.file, self.path = rank, None, path
        self.whole = 0  # bytes of the log's lines written whole
        if path and rank == 0:
            try:
                self.file = open(path, "x")
            except FileExistsError:
                raise OutputError(f"{path} already exists: set another RUN_ID or OUT_DIR") from None
            except OSError as e:
                raise OutputError(f"cannot create the log {path}: {e.strerror}") from None

    def __call__(self, msg, stream=None):
        if self.rank != 0:
            return
        print(msg, file=stream or sys.stdout, flush=True)
        if self.file:
            try:
                self.file.write(msg + "\n")
                self.file.flush()
            except OSError as e:  # a full disk: the run stops here, its log cut back to its last whole line
                broken, self.file = self.file, None
                for undo in (broken.close, lambda: os.truncate(self.path, self.whole)):
                    with contextlib.suppress(OSError):
                        undo()
                raise OutputError(f"cannot write the log {self.path}: {e.strerror or e}") from None
            self.whole += len((msg + "\n").encode(self.file.encoding))

    def close_failed(self, line, keep):
        """The run failed: `line` ends its log; a log of a run whose work never began (settings and
        checks only) is removed instead, so that the corrected rerun can take its name."""
        if self.file:
            with contextlib.suppress(OSError):  # (the failure may be the log's own)
                if keep:
                    self.file.write(line + "\n")
                self.file.close()
        if not keep and self.path and self.rank == 0:
            with contextlib.suppress(OSError):
                os.remove(self.path)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or kill stopping the job): stops the run as Ctrl-C does."""
    what = "terminated (SIGTERM)"


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def failure_recorded(run):
    """A failure's error line in the run's log too (see Logger.close_failed)."""
    try:
        yield
    except BaseException as e:
        line = (f"error: {e.what}" if isinstance(e, Terminated) else "error: interrupted (Ctrl-C)"
                if isinstance(e, KeyboardInterrupt) else f"error: {e}"
                if isinstance(e, ONE_LINE_ERRORS) else f"error: {type(e).__name__}: {e}")
        if hasattr(run.log, "close_failed"):
            run.log.close_failed(line, keep=run.began)
        raise


def run_file_names(args, run_id):
    """The files a training run writes into OUT_DIR (submission.json is shared by a configuration's seeds)."""
    return {"log": f"train_{run_id}.log", "artifact": f"final_model_{run_id}.int{args.quant_bits}.ptz",
            "results": f"results_{run_id}.json"}


def claim_out_dir(out_dir, names):
    """Before any work: OUT_DIR is a folder this process can write, holding none of `names`."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"OUT_DIR={out_dir} is a file, not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write_test")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"OUT_DIR={out_dir} cannot be written: {e.strerror}") from None
    taken = [n for n in names if os.path.exists(os.path.join(out_dir, n))]
    if taken:
        raise OutputError(f"OUT_DIR={out_dir} already holds {', '.join(taken)}: set another RUN_ID or OUT_DIR "
                          "(a run never writes into another run's files)")


def check_submission_config(out_dir, config):
    """submission.json in OUT_DIR, if any, must be this configuration's (its seeds are averaged there)."""
    path = os.path.join(out_dir, "submission.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            theirs = json.load(f).get("config_id")
    except (OSError, ValueError, AttributeError):
        theirs = "unreadable"
    if theirs != config:
        raise OutputError(f"{path} belongs to configuration {theirs}, not this run's {config}: use another OUT_DIR")


def check_artifact_tokenizer(path, recorded, tokenizer_path, log):
    """The tokenizer that scores an artifact must be the one it was made with."""
    if recorded is None:
        log(f"warning: {path} records no tokenizer fingerprint (an older revision's): TOKENIZER_PATH is not checked")
        return
    mine = file_sha256(tokenizer_path)
    if mine != recorded:
        raise ArtifactError(f"{path} was made with the tokenizer of sha256 {recorded}; TOKENIZER_PATH={tokenizer_path} "
                            f"has {mine}: score it with its own tokenizer")


def check_artifact_byte_source(path, recorded, sidecar, args):
    """The bytes that score an artifact must be counted the way they were when it was made."""
    if recorded != sidecar:
        how = ("the byte sidecar", "the tokenizer's byte table")
        fix = f"BYTE_SIDECAR={int(recorded)}" + (" and a DATA_PATH with the sidecar" if recorded else "")
        raise ArtifactError(f"{path} was scored with {how[not recorded]}; {byte_sidecar_as_given()} with "
                            f"DATA_PATH={args.data_path} would use {how[not sidecar]}: set {fix}")


def warn_model_settings_overridden(args, config, log, env=None):
    """EVAL_ONLY scores the artifact as it was made: a model setting given in the environment that
    its header contradicts is not used, and the log says so (a warning, not a refusal: the
    training's own command line with EVAL_ONLY added must still score its artifact)."""
    env = os.environ if env is None else env
    for k, v in config.items():
        if k.upper() in env and getattr(args, k) != v:
            log(f"warning: {k.upper()}={getattr(args, k)} is not used: {args.eval_only} is a model with "
                f"{k.upper()}={v} (its header's value scores it)")


def run_eval_only(args, run):
    """EVAL_ONLY: score the artifact; reads no train shard."""
    t0 = time.perf_counter()
    entries, config = load_artifact(args.eval_only)  # decoded once
    run.timer.since("eval_artifact_load", t0)
    recorded_tokenizer = config.pop(TOKENIZER_KEY, None)
    recorded_sidecar = bool(config.pop(SIDECAR_KEY, False))
    header = settings_from_header(config, args.eval_only)
    warn_model_settings_overridden(args, header, run.log)
    args = dataclasses.replace(args, **header)  # its model part scores it
    check_memory_fits(args, run.world_size, run.device)
    luts = load_tokenizer_luts(args.tokenizer_path, args.vocab_size)
    check_artifact_tokenizer(args.eval_only, recorded_tokenizer, args.tokenizer_path, run.log)
    check_artifact_byte_source(args.eval_only, recorded_sidecar, use_byte_sidecar(args), args)
    attention, backend = choose_attention(args.attn_backend, run.device, args.doc_mask)
    val_tokens, byte_source, _, _ = load_scoring_data(args, run, luts)
    model_bytes, code_bytes = os.path.getsize(args.eval_only), code_as_shipped()[1]
    total = model_bytes + code_bytes
    run.log(f"eval-only: {args.eval_only} ({model_bytes} bytes + code {code_bytes} as shipped = {total}, cap "
            f"{ARTIFACT_CAP_BYTES}), {val_tokens.numel() - 1} val targets; attention {backend}; config: "
            f"{json.dumps(dataclasses.asdict(args), sort_keys=True)}")
    if total > ARTIFACT_CAP_BYTES:
        run.log(f"WARNING: artifact + code = {total} bytes > {ARTIFACT_CAP_BYTES}: NOT compliant")
    model = build_model(args, run.device, attention)
    size_varlen_segments(attention, val_tokens, args, run)
    run.began = True
    res = evaluate_artifact(args, model, args.eval_only, val_tokens, byte_source, run, t0, entries)
    log_timing_table(run)
    return res


def weights_checksum(model):
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def config_id(args, code, world_size, device_name):
    """Hash of code, machine and settings (not seed/output names): runs sharing it are seeds."""
    cfg = {k: v for k, v in dataclasses.asdict(args).items()
           if k not in ("seed", "run_id", "out_dir", "dist_timeout_seconds", "loader_prefetch")}  # no number's
    cfg["machine"] = f"{world_size}x {device_name}"
    return hashlib.sha256(code + json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def describe_stack(args):
    """(name, blurb) of submission.json, from the settings that ran."""
    data = ("CaseOps " if use_byte_sidecar(args) else "") + f"SP{args.vocab_size}"
    rec = args.recur_layer_list()
    recur = f"layers {rec[0]}-{rec[-1]} x{args.recur_passes + 1} from {args.recur_start_frac:.0%}" if rec else ""
    model = ", ".join(x for x in (f"MLP {args.mlp_mult:g}x", recur and "depth recurrence",
                                  args.doc_mask and "document-masked attention") if x)
    evals = ", ".join(x for x in (args.ttt_enabled and "score-first LoRA TTT",
                                  args.ngram_tilt and "token n-gram tilt") if x)
    name = f"{data} {args.num_layers}L XSA GPT, {model}, GPTQ int{args.quant_bits} + rANS" + (f", {evals}" if evals else "")
    blurb = (f"{data} {args.num_layers}L XSA GPT (MLP {args.mlp_mult:g}x{', ' + recur if recur else ''}, gated skips, "
             f"parallel lanes, attention gate{', document masking' if args.doc_mask else ''}), Polar-Express MuonEq-R, "
             f"run-relative schedule, late QAT, full-Hessian GPTQ, rANS to the cap"
             + (f"; {evals}" if evals else "") + ".")
    return name, blurb


def write_submission(out_dir, path, config):
    """submission.json from configuration `config`'s results_*.json, last one per seed."""
    runs = {}
    for f in glob.glob(os.path.join(glob.escape(out_dir), "results_*.json")):
        with open(f) as fh:
            r = json.load(fh)
        if r.get("config_id") == config and r.get("finished", 0) >= runs.get(r["seed"], {}).get("finished", 0):
            runs[r["seed"]] = r
    runs = [runs[s] for s in sorted(runs)]
    if not runs:
        raise DataError(f"no results_*.json of configuration {config} in {out_dir}: no measured run to report")
    env, last = os.environ, runs[-1]
    hardware = f"{last['world_size']}x {last['device']}"
    sub = {"author": env.get("AUTHOR", ""), "github_id": env.get("GITHUB_ID", ""),
           "name": env.get("RUN_NAME", last.get("name", "")), "blurb": env.get("BLURB", last.get("blurb", "")),
           "date": time.strftime("%Y-%m-%d"), "track": "10min_16mb", "config_id": config,
           **{k: sum(r[k] for r in runs) / len(runs) for k in ("val_loss", "val_bpb")},
           "seeds": [r["seed"] for r in runs],
           "seed_results": {str(r["seed"]): {k: r[k] for k in ("val_loss", "val_bpb", "artifact_bytes", "steps", "step_avg_ms")}
                            for r in runs},
           "bytes_total": max(r["artifact_bytes"] for r in runs), "bytes_code": last["code_bytes"],
           "hardware": hardware,
           "versions": {"torch": last["torch"], "python": last.get("python", "")},
           "data_note": "; ".join(x for x in (f"scored on {last['data']}" if last.get("data") else "",
                                              f"measured on {hardware}", last.get("note", "")) if x)}
    write_json(path, sub)
    return sub


def read_settings():
    """Settings from the environment; warnings kept for the log (printed once, by rank 0)."""
    warnings = []
    return Hyperparameters.from_env(warn=warnings.append), warnings


def start_run(args, warnings, run_files):
    """Settings checked and resolved, processes and device, OUT_DIR claimed for `run_files` (the log
    first), the log opened -> (settings, Run). A settings error claims no file: the corrected rerun
    is never refused."""
    args.validate(int(os.environ.get("WORLD_SIZE", 1)))
    rank, world_size, device = setup_distributed(args.device, args.dist_timeout_seconds)
    args = args.resolved(world_size, device)
    if not args.eval_only:  # EVAL_ONLY's model is the artifact's: checked once it is read
        check_training_fits(args, world_size, device)
    run = Run(rank, world_size, device)

    def claim():
        claim_out_dir(args.out_dir, run_files)
        return Logger(os.path.join(args.out_dir, run_files[0]), rank)
    run.log = on_rank0(claim, run, f"claim OUT_DIR={args.out_dir}") or Logger(None, rank)
    for w in warnings:
        run.log(w, stream=sys.stderr)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # dynamo caches per function (GPT.forward, target_nll): the training shapes and the scorers, > 8 graphs
    torch._dynamo.config.recompile_limit = 64
    return args, run


def device_memory_bytes(device):
    """A CUDA device's memory, else the machine's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def large_allocations(args, world_size, score_bytes):
    """The allocations that settings can make arbitrarily large -> {what sizes it: bytes}, each from
    below (the model, its other activations and optimizer state come on top); `score_bytes`: what the
    attention holds per (row, query, key) (0: a varlen kernel, no dense mask)."""
    d, kv, hid, heads = args.model_dim, args.num_kv_heads * args.head_dim, args.mlp_hidden, args.num_heads
    out = {}
    if args.ttt_enabled:  # each adapted matrix's in + out dims: qkv, out, up, down per layer, and the head
        dims = args.num_layers * (6 * d + 2 * kv + 2 * hid) + d + args.vocab_size
        out[f"TTT_BATCH_DOCS={args.ttt_batch_docs} x TTT_RANK={args.ttt_rank} (the TTT adapters: fp32 weights, "
            "gradients and two Adam moments)"] = args.ttt_batch_docs * args.ttt_rank * dims * 4 * 4

    def attention(rows, n):  # the rotary table, and a dense path's mask (and scores) per row
        return 4 * n * args.rope_dims + rows * n * n * score_bytes
    n = args.longest_train_seq
    train_rows = max(1, args.train_batch_tokens // (world_size * args.resolved_grad_accum(world_size) * n))
    name = "TRAIN_SEQ_LEN" if not args.train_seq_schedule.strip() else "TRAIN_SEQ_SCHEDULE's longest length"
    out[f"{name}={n} (attention over {train_rows} rows)"] = attention(train_rows, n)
    out[f"EVAL_SEQ_LEN={args.eval_seq_len} (attention over EVAL_BATCH_SEQS={args.eval_batch_seqs} rows)"] = \
        attention(args.eval_batch_seqs, args.eval_seq_len)
    calib_rows = min(8, -(-args.gptq_calib_seqs // world_size))  # collect_hessians' batches
    out[f"GPTQ_CALIB_LEN={args.gptq_calib_len} (calibration activations and attention)"] = \
        calib_rows * args.gptq_calib_len * (2 * hid + 4 * d) * 4 + attention(calib_rows, args.gptq_calib_len)
    return out


def check_memory_fits(args, world_size, device, total=None):
    """Refused before any work: a setting whose allocation alone exceeds the device's memory (it would
    die later, out of memory, its results lost). Only what clearly cannot fit."""
    total = total or device_memory_bytes(device)
    if device.type != "cuda" or args.attn_backend == "math":  # a bool mask and fp32 scores per head
        score_bytes = 1 + 4 * args.num_heads
    else:  # SDPA and Flex score with a dense bool mask in evaluation; auto may be varlen: none counted
        score_bytes = int(args.doc_mask and args.attn_backend in ("sdpa", "flex"))
    for what, need in large_allocations(args, world_size, score_bytes).items():
        if need > total:
            raise ConfigError(f"{what} needs ~{need / 2**30:,.1f} GiB, more than the {total / 2**30:,.1f} GiB of "
                              f"{device}: lower it")


def check_training_fits(args, world_size, device):
    """The settings checks that need the model's size, before any file is claimed: its parameters
    counted on the meta device (no memory, no time), the training budget after the GPTQ reserve,
    the artifact's model bytes, the device's memory."""
    with torch.device("meta"):
        model = GPT(args.model)
    training_budget(args, model, world_size)
    check_budget_fits(args, model, code_as_shipped()[1])
    check_memory_fits(args, world_size, device)


def check_budget_fits(args, model, code_bytes):
    """Model bytes left beside the code; refused before training if the model cannot pack that small."""
    budget = args.artifact_target_bytes - code_bytes
    least = least_model_bytes(model, args)
    if budget < least:
        raise ConfigError(f"ARTIFACT_TARGET_BYTES={args.artifact_target_bytes} leaves {budget} model bytes beside "
                          f"train_gpt.py's {code_bytes} as shipped; this model packs to no less than ~{least}")
    return budget


@dataclass
class Written:
    """The artifact as written (its bytes: rank 0's figures), the clip the rate control chose, the
    time it all took."""
    path: str
    model_bytes: int
    artifact_bytes: int
    clip_sigmas: float
    quant_seconds: float


def quantize_and_write(args, model, loader, budget_bytes, code_bytes, path, run, clock, byte_sidecar=False,
                       start_clip=None):
    """Calibration, GPTQ under rate control from `start_clip` (else CLIP_SIGMAS), the artifact written
    (atomically, by rank 0); it records the tokenizer and whether the byte sidecar scores it."""
    t_q = time.perf_counter()
    if not all(bool(p.isfinite().all()) for p in model.parameters()):  # on every rank
        raise ArtifactError("training diverged: non-finite weights")
    model.eval()
    hessians = collect_hessians(model, args, loader, run)
    run.timer.since("calibration_hessians", t_q)
    t0 = time.perf_counter()
    quantized = quantize_to_budget(model, hessians, args, budget_bytes, run, clock, file_sha256(args.tokenizer_path),
                                   byte_sidecar, start_clip=start_clip)
    run.timer.since("gptq_rate_control", t0)
    t0 = time.perf_counter()
    data, clip = quantized.data, quantized.clip_sigmas

    def write():
        if len(data) > budget_bytes:
            raise ArtifactError(f"the model needs {len(data)} bytes even at clip {clip:.2f} sigmas; the budget "
                                f"is {budget_bytes}: lower EMBED_BITS or the model size")
        return write_artifact(path, data, code_bytes)
    total = on_rank0(write, run, "write the artifact")
    run.timer.since("artifact_write", t0)
    model_bytes = len(data) if run.rank == 0 else 0  # the bytes exist on rank 0 only
    run.log(f"artifact: {path} model {model_bytes} bytes (rANS + lzma, clip {clip:.3f} sigmas) + "
            f"code {code_bytes} as shipped = {total} bytes (cap {ARTIFACT_CAP_BYTES})")
    return Written(path, model_bytes, total, clip, time.perf_counter() - t_q)


def log_wall_clock(args, stats, written, wall, log):
    budget_note = f" of the {args.max_wallclock_seconds:.0f}s budget" if args.max_wallclock_seconds > 0 else " (no wall-clock limit)"
    log(f"wall clock from the end of the compile warm-up to the artifact written: {wall:.1f}s{budget_note} "
        f"(training {stats.train_seconds:.1f}s, quantization {written.quant_seconds:.1f}s, reserve was "
        f"{stats.reserve_seconds:.1f}s)")
    if args.max_wallclock_seconds > 0 and wall > args.max_wallclock_seconds:
        log(f"WARNING: training + quantization took {wall:.1f}s > MAX_WALLCLOCK_SECONDS: this run is NOT compliant")


def check_ranks_agree(model, run):
    """Every rank must hold the same weights: show it."""
    sums = [weights_checksum(model)] * run.world_size
    if run.world_size > 1:
        dist.all_gather_object(sums, sums[0])
    same = " (identical)" if len(set(sums)) == 1 else " WARNING: ranks differ"
    run.log(f"weights checksum per rank: {' '.join(sums)}{same}")


def write_results(args, paths, cid, data, pre, raw_bpb, res, stats, written, wall, code_bytes, run, device_name):
    """results_<RUN_ID>.json, then submission.json over the configuration's seeds (rank 0)."""
    final = res.get("ttt", res.get("sliding", res["roundtrip"]))
    results = {"seed": args.seed, "config_id": cid, "val_loss": final["val_loss"], "val_bpb": final["val_bpb"],
               "prequant_val_bpb": pre["val_bpb"], "prequant_raw_val_bpb": raw_bpb,
               "roundtrip_val_bpb": res["roundtrip"]["val_bpb"],
               "sliding_val_bpb": res.get("sliding", {}).get("val_bpb"), "val_tokens": final["tokens"],
               "ngram_tilt": args.ngram_tilt, "untilted_val_bpb": final["untilted_bpb"],
               **dict(zip(("name", "blurb"), describe_stack(args))),
               "artifact_bytes": written.artifact_bytes, "model_bytes": written.model_bytes,
               "code_bytes": code_bytes, "clip_sigmas": written.clip_sigmas, "steps": stats.steps,
               "step_avg_ms": stats.step_avg_ms, "train_seconds": stats.train_seconds,
               "quant_seconds": written.quant_seconds, "wall_seconds": wall, "eval_seconds": res["seconds"],
               "peak_mem_mib": stats.peak_mem_mib, "world_size": run.world_size, "device": device_name, "data": data,
               "finished": time.time(), "torch": torch.__version__, "python": sys.version.split()[0],
               "note": os.environ.get("LOG_NOTE", ""), "phase_seconds": run.timer.times}
    write_json(paths["results"], results)
    write_submission(args.out_dir, os.path.join(args.out_dir, "submission.json"), cid)


def main():
    t_start = time.perf_counter()
    args, warnings = read_settings()
    run_id = args.run_id or f"seed{args.seed}"
    names = {"log": f"eval_{run_id}.log"} if args.eval_only else run_file_names(args, run_id)
    with peer_failures_named(args.dist_timeout_seconds):
        args, run = start_run(args, warnings, list(names.values()))
    with failure_recorded(run), peer_failures_named(args.dist_timeout_seconds):
        if args.eval_only:
            run_eval_only(args, run)
        else:
            train_and_score(args, run, {k: os.path.join(args.out_dir, n) for k, n in names.items()}, t_start)


def train_and_score(args, run, paths, t_start):
    """The training run, in its phases: checks, data, training, the artifact, its scores, results."""
    log = run.log
    code, code_bytes = code_as_shipped()
    device_name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu"
    cid = config_id(args, code, run.world_size, device_name)
    check_submission_config(args.out_dir, cid)
    attention, backend = choose_attention(args.attn_backend, run.device, args.doc_mask)
    model = build_model(args, run.device, attention)
    budget_bytes = check_budget_fits(args, model, code_bytes)
    if os.environ.get("LOG_NOTE"):
        log(f"note: {os.environ['LOG_NOTE']}")
    log(f"train_gpt.py: {code_bytes} bytes as shipped (counted; {len(code)} bytes of code less comments and "
        f"docstrings); profile {args.profile}; torch {torch.__version__}; world_size {run.world_size}; "
        f"device {device_name}; attention {backend}")
    log("config: " + json.dumps(dataclasses.asdict(args), sort_keys=True))

    luts = load_tokenizer_luts(args.tokenizer_path, args.vocab_size)
    train_files = find_shards(args.data_path, "train")
    val_tokens, byte_source, data, sidecar = load_scoring_data(args, run, luts, train_files)
    loader = DistributedLoader(train_files, args.vocab_size, run, args.loader_prefetch)
    groups = zip(("banks", "tables", "scalars"), model.param_groups())
    log(f"parameters: {_numel(model.parameters())} total = " + " + ".join(f"{k} {_numel(g)}" for k, g in groups))
    compiled = _maybe_compile(model, args, run.device)
    opt = Optimizers(model, args, run.world_size, run.device)
    run.timer.since("startup", t_start)

    clock = SharedClock(run)
    run.began = True
    stats = train(args, model, compiled, opt, loader, run, clock, budget_bytes)
    written = quantize_and_write(args, model, loader, budget_bytes, code_bytes, paths["artifact"], run, clock, sidecar,
                                 stats.qat_clip)
    loader.close()  # calibration read the last batches
    t_eval, wall = time.perf_counter(), clock.local()  # the evaluation's clock starts; training's ends
    log_wall_clock(args, stats, written, wall, log)
    check_ranks_agree(model, run)
    size_varlen_segments(attention, val_tokens, args, run)  # training's segments never saw the validation tokens
    pre, raw_bpb = score_float_weights(args, model, stats, val_tokens, byte_source, run)
    res = evaluate_artifact(args, model, paths["artifact"], val_tokens, byte_source, run, t_eval)
    log(f"quantization gap (plain): {res['roundtrip']['val_bpb'] - pre['val_bpb']:+.5f} bpb")
    log_timing_table(run)
    if run.rank == 0:
        write_results(args, paths, cid, data, pre, raw_bpb, res, stats, written, wall, code_bytes, run, device_name)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _raise_terminated)
    # every rank stops alike (the same settings and data, rank 0's failures broadcast): rank 0 says
    # why, once; a JobError or a RankError is said by each rank that has one
    rank = int(os.environ.get("RANK", 0))
    speaks = rank == 0
    try:
        main()
    except ONE_LINE_ERRORS as e:
        if speaks or isinstance(e, EVERY_RANK_SAYS):
            print(f"error: {f'rank {rank}: ' * isinstance(e, RankError)}{e}", file=sys.stderr, flush=True)
        code = 2
    except KeyboardInterrupt as e:
        if speaks:
            print(f"error: {getattr(e, 'what', 'interrupted (Ctrl-C)')}; files written so far are whole, none is "
                  "left partial", file=sys.stderr, flush=True)
        code = 143 if isinstance(e, Terminated) else 130
    except BaseException:
        traceback.print_exc()
        code = 1
    else:
        code = 0
        if dist.is_initialized():
            dist.destroy_process_group()
    # skip finalization: a failed rank must not wait for peers; a gloo thread freeing
    # tensors in it would take the GIL and abort
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
