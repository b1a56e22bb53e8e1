"""Other packings of a trained artifact's quantized model, measured on the artifact itself (CPU):
decodes it with the script's own load path (decompress, unpack_entries), checks that pack_entries
and compress rebuild it byte for byte, then reports
  1. its bytes: int-code payload (order-0 entropy + 15-bit table loss), frequency tables, rANS lane
     states and coder loss, scales, floats and header (lzma), per tensor group
  2. rANS against the order-0 bound, and the coder's lanes / precision (RANS_LANES, RANS_PREC) swept:
     exact bytes, round trip checked, decode time
  3. rows of the banks (and the embedding tables unless --no-emb-chain) reordered by a greedy L1
     nearest-neighbour chain, and at random: the re-compressed artifact, plus the permutations' cost
  4. frequency tables shared per group / per role / per bit width (rans_encode: exact bytes), an
     adaptive order-0 coder (no tables) and a discretized Gaussian per tensor (one byte, no table)
  5. context models: H(code | context) per tensor and per group, as static tables (with their
     bytes), as an adaptive counts coder (KT estimator, alpha 1/2: its sequential code length depends
     only on the final counts, so it is computed in closed form; checked against a sequential run on
     a sample), and a per-column / per-row discretized Gaussian; side information included; a few
     designs summed from those rows, and three built with rans_encode (symbols grouped by table and
     context: exact bytes of a static context coder; rANS costs the same in any symbol order)
  6. lzma-9e, zlib-9, bz2-9 over each group's codes (uint8, code + qmax); lzma over a quarter of the
     rows unless --full-lzma (+1 minute per artifact)
Bytes are ideal code lengths where a coder was not built (sections 4-5 say which); deltas are to
the artifact as it is. About 100 s per artifact on 2 cores (the L1 chains: 40 s).
python3 tools/pack_study.py ARTIFACT.ptz [ARTIFACT.ptz ...] [--no-emb-chain] [--full-lzma]"""
import bz2, io, lzma, math, os, struct, sys, time, zlib
from types import SimpleNamespace
import numpy as np
import torch
repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.getcwd(), repo]  # a run's own copy first
import train_gpt as T

LZ = dict(preset=9 | lzma.PRESET_EXTREME)
GROUPS = ("attn q/o", "attn k/v", "mlp up", "mlp down", "tok emb", "bigram", "value emb")
CLIPV = 8  # neighbour-code contexts: the code clipped to +-CLIPV, and one context for "none"


def group_of(name):
    return {"qo_bank": "attn q/o", "kv_bank": "attn k/v", "up_bank": "mlp up", "down_bank": "mlp down",
            "tok_emb.weight": "tok emb", "bigram_table": "bigram", "ve_table": "value emb"}.get(name.split(".")[0]
                                                                                                 if "_bank." in name else name, "others")


def role_of(name, L):
    if name.startswith(("qo_bank.", "kv_bank.")):
        i = int(name.rsplit(".", 1)[1])
        return ("q", "o")[i >= L] if name.startswith("qo") else ("k", "v")[i >= L]
    return group_of(name)


def H_bits(J):
    """Sum over rows (contexts) of the empirical entropy of a counts matrix, in bits."""
    J = np.asarray(J, np.float64).reshape(-1, np.shape(J)[-1])
    n = J.sum(1, keepdims=True)
    m = J > 0
    return float(-(J[m] * np.log2((J / np.maximum(n, 1))[m])).sum())


def KT_bits(J, alpha=0.5):
    """Code length (bits) of an adaptive counts coder, p = (n_s + alpha) / (n + A alpha) per context,
    over the columns of J (the alphabet): closed form, any symbol order."""
    J = torch.as_tensor(np.asarray(J, np.float64).reshape(-1, np.shape(J)[-1]))
    J = J[J.sum(1) > 0]
    A = J.shape[1]
    a = torch.tensor(alpha, dtype=torch.float64)
    nats = (torch.lgamma(J.sum(1) + A * a) - torch.lgamma(A * a)).sum() - (torch.lgamma(J + a) - torch.lgamma(a)).sum()
    return float(nats) / math.log(2)


def kt_sequential_bits(ctx, sym, K, A, alpha=0.5):
    counts, tot, bits = np.zeros((K, A)), np.zeros(K), 0.0
    for c, s in zip(ctx, sym):
        bits -= math.log2((counts[c, s] + alpha) / (tot[c] + A * alpha))
        counts[c, s] += 1
        tot[c] += 1
    return bits


