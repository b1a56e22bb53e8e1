"""The int-code coder on codes with the SP8192 run's statistics: Gaussian weights quantized at its
clips (banks int6 at 17.67 sigmas, tables int7 at 14) in the model's shapes; order-0 entropy,
rANS bytes and time, and (with --lzma, ~2 minutes) lzma-9e bytes. python3 tools/rans_bench.py [--lzma]"""
import lzma, os, sys, time
import numpy as np
sys.path[:0] = [os.getcwd(), os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]  # a run's own copy first
import train_gpt as T

rng = np.random.default_rng(0)
shapes = [(512, 512)] * 22 + [(256, 512)] * 22 + [(2048, 512)] * 11 + [(512, 2048)] * 11
specs = [(s, 6, 17.67) for s in shapes] + [((8192, 512), 7, 14.0), ((3072, 112), 7, 14.0), ((8192, 128), 7, 14.0)]
parts, tensors = [], []
for shape, bits, clip in specs:
    qmax = 2 ** (bits - 1) - 1
    parts.append(np.clip(np.round(rng.standard_normal(shape) / (clip / qmax)), -qmax, qmax).astype(np.int8).ravel())
    tensors.append((parts[-1].size, 2 ** bits - 1))
values = np.concatenate(parts)
entropy = sum(T.order0_bits(np.bincount(p.astype(np.int64) + A // 2)) * c / 8 for p, (c, A) in zip(parts, tensors))
t0 = time.time()
data = T.rans_encode(values, tensors)
t1 = time.time()
assert np.array_equal(T.rans_decode(data, tensors), values)
print(f"{values.size} values: order-0 entropy {entropy / 1e6:.4f} MB, rANS {len(data) / 1e6:.4f} MB "
      f"(+{(len(data) / entropy - 1) * 100:.2f} %), encode {t1 - t0:.1f}s, decode {time.time() - t1:.1f}s")
if "--lzma" in sys.argv:
    t0 = time.time()
    z = lzma.compress(values.tobytes(), preset=9 | lzma.PRESET_EXTREME)
    print(f"lzma 9e {len(z) / 1e6:.4f} MB (+{(len(z) / entropy - 1) * 100:.2f} %), {time.time() - t0:.1f}s")
