"""Build a small, structured English-like data set in the challenge's shard format, with a
SentencePiece BPE tokenizer trained on the spot. Used by `launch.sh --smoke` and the tests.

    python tests/smoke_data.py OUT_DIR [--vocab 512] [--train-docs 3000] [--val-docs 300]
writes OUT_DIR/tokenizer.model and OUT_DIR/data/fineweb_{train,val}_*.bin
"""
import argparse
import io
import os
import random

import numpy as np

MAGIC, VERSION = 20240520, 1

NAMES = ["Alice", "Bob", "Carmen", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas"]
ADJ = ["small", "bright", "quiet", "ancient", "rapid", "careful", "green", "heavy", "strange", "gentle"]
NOUNS = ["river", "engine", "garden", "letter", "market", "teacher", "window", "mountain", "signal", "library"]
VERBS = ["builds", "finds", "watches", "repairs", "paints", "carries", "follows", "measures", "opens", "names"]
PLACES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Quito", "Perth"]


def sentence(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(ADJ)} {rng.choice(NOUNS)}."
    if kind == 1:
        n = rng.randrange(2, 40)
        return f"In {rng.randrange(1900, 2030)}, {n} {rng.choice(NOUNS)}s were seen near {rng.choice(PLACES)}."
    if kind == 2:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"The sum of {a} and {b} is {a + b}."
    noun = rng.choice(NOUNS)
    tail = "" if ascii_only else " café naïve über."
    return f"Every {noun} in {rng.choice(PLACES)} {rng.choice(VERBS)} another {noun};{tail}"


ascii_only = False


def make_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(sentence(rng) for _ in range(rng.randrange(3, 12))) for _ in range(n)]


def _encode_block(job):
    tok_path, n, seed = job
    import sentencepiece as spm
    return encode_docs(spm.SentencePieceProcessor(model_file=tok_path), make_docs(n, seed))


def train_tokenizer(docs: list[str], vocab: int, path: str) -> None:
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_writer=buf, vocab_size=vocab, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, byte_fallback=True, character_coverage=0.999,
        num_threads=2, minloglevel=2, hard_vocab_limit=True)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def write_shard(path: str, tokens: np.ndarray) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (MAGIC, VERSION, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def encode_docs(sp, docs: list[str]) -> np.ndarray:
    out = []
    for ids in sp.encode(docs):
        out.append(1)  # BOS starts every document
        out.extend(ids)
    return np.asarray(out, dtype=np.uint16)


def build_large(out_dir: str, tokenizer: str, train_docs: int, val_docs: int, train_shards: int, workers: int = 8):
    """Many documents with an existing tokenizer (e.g. the challenge's sp1024), in parallel."""
    from multiprocessing import Pool
    os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)
    per = -(-train_docs // train_shards)
    jobs = [(tokenizer, val_docs, 10_000)] + [(tokenizer, per, i + 1) for i in range(train_shards)]
    with Pool(workers) as pool:
        parts = pool.map(_encode_block, jobs)
    write_shard(os.path.join(out_dir, "data", "fineweb_val_000000.bin"), parts[0])
    for i, p in enumerate(parts[1:]):
        write_shard(os.path.join(out_dir, "data", f"fineweb_train_{i:06d}.bin"), p)
    return os.path.join(out_dir, "data"), tokenizer


def build(out_dir: str, vocab: int = 512, train_docs: int = 3000, val_docs: int = 300, train_shards: int = 3,
          seed: int = 0) -> tuple[str, str]:
    import sentencepiece as spm
    os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)
    tok_path = os.path.join(out_dir, "tokenizer.model")
    docs = make_docs(train_docs + val_docs, seed)
    train_tokenizer(docs[:train_docs], vocab, tok_path)
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    per = -(-train_docs // train_shards)
    for i in range(train_shards):
        write_shard(os.path.join(out_dir, "data", f"fineweb_train_{i:06d}.bin"),
                    encode_docs(sp, docs[i * per:(i + 1) * per]))
    write_shard(os.path.join(out_dir, "data", "fineweb_val_000000.bin"), encode_docs(sp, docs[train_docs:]))
    return os.path.join(out_dir, "data"), tok_path


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--train-docs", type=int, default=3000)
    p.add_argument("--val-docs", type=int, default=300)
    p.add_argument("--train-shards", type=int, default=3)
    p.add_argument("--tokenizer", help="use this SentencePiece model instead of training one (ASCII text only)")
    p.add_argument("--workers", type=int, default=8)
    a = p.parse_args()
    if a.tokenizer:
        ascii_only = True  # the challenge tokenizers have no byte fallback for accented letters
        data, tok = build_large(a.out_dir, a.tokenizer, a.train_docs, a.val_docs, a.train_shards, a.workers)
    else:
        data, tok = build(a.out_dir, a.vocab, a.train_docs, a.val_docs, a.train_shards)
    print(f"DATA_PATH={data} TOKENIZER_PATH={tok}")