def joint(ctx, sym, A, K):
    return np.bincount((ctx.astype(np.int64) * A + sym).ravel(), minlength=K * A).reshape(K, A)


def quantile_bucket(v, K):
    return np.searchsorted(np.quantile(v, np.linspace(0, 1, K + 1)[1:-1]), v, side="right").clip(0, K - 1)


def gauss_logp(A, sigmas, mu=0.0):
    """log2 p(code) of a Gaussian N(mu, sigma^2) rounded to the integers, tails into the end codes."""
    qm = A // 2
    edges = torch.arange(-qm, qm, dtype=torch.float64) + 0.5 - mu
    cdf = torch.special.ndtr(edges[None, :] / torch.as_tensor(sigmas, dtype=torch.float64)[:, None])
    cdf = torch.cat([torch.zeros(len(sigmas), 1, dtype=torch.float64), cdf, torch.ones(len(sigmas), 1, dtype=torch.float64)], 1)
    return torch.log2(cdf.diff(dim=1).clamp_min(1e-300)).numpy()


SIGMAS = np.exp(np.linspace(np.log(0.5), np.log(40.0), 64))  # 6-bit grid of Gaussian widths


def nn_chain(q):
    """Greedy L1 nearest-neighbour chain over the rows of int codes, from row 0 -> order."""
    X = torch.from_numpy(q.astype(np.float32))
    D = torch.cdist(X, X, p=1)
    D.fill_diagonal_(float("inf"))
    order = [0]
    D[:, 0] = float("inf")
    for _ in range(q.shape[0] - 1):
        nxt = int(torch.argmin(D[order[-1]]))
        D[:, nxt] = float("inf")
        order.append(nxt)
    return np.array(order)


class Report:
    def __init__(self):
        self.buf = io.StringIO()

    def __call__(self, s=""):
        self.buf.write(s + "\n")


