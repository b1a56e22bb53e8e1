"""Helpers shared by the test modules (importable: conftest puts tests/ on sys.path)."""
import math

import torch

import train_gpt as T

# the tiny CPU model the tests share; each module sets what its tests need on top
TINY_MODEL = dict(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0, rope_dims=8, bigram_dim=16,
                  ve_dim=16, compile="0")


def tiny_model_args(**kw):
    """Settings of a tiny CPU model: TINY_MODEL, then `kw`."""
    return T.Hyperparameters(**{**TINY_MODEL, **kw})


def randomized_model(args, seed=0, emb_std=0.1):
    """A CPU model with every parameter non-trivial: the default init zeroes the output
    projections, the MLP down bank and the bigram/VE projections, which would hide attention
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
