"""Helpers shared by the test modules (importable: conftest puts tests/ on sys.path)."""
import math
import os
import re
import subprocess
import sys

import torch

import train_gpt as T
from tools.varlen_reference import REFERENCE_VARLEN, _reference_backward, _reference_forward  # noqa: F401 (the tests')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "train_gpt.py")
# the challenge's tokenizers, in the shared/ folder beside the checkout (CI has it there)
SHARED_TOKENIZERS = os.path.join(os.path.dirname(REPO_ROOT), "shared", "tokenizers")

# the tiny CPU model the tests share; each module sets what its tests need on top
TINY_MODEL = dict(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0, rope_dims=8, recur_passes=0, compile="0",
                  train_seq_schedule="")


def tiny_model_args(**kw):
    """Settings of a tiny CPU model: TINY_MODEL, then `kw`."""
    return T.Hyperparameters(**{**TINY_MODEL, **kw})


# the settings of test_model (3 layers, XSA on 2, vocab 64), shared with test_attention
def tiny_xsa_args(**kw):
    return tiny_model_args(**{**dict(vocab_size=64, num_layers=3, xsa_layers=2,
                                     train_seq_len=32, eval_seq_len=32, gptq_calib_len=64, seed=3, ttt_enabled=False),
                              **kw})


# the settings of test_quant (layer 1 recurrent, GPTQ calibration), shared with test_schedule
def tiny_quant_args(**kw):
    return tiny_model_args(**{**dict(vocab_size=512, train_seq_len=64, eval_seq_len=64, eval_stride=32,
                                     gptq_calib_seqs=12, gptq_calib_len=48, gptq_block=32, attn_backend="math", seed=7,
                                     recur_passes=2), **kw})  # layer 1 recurrent


# the settings of test_optimizer's tiny training runs on a data set, shared with test_schedule
def tiny_train_args(data_dir, vocab, **kw):
    return tiny_model_args(**{**dict(data_path=data_dir, vocab_size=vocab, train_seq_len=32,
                                     eval_seq_len=32, eval_stride=16, gptq_calib_len=32, train_batch_tokens=2 * 4 * 32,
                                     grad_accum_steps=2, device="cpu", max_wallclock_seconds=0.0,
                                     gptq_reserve_seconds=0.0, warmdown_frac=0.0, train_log_every=0, ema_horizon=0.0,
                                     qat_start_scale=0.0, seed=7, ttt_enabled=False), **kw})


def randomized_model(args, seed=0, emb_std=0.1):
    """A CPU model with every parameter non-trivial: the default init zeroes the output
    projections and the MLP down bank, which would hide attention
    (and make context irrelevant)."""
    model = T.build_model(args, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3:  # banks: (n, out, in)
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.size(-1)))
            elif name == "tok_emb.weight":
                p.copy_(torch.randn(p.shape, generator=g) * emb_std)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def use_varlen(monkeypatch, model, provider=REFERENCE_VARLEN):
    """Make `model` attend through `provider`'s varlen kernels (undone with the monkeypatch) -> the attention."""
    attention = T.VarlenAttention(provider)
    monkeypatch.setattr(model, "attention", attention)
    return attention


# ----------------------------------------------------------------------------- train_gpt.py in a subprocess

def clean_env(**kw):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    for f in T.Hyperparameters.__dataclass_fields__:  # no stray settings from the caller
        env.pop(f.upper(), None)
    env.update(OMP_NUM_THREADS="1", DEVICE="cpu", COMPILE="0", PYTHONDONTWRITEBYTECODE="1")
    env.update({k: v if isinstance(v, bytes) else str(v) for k, v in kw.items()})  # bytes: a path not in UTF-8
    return env


TINY_RUN = dict(VOCAB_SIZE=512, NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, RECUR_PASSES=0,
                ROPE_DIMS=8, TRAIN_SEQ_LEN=64, TRAIN_BATCH_TOKENS=512,
                GRAD_ACCUM_STEPS=1, ITERATIONS=4, MAX_WALLCLOCK_SECONDS=0, WARMUP_STEPS=1, WARMDOWN_FRAC=0.5,
                EVAL_SEQ_LEN=64, EVAL_STRIDE=32, EVAL_BATCH_SEQS=8, VAL_TOKENS_LIMIT=1024, GPTQ_CALIB_SEQS=4,
                GPTQ_CALIB_LEN=64, GPTQ_BLOCK=32, RUN_ID="t", SEED=1, TTT_ENABLED=0)


def final_line(text, kind):
    m = re.search(rf"^final_int6_{kind} val_loss:(\S+) val_bpb:(\S+)", text, re.M)
    assert m, f"no final_int6_{kind} line in:\n{text[-3000:]}"
    return m.group(1), m.group(2)


def run_script(cwd, script=SCRIPT, timeout=300, **env):
    return subprocess.run([sys.executable, script], cwd=cwd, env=clean_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(p, *needles):
    lines = [l for l in p.stderr.splitlines() if l.strip() and not l.startswith("warning:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