def study(path, emb_chain=True, threads=1, full_lzma=False):
    torch.set_num_threads(threads)
    out, t_start = Report(), time.time()
    laps, last = {}, [t_start]

    def lap(k):
        laps[k], last[0] = time.time() - last[0], time.time()
    data = open(path, "rb").read()
    size = len(data)
    t0 = time.time()
    blob = T.decompress(data)
    t_dec = time.time() - t0
    entries, config = T.unpack_entries(blob)
    tok, side = config.pop(T.TOKENIZER_KEY, ""), bool(config.pop(T.SIDECAR_KEY, False))
    args = T.ModelSettings(**T.settings_from_header(config, path))
    L = args.num_layers

    def pack(ents):
        return T.pack_entries(ents, args, tok, side)[0]

    assert pack(entries) == blob, "pack_entries does not rebuild the artifact's payload"
    assert T.compress(blob) == data, "compress does not rebuild the artifact"
    n_lz, _, _ = struct.unpack_from("<IBI", data, 1)
    lz_len, rans_len = n_lz, size - 10 - n_lz
    voff, vlen, tensors = T._int_tensors(blob)
    values = np.frombuffer(blob, np.int8, vlen, voff)
    ints = [(n, e) for n, e in entries.items() if e.kind == "int"]
    floats = [(n, e) for n, e in entries.items() if e.kind == "float"]
    out(f"=== {path}: {size:,} bytes; decompress {t_dec:.1f}s; pack_entries + compress rebuild it byte for byte")
    out(f"    {len(ints)} int tensors, {vlen:,} codes; {len(floats)} float tensors, "
        f"{sum(e.value.numel() for _, e in floats):,} values")

    # per tensor: symbols, alphabet, counts, entropy, cross-entropy under the coder's 15-bit table
    M = 1 << T.RANS_PREC
    info = []
    for n, e in ints:
        A = 2 ** e.bits - 1
        sym = e.q.numpy().astype(np.int64) + A // 2
        h = np.bincount(sym.ravel(), minlength=A)
        f = np.where(h > 0, np.maximum(1, h * M // sym.size), 0)
        f[np.argmax(f)] += M - f.sum()
        m = h > 0
        info.append(SimpleNamespace(name=n, g=group_of(n), role=role_of(n, L), A=A, sym=sym, h=h, N=sym.size,
                                    H=H_bits(h), X=float(-(h[m] * np.log2(f[m] / M)).sum()),
                                    scale=e.scale.numpy()))
    gsum = lambda key, g: sum(key(t) for t in info if t.g == g)

    # ---- 1. the artifact's bytes
    out("\n1. CURRENT ARTIFACT, bytes (payload = order-0 entropy with one table per tensor; table loss =")
    out("   cross-entropy under the coder's 15-bit frequencies - entropy; scales/floats/header = lzma-9e of")
    out("   each part alone, the joint-lzma correction row makes the total exact)")
    lz_sep = {}
    for g in GROUPS:
        lz_sep[g] = len(lzma.compress(b"".join(e.scale.numpy().astype("<f2").tobytes() for n, e in ints
                                               if group_of(n) == g), **LZ))
    lz_float = len(lzma.compress(b"".join(e.value.numpy().astype("<f2").tobytes() for _, e in floats), **LZ))
    lz_head = len(lzma.compress(blob[:voff], **LZ))
    lanes = T.rans_lanes(vlen)
    tables = sum(2 * A for _, A in tensors)
    states = np.frombuffer(data, "<u4", lanes, 10 + lz_len + tables).astype(np.float64)
    H_all, X_all = sum(t.H for t in info) / 8, sum(t.X for t in info) / 8
    flush = float((48 - np.log2(states)).sum()) / 8  # 32 stored bits - (log2 x - 16) informative bits
    stream = rans_len - tables
    out(f"   {'group':<10} {'codes':>11} {'payload':>11} {'table loss':>11} {'freq tables':>11} {'scales':>9} {'sum':>11}")
    total = 0
    for g in GROUPS:
        row = [gsum(lambda t: t.N, g), gsum(lambda t: t.H, g) / 8, gsum(lambda t: t.X - t.H, g) / 8,
               gsum(lambda t: 2 * t.A, g), lz_sep[g]]
        total += sum(row[1:])
        out(f"   {g:<10} {row[0]:>11,} {row[1]:>11,.0f} {row[2]:>11,.0f} {row[3]:>11,} {row[4]:>9,} {sum(row[1:]):>11,.0f}")
    rest_rows = [("others: floats (lzma alone)", lz_float), ("header JSON + magic (lzma alone)", lz_head),
                 ("lzma joint - parts alone", lz_len - lz_float - lz_head - sum(lz_sep.values())),
                 (f"rANS lane flush ({lanes} lanes x 4 B state)", flush),
                 ("rANS state-precision loss (rest of stream)", stream - X_all - flush),
                 ("codec tag + lengths + CRC", 10)]
    for k, v in rest_rows:
        total += v
        out(f"   {k:<46} {v:>11,.0f}")
    out(f"   {'total (= artifact size)':<46} {total:>11,.0f}   (artifact {size:,})")
    out(f"   int codes: rANS part {rans_len:,} = tables {tables:,} + states {4 * lanes:,} + words {stream - 4 * lanes:,}; "
        f"lzma part {lz_len:,}")
    out("   lzma part, lossless alternative for the two float projections: each fp16's high and low byte")
    out("   by order-0 tables (ideal bits + 2 B per used byte value):")
    for n in ("bigram_proj", "ve_proj"):
        if n in entries:
            u = entries[n].value.numpy().astype("<f2").view(np.uint16).ravel()
            hl = [np.bincount(b, minlength=256) for b in (u >> 8, u & 255)]
            ideal = sum(H_bits(h[None]) / 8 + 2 * int((h > 0).sum()) for h in hl)
            z = len(lzma.compress(u.astype("<u2").tobytes(), **LZ))
            out(f"     {n:<12} {u.size:>7,} values: lzma-9e alone {z:>8,}, byte-split order-0 {ideal:>9,.0f} ({ideal - z:>+7,.0f})")

    lap("1")
    # ---- 2. rANS vs the order-0 bound; coder parameters
    out("\n2. rANS vs ORDER-0 BOUND (one table per tensor, as coded now)")
    out(f"   order-0 entropy {H_all:,.0f}; cross-entropy under 15-bit tables {X_all:,.0f} (+{X_all - H_all:,.0f}); "
        f"rANS bytes {rans_len:,} (+{rans_len - H_all:,.0f}, +{(rans_len / H_all - 1) * 100:.3f} %)")
    out(f"   = tables {tables:,} + table loss {X_all - H_all:,.0f} + lane flush {flush:,.0f} "
        f"+ state-precision loss {stream - X_all - flush:,.0f}")
    out(f"   coder settings swept (whole model re-encoded with rans_encode, round trip by rans_decode checked):")
    out(f"   {'lanes':>6} {'prec':>4} {'rANS bytes':>12} {'vs now':>9} {'encode s':>9} {'decode s':>9}")
    saved = T.RANS_LANES, T.RANS_PREC
    try:
        for ln, pr in [(4096, 15), (4096, 14), (1024, 15), (1024, 14), (512, 14), (256, 14)]:
            T.RANS_LANES, T.RANS_PREC = ln, pr
            t0 = time.time()
            enc = T.rans_encode(values, tensors)
            t1 = time.time()
            ok = np.array_equal(T.rans_decode(enc, tensors), values)
            t2 = time.time()
            out(f"   {ln:>6} {pr:>4} {len(enc):>12,} {len(enc) - rans_len:>+9,} {t1 - t0:>9.1f} {t2 - t1:>9.1f}"
                + ("" if ok else "  ROUND TRIP FAILED"))
    finally:
        T.RANS_LANES, T.RANS_PREC = saved

    lap("2")
    # ---- 3. row reordering
    out("\n3. ROW REORDERING (greedy L1 nearest-neighbour chain from row 0; rows of codes and their scales")
    out("   move together; the re-packed model is compressed by the script's compress)")
    t0 = time.time()
    chain = {}
    for t in info:
        if t.g in ("tok emb", "bigram", "value emb") and not emb_chain:
            continue
        chain[t.name] = nn_chain(t.sym)
    t_chain = time.time() - t0
    rng = np.random.default_rng(0)
    variants = {"chain": chain, "random": {n: rng.permutation(len(p)) for n, p in chain.items()}}
    adj = lambda s: float(np.abs(np.diff(s, axis=0)).sum(1).mean())
    l1_raw = {t.name: adj(t.sym) for t in info if t.name in chain}
    l1_ch = {t.name: adj(t.sym[chain[t.name]]) for t in info if t.name in chain}
    out(f"   chains of {len(chain)} tensors in {t_chain:.0f}s; mean L1 between adjacent rows, stored order -> chain:")
    for g in GROUPS:
        names = [t.name for t in info if t.g == g and t.name in chain]
        if names:
            out(f"     {g:<10} {np.mean([l1_raw[n] for n in names]):8.1f} -> {np.mean([l1_ch[n] for n in names]):8.1f}"
                f"  (codes per row {info[[t.name for t in info].index(names[0])].sym.shape[1]})")
    perm_ideal = sum(math.lgamma(len(p) + 1) / math.log(2) for p in chain.values()) / 8
    perm_lz = {g: len(lzma.compress(b"".join(p.astype("<u2").tobytes() for n, p in chain.items() if group_of(n) == g), **LZ))
               for g in GROUPS if any(group_of(n) == g for n in chain)}
    out(f"   {'order':<8} {'artifact':>12} {'vs now':>9} {'rANS part':>10} {'lzma part':>10}")
    for k, perms in variants.items():
        ents = dict(entries)
        for n, p in perms.items():
            e = entries[n]
            ents[n] = T.IntEntry(e.bits, e.q[torch.from_numpy(p)], e.scale[torch.from_numpy(p)])
        d2 = T.compress(pack(ents))
        lz2 = struct.unpack_from("<I", d2, 1)[0]
        out(f"   {k:<8} {len(d2):>12,} {len(d2) - size:>+9,} {len(d2) - 10 - lz2 - rans_len:>+10,} {lz2 - lz_len:>+10,}")
    out(f"   + the permutations, unless free: ideal sum log2(rows!) = {perm_ideal:,.0f} bytes; as uint16 lzma-9e "
        f"{sum(perm_lz.values()):,} bytes (" + ", ".join(f"{g} {v:,}" for g, v in perm_lz.items()) + ")")
    out("     (MLP up rows with MLP down columns are a free symmetry of the model: hidden units; the others are not)")

    lap("3")
    # ---- 4. tables per group / role / width; adaptive order-0; Gaussian tables
    out("\n4. FREQUENCY TABLES: one per tensor (now) vs shared (rans_encode on merged tensors: exact bytes)")
    out(f"   {'tables':<26} {'#':>4} {'rANS bytes':>12} {'vs now':>9} {'table bytes':>12} {'entropy lost':>13}")

    def merged(key):
        runs = []
        for t in info:
            k = (key(t), t.A)
            if runs and runs[-1][0] == k:
                runs[-1][1].append(t)
            else:
                runs.append((k, [t]))
        assert len({k for k, _ in runs}) == len(runs), "a group's tensors are not contiguous"
        return runs

    for label, key in [("per tensor (now)", lambda t: t.name), ("per role (q,o,k,v,...)", lambda t: t.role),
                       ("per group", lambda t: t.g), ("per bit width", lambda t: t.A)]:
        runs = merged(key)
        enc = T.rans_encode(values, [(sum(t.N for t in ts), A) for (_, A), ts in runs])
        lost = sum(H_bits(sum(t.h for t in ts)) for _, ts in runs) / 8 - H_all
        out(f"   {label:<26} {len(runs):>4} {len(enc):>12,} {len(enc) - rans_len:>+9,} "
            f"{sum(2 * A for (_, A), _ in runs):>12,} {lost:>+13,.0f}")
    # layer as a context: H(code | group) vs H(code | tensor) = the per-tensor tables' gain
    out("   ideal (not built), vs the order-0 entropy + tables of now (coder losses as now):")
    base = H_all + tables
    rng_lohi = lambda h: (np.flatnonzero(h)[0], np.flatnonzero(h)[-1] + 1)
    kt_t = sum(KT_bits(t.h[slice(*rng_lohi(t.h))][None]) for t in info) / 8 + 2 * len(info)
    kt_g = sum(KT_bits(sum(t.h for t in info if t.g == g)[slice(*rng_lohi(sum(t.h for t in info if t.g == g)))][None])
               for g in GROUPS) / 8 + 2 * len(GROUPS)
    range_tables = sum(2 * (rng_lohi(t.h)[1] - rng_lohi(t.h)[0]) + 2 for t in info)
    gauss = sum(float((-(gauss_logp(t.A, SIGMAS) @ t.h)).min()) for t in info) / 8 + len(info)
    out(f"     {'tables over the used range only (+2 B each)':<52} {H_all + range_tables:>14,.0f} {H_all + range_tables - base:>+9,.0f}")
    out(f"     {'adaptive order-0 per tensor (KT, no tables)':<52} {kt_t:>14,.0f} {kt_t - base:>+9,.0f}")
    out(f"     {'adaptive order-0 per group, counts carried':<52} {kt_g:>14,.0f} {kt_g - base:>+9,.0f}")
    out(f"     {'rounded Gaussian per tensor (6-bit width, no table)':<52} {gauss:>14,.0f} {gauss - base:>+9,.0f}")

    lap("4")
    # ---- 5. context models
    out("\n5. CONTEXT MODELS (ideal bytes, not built; delta to order-0 entropy + per-tensor tables, i.e. to now")
    out("   less the coder's losses). Schemes: oracle = N H(code|ctx) + side info, tables free (a floor for")
    out("   static coding); static/T = + one table per context per tensor (2 B x alphabet, as now); static/G =")
    out("   tables shared by the group's tensors; adaptive/T, /G = KT counts coder per tensor / counts carried")
    out("   through the group (no tables). Side info: quantile buckets cost rows or cols x log2 K bits.")
    kt_check = None
    ctx_defs = [
        ("none (order-0)", None),
        ("(a) previous code in row", "prev"),
        ("(b) code above, stored order", "up"),
        ("(b') code above, chain order", "upchain"),
        ("(c) row scale, 8 quantiles", "scale8"),
        ("(c') row code-std, 8 quantiles", "rowstd8"),
        ("(d) column code-std, 8 quantiles", "colstd8"),
        ("(d) column code-std, 16 quantiles", "colstd16"),
        ("(d2) column code-mean, 8 quantiles", "colmean8"),
        ("(c')x(d) row 8 x column 8", "rowcol"),
        ("(b')x(d2) chain above x col mean 8", "chaincol"),
        ("(e) layer: none, tables per group", "group"),
    ]
    results = {}
    for label, kind in ctx_defs:
        if kind in ("upchain", "chaincol") and not chain:
            continue
        per = {g: np.zeros(6) for g in GROUPS}  # 5 schemes, then N H(code | ctx) in bits
        gJ, gA = {}, {}
        for t in info:
            r, c = t.sym.shape
            qm = t.A // 2
            sidebits, sym = 0, t.sym
            if kind in ("upchain", "chaincol") and t.name in chain:
                sym = t.sym[chain[t.name]]
            above = np.concatenate([np.full((1, c), 2 * CLIPV + 1), (sym[:-1] - qm).clip(-CLIPV, CLIPV) + CLIPV], 0)
            if kind in (None, "group"):
                ctx, K = np.zeros((r, c), np.int64), 1
            elif kind == "prev":
                ctx, K = np.concatenate([np.full((r, 1), 2 * CLIPV + 1), (sym[:, :-1] - qm).clip(-CLIPV, CLIPV) + CLIPV], 1), 2 * CLIPV + 2
            elif kind in ("up", "upchain"):
                ctx, K = above, 2 * CLIPV + 2
            elif kind == "scale8":
                ctx, K = np.broadcast_to(quantile_bucket(t.scale.astype(np.float64), 8)[:, None], (r, c)), 8
            elif kind == "rowstd8":
                ctx, K = np.broadcast_to(quantile_bucket(sym.std(1), 8)[:, None], (r, c)), 8
                sidebits = r * 3
            elif kind in ("colstd8", "colstd16"):
                K = 8 if kind == "colstd8" else 16
                ctx = np.broadcast_to(quantile_bucket(sym.std(0), K)[None, :], (r, c))
                sidebits = c * math.log2(K)
            elif kind == "colmean8":
                ctx, K = np.broadcast_to(quantile_bucket(sym.mean(0), 8)[None, :], (r, c)), 8
                sidebits = c * 3
            elif kind == "rowcol":
                ctx, K = quantile_bucket(sym.std(1), 8)[:, None] * 8 + quantile_bucket(sym.std(0), 8)[None, :], 64
                sidebits = (r + c) * 3
            elif kind == "chaincol":
                ctx, K = above * 8 + quantile_bucket(sym.mean(0), 8)[None, :], (2 * CLIPV + 2) * 8
                sidebits = c * 3
            J = joint(np.ascontiguousarray(ctx), sym, t.A, K)
            lo, hi = rng_lohi(t.h)
            if kt_check is None and kind == "prev":  # closed form vs a sequential adaptive coder
                n = 20000
                kt_check = (KT_bits(joint(ctx.ravel()[:n], sym.ravel()[:n], t.A, K)),
                            kt_sequential_bits(ctx.ravel()[:n], sym.ravel()[:n], K, t.A))
            nonempty = int((J.sum(1) > 0).sum())
            per[t.g] += [H_bits(J) / 8 + sidebits / 8,
                         H_bits(J) / 8 + sidebits / 8 + 2 * t.A * nonempty, 0,
                         KT_bits(J[:, lo:hi]) / 8 + sidebits / 8 + 2, 0, H_bits(J)]
            per[t.g][2] += sidebits / 8
            per[t.g][4] += sidebits / 8
            gJ[t.g] = gJ.get(t.g, 0) + J
            gA[t.g] = t.A
        for g in GROUPS:
            J = gJ[g]
            h = J.sum(0)
            lo, hi = rng_lohi(h)
            per[g][2] += H_bits(J) / 8 + 2 * gA[g] * int((J.sum(1) > 0).sum())
            per[g][4] += KT_bits(J[:, lo:hi]) / 8 + 2
            if kind == "group":  # no layer context: everything per group
                per[g][0] = H_bits(h[None]) / 8
                per[g][5] = H_bits(h[None])
                per[g][1] = per[g][2]
                per[g][3] = per[g][4]
        results[label] = per
    base_g = {g: gsum(lambda t: t.H, g) / 8 + gsum(lambda t: 2 * t.A, g) for g in GROUPS}
    schemes = ["oracle", "static/T", "static/G", "adaptive/T", "adaptive/G"]
    row = lambda label, sch, d: out(f"   {label:<40} {sch:<10} {sum(d.values()):>+10,.0f} " + " ".join(f"{d[g]:>+9,.0f}" for g in GROUPS))
    out(f"   {'context':<40} {'scheme':<10} {'model':>10} " + " ".join(f"{g:>9}" for g in GROUPS))
    for label, per in results.items():
        for i, sch in enumerate(schemes):
            row(label if i == 0 else "", sch, {g: per[g][i] - base_g[g] for g in GROUPS})
    free = {"mlp up"}  # hidden units: up rows with down columns; the other groups' rows are not free
    pc = {g: sum(math.lgamma(t.sym.shape[0] + 1) / math.log(2) / 8 for t in info if t.g == g and t.name in chain)
          for g in GROUPS}
    row("(b') permutation cost, ideal log2(rows!)", "", {g: 0 if g in free else pc[g] for g in GROUPS})
    out(f"   {'':<40} {'':<10} {'':>10} " + " ".join(f"{'free' if g in free else '':>9}" for g in GROUPS))
    out("   bits per code, H(code | ctx) per tensor (oracle, without side info), model average:")
    Ncodes = sum(t.N for t in info)
    for label, per in results.items():
        out(f"     {label:<40} {sum(per[g][5] for g in GROUPS) / Ncodes:.5f}")
    if kt_check:
        out(f"   check: KT closed form {kt_check[0]:.3f} bits = sequential adaptive coder {kt_check[1]:.3f} bits "
            f"(first 20,000 codes of {info[0].name}, context (a))")
    # parametric: a rounded Gaussian per tensor / row / column, 6-bit width (and 5-bit mean), no tables
    out("   rounded Gaussian per tensor / row / column: width on a 6-bit log grid 0.5..40 (mean 0, or mean on a")
    out("   5-bit grid -4..4), the best per unit; side info counted, no tables:")
    MUS = np.linspace(-4, 4, 33)[:32]
    par = {k: {g: 0.0 for g in GROUPS} for k in ("tensor", "row", "column", "column, mean+width")}
    for t in info:
        lp = gauss_logp(t.A, SIGMAS)  # (64, A)
        lpm = np.concatenate([gauss_logp(t.A, SIGMAS, mu) for mu in MUS])  # (32 x 64, A)
        r, c = t.sym.shape
        ccount = np.bincount((t.sym * c + np.arange(c)).ravel(), minlength=t.A * c).reshape(t.A, c)
        rcount = np.bincount((t.sym.T * r + np.arange(r)).ravel(), minlength=t.A * r).reshape(t.A, r)
        par["tensor"][t.g] += (-(lp @ t.h)).min() / 8 + 1
        par["column"][t.g] += (-(lp @ ccount)).min(0).sum() / 8 + c * 6 / 8
        par["row"][t.g] += (-(lp @ rcount)).min(0).sum() / 8 + r * 6 / 8
        par["column, mean+width"][t.g] += (-(lpm @ ccount)).min(0).sum() / 8 + c * 11 / 8
    for k, v in par.items():
        row("Gaussian per " + k, "", {g: v[g] - base_g[g] for g in GROUPS})
    out("   designs (sums of the rows above; mlp up rows in chain order for free, MLP down columns following):")
    tables3 = ("tok emb", "bigram", "value emb")
    B = lambda c_, i: {g: results[c_][g][i] - base_g[g] for g in GROUPS}
    if chain:
        for i, sch in ((2, "static/G"), (4, "adaptive/G")):
            d = B("none (order-0)", i)
            d["mlp up"] = B("(b') code above, chain order", i)["mlp up"]
            for g in tables3:
                d[g] = par["column, mean+width"][g] - base_g[g]
            row("D1 up (b'), tables Gaussian col mean+width", sch, d)
        if all(g in {group_of(n) for n in chain} for g in tables3):
            for i, sch in ((2, "static/G"), (4, "adaptive/G")):
                d = B("none (order-0)", i)
                d["mlp up"] = B("(b') code above, chain order", i)["mlp up"]
                for g in tables3:
                    d[g] = B("(b')x(d2) chain above x col mean 8", i)[g] + pc[g]
                row("D2 up (b'), tables (b')x(d2) + permutation", sch, d)
        # built: symbols grouped by (table, context) and coded by rans_encode, one table per bucket: the
        # exact bytes of a static context coder (rANS codes any order at the same cost; lanes as now)
        def built(ctx_of, lanes_prec=None):
            buckets = {}
            for t in info:
                key, ctx, sym = ctx_of(t)
                ctx, sym = ctx.ravel(), sym.ravel() - t.A // 2
                o = np.argsort(ctx, kind="stable")
                ks, starts = np.unique(ctx[o], return_index=True)
                for k, part in zip(ks, np.split(sym[o], starts[1:])):
                    buckets.setdefault((key, int(k), t.A), []).append(part.astype(np.int8))
            vals = np.concatenate([np.concatenate(v) for v in buckets.values()])
            saved = T.RANS_LANES, T.RANS_PREC
            try:
                if lanes_prec:
                    T.RANS_LANES, T.RANS_PREC = lanes_prec
                return len(T.rans_encode(vals, [(sum(p.size for p in v), A) for (_, _, A), v in buckets.items()])), len(buckets)
            finally:
                T.RANS_LANES, T.RANS_PREC = saved

        def chain_above(t):
            s_ = t.sym[chain[t.name]]
            return np.concatenate([np.full((1, s_.shape[1]), 2 * CLIPV + 1),
                                   (s_[:-1] - t.A // 2).clip(-CLIPV, CLIPV) + CLIPV], 0), s_
        zero = lambda t: np.zeros(t.sym.shape, np.int64)
        b1 = built(lambda t: (t.g, *chain_above(t)) if t.g == "mlp up" else (t.g, zero(t), t.sym))
        out("   built (rans_encode, tables at 2 B x alphabet each, all lanes as now), int-code part vs now:")
        label = "B1 tables per group, mlp up by (b') per group (free):"
        out(f"     {label:<50}{b1[1]:>5} tables {b1[0]:>12,} {b1[0] - rans_len:>+9,}")
        if all(g in {group_of(n) for n in chain} for g in tables3):
            b2_of = lambda t: ((t.name if t.g in tables3 else t.g, *chain_above(t))
                               if t.g in tables3 + ("mlp up",) else (t.g, zero(t), t.sym))
            p_id, p_lz = sum(pc[g] for g in tables3), sum(perm_lz[g] for g in tables3)
            for label, lp in (("B2 = B1, embedding tables by (b') per tensor:", None),
                              ("B3 = B2 with 1024 lanes, 14-bit frequencies:", (1024, 14))):
                b2 = built(b2_of, lp)
                out(f"     {label:<50}{b2[1]:>5} tables {b2[0]:>12,} {b2[0] - rans_len:>+9,}"
                    f"  + permutations {p_id:,.0f} (ideal) / {p_lz:,} (uint16 lzma-9e) -> "
                    f"{b2[0] - rans_len + p_id:>+,.0f} / {b2[0] - rans_len + p_lz:>+,}")
    else:
        out("     (no chains: run without --no-emb-chain... and with the banks' chains)")

    lap("5")
    # ---- 6. general-purpose compressors over the codes
    out("\n6. GENERAL-PURPOSE COMPRESSORS over each group's codes (uint8, code + qmax, tensors in order),")
    out("   vs the group's rANS share (entropy + table loss + tables; lane flush/precision not split).")
    if full_lzma:
        out("   all three over all codes")
    else:
        out("   zlib-9 and bz2-9 over all codes; lzma-9e (slow) over a quarter of the rows (every 4th block of 64")
        out("   rows of each tensor, in order), scaled by 4: an estimate, a few % under lzma over all (--full-lzma)")
    out(f"   {'group':<10} {'rANS share':>11} {'lzma-9e':>11} {'zlib-9':>11} {'bz2-9':>11}   (delta to rANS share)")
    t0 = time.time()
    tot6 = np.zeros(4)
    for g in GROUPS:
        raw = b"".join(t.sym.astype(np.uint8).tobytes() for t in info if t.g == g)
        share = gsum(lambda t: t.X, g) / 8 + gsum(lambda t: 2 * t.A, g)
        part = raw if full_lzma else b"".join(
            t.sym[(np.arange(t.sym.shape[0]) // 64) % 4 == 0].astype(np.uint8).tobytes() for t in info if t.g == g)
        z = [round(len(lzma.compress(part, **LZ)) * len(raw) / len(part)),
             len(zlib.compress(raw, 9)), len(bz2.compress(raw, 9))]
        tot6 += [share, *z]
        out(f"   {g:<10} {share:>11,.0f} " + " ".join(f"{x:>11,} ({x - share:>+9,.0f})" for x in z))
    out(f"   {'all':<10} {tot6[0]:>11,.0f} " + " ".join(f"{x:>11,.0f} ({x - tot6[0]:>+9,.0f})" for x in tot6[1:])
        + f"   [{time.time() - t0:.0f}s]")
    lap("6")
    out(f"\n   ({path}: {time.time() - t_start:.0f}s; seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in laps.items()) + ")")
    return out.buf.getvalue()


if __name__ == "__main__":
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    if not paths:
        sys.exit(__doc__)
    for p in paths:  # one after the other: on 2 cores, parallel processes took as long in all
        print(study(p, "--no-emb-chain" not in sys.argv, os.cpu_count() or 1, "--full-lzma" in sys.argv), flush=True)
