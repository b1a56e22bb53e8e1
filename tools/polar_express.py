"""Derive "Polar Express" Newton-Schulz coefficients for Muon (numpy only, own code).

Greedy derivation: the singular values of the normalised matrix lie in [l, u] (start [1e-3, 1]).
Each step picks the odd quintic p(x) = a x + b x^3 + c x^5 that is the minimax (Remez exchange,
4 alternation points: 3 coefficients + error level E) approximation of 1 on [l, u]; the interval
then becomes [min p, max p] = [1-E, 1+E].  For bf16 safety every step except the last evaluates p
at x/1.01 (a/1.01, b/1.01^3, c/1.01^5), so values slightly above u are not blown up.

Run `python3 tools/polar_express.py` to print the tuples and a float64 / bf16 check against the
classic fixed tuple (3.4445, -4.7750, 2.0315).
"""
import time

import numpy as np

CLASSIC = (3.4445, -4.7750, 2.0315)


def _poly(coef, x):
    a, b, c = coef
    return x * (a + x * x * (b + c * x * x))


def remez_odd_quintic(l, u, grid=20000, tol=1e-10, maxit=100):
    """Minimax odd quintic approximating 1 on [l, u]; returns ((a, b, c), E, alternation points)."""
    x = np.geomspace(l, u, grid)
    ref = l + (u - l) * (1 - np.cos(np.pi * np.arange(4) / 3)) / 2  # Chebyshev-like start
    for _ in range(maxit):
        V = np.stack([ref, ref**3, ref**5, (-1.0) ** np.arange(4)], axis=1)
        a, b, c, E = np.linalg.solve(V, np.ones(4))
        err = 1 - _poly((a, b, c), x)
        # one extremum of |err| per run of constant sign (dense grid) ...
        runs = np.split(np.arange(grid), np.flatnonzero(np.diff(np.sign(err)) != 0) + 1)
        ext = np.array([x[r[np.argmax(np.abs(err[r]))]] for r in runs])
        # ... polished to a true critical point of p by Newton steps on p'(x) = 0
        for _ in range(4):
            inner = (ext > l) & (ext < u)
            y = ext[inner] ** 2
            d1, d2 = a + 3 * b * y + 5 * c * y * y, 6 * b * ext[inner] + 20 * c * ext[inner] ** 3
            ext[inner] = np.clip(ext[inner] - d1 / d2, l, u)
        if len(ext) > 4:  # keep 4 consecutive alternating extrema holding the global max
            k = int(np.argmax(np.abs(1 - _poly((a, b, c), ext))))
            s = min(max(k - 1, 0), len(ext) - 4)
            ext = ext[s : s + 4]
        ref = ext
        lev = np.abs(1 - _poly((a, b, c), ref))
        if len(ref) == 4 and max(lev.max(), np.abs(err).max()) - lev.min() < tol:
            break
    else:
        raise RuntimeError(f"Remez did not converge on [{l}, {u}]")
    return (float(a), float(b), float(c)), float(E), ref


def polar_express_coeffs(steps=5, lo=1e-3, safety=1.01):
    """Greedy per-step minimax odd quintics; safety factor applied to all but the last step."""
    l, u, out = lo, 1.0, []
    for t in range(steps):
        (a, b, c), E, ref = remez_odd_quintic(l, u)
        s = safety if t < steps - 1 else 1.0
        coef = (a / s, b / s**3, c / s**5)
        pts = np.concatenate([np.geomspace(l, u, 20000), np.clip(s * ref, l, u)])
        vals = _poly(coef, pts)
        l, u = float(vals.min()), float(vals.max())
        out.append(coef)
    return out


# ----------------------------------------------------------------------------- check
def _run_f64(X, coeffs):
    for a, b, c in coeffs:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X


def _run_bf16(X, coeffs):
    import torch

    Y = torch.from_numpy(X).to(torch.bfloat16)
    for a, b, c in coeffs:
        A = Y @ Y.mT
        Y = a * Y + (b * A + c * (A @ A)) @ Y
    return Y.double().numpy()


def _stats(X):
    s = np.linalg.svd(X, compute_uv=False)
    return f"{s.min():8.4f} {np.median(s):8.4f} {s.max():8.4f}"


def main():
    t0 = time.perf_counter()
    coeffs = polar_express_coeffs()
    print("POLAR_EXPRESS_COEFFS = [")
    for c in coeffs:
        print(f"    ({c[0]!r}, {c[1]!r}, {c[2]!r}),")
    print("]")
    l, u = 1e-3, 1.0  # show the interval each step maps to, and max p on [0, u]
    for t, c in enumerate(coeffs):
        z = np.linspace(0, u, 200001)
        g = np.geomspace(l, u, 200001)
        print(f"# step {t}: [{l:.6g}, {u:.6g}] -> [{_poly(c, g).min():.6g}, {_poly(c, g).max():.6g}]"
              f"   max p on [0,u] = {_poly(c, z).max():.4f}, p > 0 on (0,u]: {bool((_poly(c, z[1:]) > 0).all())}")
        l, u = _poly(c, g).min(), _poly(c, g).max()

    rng = np.random.default_rng(0)
    mats = {}
    for shape in [(512, 2048), (512, 512)]:
        G = rng.standard_normal(shape)
        mats[f"gauss {shape[0]}x{shape[1]}"] = G / np.linalg.norm(G)
    U, _ = np.linalg.qr(rng.standard_normal((512, 512)))
    V, _ = np.linalg.qr(rng.standard_normal((2048, 512)))
    sv = np.geomspace(1e-3, 1, 512)  # placed directly in [1e-3, 1] (Frobenius norm would shrink them)
    mats["logunif sv 512x2048"] = (U * sv) @ V.T
    try:
        import torch  # noqa: F401

        runners = [("f64", _run_f64), ("bf16", _run_bf16)]
    except ImportError:
        runners = [("f64", _run_f64)]
    print(f"\n{'matrix':22s} {'dtype':5s} | {'classic x5: min   median      max':34s} | polar express: min   median      max")
    for name, X in mats.items():
        for dname, run in runners:
            print(f"{name:22s} {dname:5s} |        {_stats(run(X, [CLASSIC] * 5))} |         {_stats(run(X, coeffs))}")
    print(f"\nruntime {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
