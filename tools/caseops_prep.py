#!/usr/bin/env python3
"""CaseOps data: documents -> case transform (train_gpt.caseops_transform, as the tokenizer reads it:
caseops_text) -> SentencePiece tokens, BOS before every document -> challenge-format shards, train and
val, and the validation byte sidecar.

    python3 tools/caseops_prep.py --corpus ../shared/corpus --out data/caseops_sp8192 \\
        --tokenizer ../shared/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model
    python3 tools/caseops_prep.py --docs docs_selected.jsonl --out data/datasets/fineweb10B_caseops8192 \\
        --tokenizer .../fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model
    --identity: no transform (plain shards + sidecar, e.g. with fineweb_8192_bpe.model)
    --compare-val DIR: the val tokens written must equal DIR's (with --identity and the tokenizer
        that made DIR: proves the validation documents are DIR's, e.g. the challenge's)

Inputs. --corpus DIR: DIR/train_*.txt.xz and DIR/val.txt.xz, documents separated by a line
"<|doc|>" (split as ../shared/tools/make_shards.py splits them: the same documents). --docs FILE:
one JSON object per line with a "text" field, the challenge's docs_selected.jsonl; ASSUMED, as in
the challenge's data script: the first --num-val-docs (50,000) documents are the validation split
and the rest train (check it with --identity --compare-val against the challenge's shards).

Outputs in --out (an empty folder): fineweb_val_000000.bin..., fineweb_val_bytes_000000.bin... (the
sidecar, split like the val shards), fineweb_train_000000.bin...; shard format: 256 int32 header
(20240520, 1, count), then uint16 per token. Sidecar: per val token, the bytes it stands for as the
challenge counts bytes (the tokenizer's table: a piece's UTF-8 bytes, its leading "▁" one space
after a non-boundary token, BOS 0), except that the CaseOps markers and ESC count 0 (an escaped
marker character counts its own 3): bytes of the original text as the tokenizer reproduces it
(after its normalizer, which collapses whitespace and applies NFKC, like the table's count of
plain tokens). So with --identity the sidecar equals the table, token for token, and CaseOps and
plain scores compare directly. Every validation document's tokens must decode (case markers undone)
to the text as the tokenizer reproduces it, its counts must sum to that text's UTF-8 length and its
transform must invert exactly; no validation document (sha256 of its whitespace-normalized text) may
be in the train split. Any failure: one error line. Deterministic: batches go to a worker pool and
come back in input order.

Any Unicode text. The tokenizer normalizes (NFKC) the CaseOps text before it splits it, so a marker
is only as good as the letter after it stays one ASCII letter: caseops_text transforms the text as it
comes (the records' transform, the records' tokens) except where the normalizer would undo a marker
(a capital with a combining mark, E + U+0301 -> É: a literal capital, as the precomposed É is; an
all-caps word the normalizer extends with lower-case letters, AB + ﬁ -> ABfi: a mixed-case word).

Progress: a line on stderr every --progress-every seconds (documents, MB of text, rates, ETA from the
part of the input files read).
"""
import argparse
import functools
import glob
import hashlib
import io
import itertools
import json
import lzma
import os
import sys
import time
from multiprocessing import Pool

import numpy as np

sys.path[:0] = [os.getcwd(), os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]  # a run's own copy first
import train_gpt as T  # noqa: E402

SEP = "<|doc|>"
VAL_BYTES = "fineweb_val_bytes"


class PrepError(Exception):
    """Data that cannot be made right: one line, and the tool stops."""


# ----- reading documents

class Meter:
    """Bytes of the input files read so far against their size: the progress line's ETA."""

    def __init__(self, paths):
        self.total, self.read = sum(os.path.getsize(p) for p in paths), 0

    def fraction(self):
        return self.read / self.total if self.total else None


def iter_corpus_docs(path, meter=None):
    """Documents of one .txt.xz (or .txt) file, as make_shards.py splits them."""
    with open(path, "rb") as raw, (lzma.open(raw, "rt", encoding="utf-8") if path.endswith(".xz")
                                   else io.TextIOWrapper(raw, encoding="utf-8")) as f:
        cur, at = [], 0
        for line in f:
            if meter is not None:
                pos = raw.tell()
                meter.read, at = meter.read + pos - at, pos
            if line.rstrip("\r\n") == SEP:
                doc = "".join(cur).strip("\n")
                if doc:
                    yield doc
                cur = []
            else:
                cur.append(line)
        if meter is not None:
            meter.read += raw.seek(0, os.SEEK_END) - at  # the compressed stream's end
        doc = "".join(cur).strip("\n")
        if doc:
            yield doc


def iter_jsonl_lines(path, meter=None):
    """Raw lines of a JSONL file (the workers parse them)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if meter is not None:
                meter.read += len(line)  # characters for bytes: close enough for an ETA
            if line.strip():
                yield line


def batches(items, batch_docs=256, batch_chars=2_000_000):
    """(index of the batch's first document, documents) in order."""
    batch, chars, first = [], 0, 0
    for item in items:
        batch.append(item)
        chars += len(item)
        if len(batch) >= batch_docs or chars >= batch_chars:
            yield first, batch
            first, batch, chars = first + len(batch), [], 0
    if batch:
        yield first, batch


# ----- the workers

_sp = _identity = _jsonl = _val_hashes = None


def _init(tokenizer, identity, jsonl, val_hashes):
    global _sp, _identity, _jsonl, _val_hashes, _table, _markers, _esc
    import sentencepiece as spm
    _sp = spm.SentencePieceProcessor(model_file=tokenizer)
    _identity, _jsonl, _val_hashes = identity, jsonl, val_hashes
    luts = T.load_tokenizer_luts(tokenizer, _sp.vocab_size())
    _table = tuple(t.numpy() for t in (luts.base, luts.space, luts.boundary))
    ids = [_sp.piece_to_id(c) for c in (T.CASE_TITLE, T.CASE_ALLCAPS, T.CASE_CAPNEXT, T.CASE_ESC)]
    if not identity and _sp.unk_id() in ids:
        raise PrepError(f"{tokenizer} has no piece for each CaseOps marker U+E001..U+E004: not a CaseOps tokenizer")
    _markers, _esc = np.array(ids), ids[-1]


def _text(item):
    if not _jsonl:
        return item
    try:
        return json.loads(item)["text"]
    except (ValueError, KeyError, TypeError):
        raise PrepError(f"a line of the --docs file is not a JSON object with a \"text\": {item[:80]!r}") from None


# ----- the case transform as the tokenizer sees it

# After a word, a character of these leaves the word's last letter and the marker before it as they
# are under the tokenizer's normalizer (NFKC, whitespace made one space): no mark to compose with, not
# removed, not a letter a compatibility form turns into. Any other character is looked at closely.
_PLAIN_NEXT = frozenset(map(chr, range(0x20, 0x7f))) | {"\t", "\n", "\r"}


def caseops_text(text, normalize):
    """The CaseOps text of `text` (train_gpt.caseops_transform) made safe for the tokenizer, whose
    `normalize` (NFKC and whitespace) runs before it splits the text: where a word's last capital
    would not stay one ASCII letter after its marker (E + U+0301 -> É, W + U+030A, I + U+0307 -> İ),
    it stays a literal capital, as a precomposed É does; where an all-caps word would be followed by
    lower-case letters (AB + ﬁ -> ABfi; AB + U+0007 + cd -> ABcd), it is written as a mixed-case word,
    as ABfi is. Everything else, and so every text where the plain transform was right, is unchanged."""
    return T._CASE_WORD.sub(lambda m: _case_word_as_normalized(m, normalize), text)


def _case_word_as_normalized(m, normalize):
    out, text, end = T._case_word(m), m.string, m.end()
    last = text[end - 1]  # the word's last letter (a literal marker character is no capital)
    if end == len(text) or text[end] in _PLAIN_NEXT or not last.isupper():
        return out  # the common case: no normalizer call
    stop = next((i for i in range(end, len(text)) if text[i] in _PLAIN_NEXT), len(text))
    after = text[end:stop + 1]  # up to the first plain character, that one included
    verdict = (_normalizer_verdict if len(after) <= 32 else _normalizer_verdict.__wrapped__)(normalize, last, after)
    if verdict == "literal":
        return T.caseops_transform(m[0][:-1]) + last
    if verdict == "lower-case next" and out[0] == T.CASE_ALLCAPS:
        return T.CASE_TITLE + "".join((T.CASE_CAPNEXT if i else "") + c.lower() for i, c in enumerate(m[0]))
    return out


@functools.lru_cache(maxsize=1 << 14)  # short contexts repeat: a capital before ’s, ”, —
def _normalizer_verdict(normalize, capital, after):
    """What the normalizer makes of a capital's lower-case letter (its marker before it) and the text
    `after` it: "literal" where it merges them or treats capital and letter otherwise, "lower-case next"
    where a lower-case ASCII letter follows the letter, None where neither."""
    upper, lower = normalize(capital + after), normalize(capital.lower() + after)
    if upper[:1] != capital or lower[:1] != capital.lower() or upper[1:] != lower[1:]:
        return "literal"
    return "lower-case next" if "a" <= lower[1:2] <= "z" else None


def reproduced(text, normalize):
    """`text` as the tokenizer reproduces it (what its tokens decode to; what the challenge counts)."""
    return normalize(text).replace("\u2581", " ")


def doc_hash(text):
    """sha256 of the text with its whitespace runs made one space: the same document, however spaced."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).digest()


def sidecar_counts(ids):
    """Bytes per token of one document (its BOS not included) as the challenge counts them (the
    tokenizer's table), the CaseOps markers and ESC 0 except a marker character ESC escapes."""
    base, space, boundary = _table
    prev = np.concatenate(([_sp.bos_id()], ids[:-1]))
    counts = base[ids] + (space[ids] & ~boundary[prev])
    if _identity:
        return counts
    operator_esc = set()  # an ESC that escapes (an escaped ESC is a literal character)
    for i in np.flatnonzero(np.isin(ids, _markers)).tolist():
        if i - 1 in operator_esc:
            continue  # the literal character: its 3 bytes, as the table has them
        counts[i] = 0
        if ids[i] == _esc:
            operator_esc.add(i)
    return counts


def check_decoded(where, decoded, want):
    """The tokens must stand for the text as the tokenizer reproduces it, character for character."""
    if decoded != want:
        i = next((i for i, (a, b) in enumerate(zip(decoded, want)) if a != b), min(len(decoded), len(want)))
        raise PrepError(f"{where}: its tokens decode to {decoded[i:i + 12]!r} at character {i} where the "
                        f"tokenizer reads {want[i:i + 12]!r}")


def encode_val(job):
    """Validation documents -> (tokens, sidecar, original bytes, bytes counted, hashes)."""
    first, items = job
    texts = [_text(x) for x in items]
    moved = texts if _identity else [caseops_text(t, _sp.normalize) for t in texts]
    tokens, sidecar, counted = [], [], 0
    for k, (text, ctext, ids) in enumerate(zip(texts, moved, _sp.encode(moved))):
        where = f"validation document {first + k}"
        if not _identity and T.caseops_decode(ctext) != text:
            raise PrepError(f"{where}: the case transform does not invert exactly")
        ids = np.array(ids, dtype=np.int64)
        counts = sidecar_counts(ids)
        decoded = _sp.decode(ids.tolist())
        decoded = decoded if _identity else T.caseops_decode(decoded)
        check_decoded(where, decoded, reproduced(text, _sp.normalize))
        n = len(decoded.encode("utf-8"))
        if int(counts.sum()) != n:
            raise PrepError(f"{where}: its byte sidecar sums to {int(counts.sum())} but its decoded text has {n} "
                            f"UTF-8 bytes ({len(ids)} tokens; text {text[:60]!r})")
        if counts.size and counts.max() > 65535:
            raise PrepError(f"{where}: a token stands for {int(counts.max())} bytes, more than uint16 holds")
        tokens += [[_sp.bos_id()], ids]
        sidecar += [[0], counts]
        counted += n
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return (np.concatenate(tokens).astype("<u2"), np.concatenate(sidecar).astype("<u2"), nbytes, counted,
            [doc_hash(t) for t in texts])


def encode_train(job):
    """Train documents -> (tokens, bytes, documents); a validation document among them stops the tool."""
    first, items = job
    texts = [_text(x) for x in items]
    for k, t in enumerate(texts):
        h = doc_hash(t)
        if h in _val_hashes:
            raise PrepError(f"train document {first + k} is validation document {_val_hashes[h]} (sha256 of its "
                            f"whitespace-normalized text {h.hex()[:16]}): no validation document may be in a train shard")
    ids = _sp.encode(texts if _identity else [caseops_text(t, _sp.normalize) for t in texts])
    bos = _sp.bos_id()
    out = np.concatenate([np.concatenate(([bos], x)) for x in ids]).astype("<u2")
    return out, sum(len(t.encode("utf-8")) for t in texts), len(texts)


# ----- writing shards

class ShardWriter:
    """Tokens into OUT/<prefix>_000000.bin, ... of `shard_tokens` each (the last one shorter)."""

    def __init__(self, out_dir, prefix, shard_tokens):
        self.out_dir, self.prefix, self.size = out_dir, prefix, shard_tokens
        self.buf, self.fill, self.shards, self.total = np.empty(shard_tokens, dtype="<u2"), 0, 0, 0

    def add(self, tokens):
        self.total += len(tokens)
        while len(tokens):
            k = min(len(tokens), self.size - self.fill)
            self.buf[self.fill:self.fill + k] = tokens[:k]
            self.fill, tokens = self.fill + k, tokens[k:]
            if self.fill == self.size:
                self._write()

    def _write(self):
        header = np.zeros(T.SHARD_HEADER_INTS, dtype="<i4")
        header[:3] = T.SHARD_MAGIC, T.SHARD_VERSION, self.fill
        with open(os.path.join(self.out_dir, f"{self.prefix}_{self.shards:06d}.bin"), "wb") as f:
            f.write(header.tobytes())
            f.write(self.buf[:self.fill].tobytes())
        self.shards, self.fill = self.shards + 1, 0

    def close(self):
        if self.fill:
            self._write()
        return self.shards


class Progress:
    """A line on stderr every `every` seconds: documents, MB of text, rates, ETA where the total is
    known (a number of documents, or the part of the input files read); `rates` for the last line."""

    def __init__(self, name, every, meter=None, total_docs=None):
        self.name, self.every, self.meter, self.total_docs = name, every, meter, total_docs
        self.docs = self.nbytes = self.tokens = 0
        self.t0 = self.last = time.time()

    def add(self, docs, nbytes, tokens):
        self.docs, self.nbytes, self.tokens = self.docs + docs, self.nbytes + nbytes, self.tokens + tokens
        if time.time() - self.last >= self.every:
            self.last = time.time()
            print(f"{self.name}: {self.docs:,} docs, {self.nbytes / 1e6:,.1f} MB, {self.rates()}{self.eta()}",
                  file=sys.stderr, flush=True)

    def rates(self):
        dt = max(time.time() - self.t0, 1e-9)
        return (f"{self.docs / dt:,.0f} docs/s, {self.nbytes / 1e6 / dt:.2f} MB/s, "
                f"{self.tokens / 1e6 / dt:.3f} M tokens/s over {dt:.0f}s")

    def eta(self):
        done = self.docs / self.total_docs if self.total_docs else self.meter and self.meter.fraction()
        if not done:
            return ""
        return f", {min(done, 1):.1%} done, ETA {(time.time() - self.t0) * max(1 / done - 1, 0) / 60:.1f} min"


def write_val(pool, jobs, out_dir, shard_tokens, progress):
    """Validation shards and their sidecar -> ({hash: document index}, documents)."""
    toks, side = ShardWriter(out_dir, "fineweb_val", shard_tokens), ShardWriter(out_dir, VAL_BYTES, shard_tokens)
    hashes, docs, nbytes, decoded, t0 = {}, 0, 0, 0, time.time()
    for tokens, sidecar, nb, dec, hs in pool.imap(encode_val, jobs, chunksize=1):
        toks.add(tokens)
        side.add(sidecar)
        for h in hs:
            hashes.setdefault(h, docs)
            docs += 1
        nbytes, decoded = nbytes + nb, decoded + dec
        progress.add(len(hs), nb, len(tokens))
    if not docs:
        raise PrepError("no validation documents")
    shards = toks.close(), side.close()
    print(f"fineweb_val: {docs:,} docs, {decoded:,} bytes counted (= the sidecar's sum; the original text has "
          f"{nbytes:,}, {nbytes / decoded - 1:+.2%}: the tokenizer's normalizer), {toks.total:,} tokens (incl. BOS), "
          f"{toks.total / decoded:.4f} tokens/byte, {shards[0]} shard(s) + {shards[1]} sidecar shard(s); "
          f"{progress.rates()}", flush=True)
    return hashes, docs


def write_train(pool, jobs, out_dir, shard_tokens, max_tokens, progress):
    w, nbytes = ShardWriter(out_dir, "fineweb_train", shard_tokens), 0
    for tokens, nb, docs in pool.imap(encode_train, jobs, chunksize=1):
        if max_tokens is not None:
            tokens = tokens[:max_tokens - w.total]
        w.add(tokens)
        nbytes += nb
        progress.add(docs, nb, len(tokens))
        if max_tokens is not None and w.total >= max_tokens:
            break
    shards = w.close()
    print(f"fineweb_train: {progress.docs:,} docs, {nbytes:,} bytes, {w.total:,} tokens (incl. BOS), "
          f"{shards} shard(s); {progress.rates()}", flush=True)


def compare_val(out_dir, other):
    mine, theirs = (T.load_validation_tokens(d, 65536).numpy() for d in (out_dir, other))
    n = min(len(mine), len(theirs))
    diff = np.flatnonzero(mine[:n] != theirs[:n])
    if len(mine) != len(theirs) or diff.size:
        at = int(diff[0]) if diff.size else n
        raise PrepError(f"val tokens differ from {other}'s: {len(mine):,} against {len(theirs):,} tokens, first "
                        f"difference at token {at:,} (document {int((mine[:at + 1] == 1).sum())})")
    print(f"val tokens identical to {other}'s ({len(mine):,} tokens)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help="folder with train_*.txt.xz and val.txt.xz")
    src.add_argument("--docs", help="docs_selected.jsonl: the first --num-val-docs documents are validation")
    ap.add_argument("--num-val-docs", type=int, default=50_000, help="with --docs (default 50,000, the challenge's)")
    ap.add_argument("--tokenizer", required=True, help="SentencePiece .model (the CaseOps one, or any with --identity)")
    ap.add_argument("--out", required=True, help="output folder (empty or new)")
    ap.add_argument("--identity", action="store_true", help="no case transform: plain shards + sidecar")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--shard-tokens", type=int, default=100_000_000)
    ap.add_argument("--max-train-tokens", type=int, default=None)
    ap.add_argument("--skip-train", action="store_true", help="only the val shards and the sidecar")
    ap.add_argument("--compare-val", metavar="DIR", help="stop unless the val tokens equal DIR's fineweb_val_*.bin")
    ap.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                    help="a progress line on stderr this often (default 5)")
    a = ap.parse_args()
    try:
        run(a)
    except PrepError as e:
        sys.exit(f"error: {e}")


def run(a):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=a.tokenizer)
    if sp.get_piece_size() > 65536 or sp.bos_id() < 0:
        raise PrepError(f"tokenizer {a.tokenizer}: needs a BOS id and at most 65,536 pieces")
    markers = [sp.piece_to_id(c) for c in (T.CASE_TITLE, T.CASE_ALLCAPS, T.CASE_CAPNEXT, T.CASE_ESC)]
    if not a.identity and sp.unk_id() in markers:
        raise PrepError(f"tokenizer {a.tokenizer} has no pieces for the case markers U+E001..U+E004: "
                        "a CaseOps tokenizer is needed (or --identity)")
    if a.docs and a.num_val_docs < 1:
        raise PrepError("--num-val-docs must be >= 1")
    for flag, value in (("--workers", a.workers), ("--shard-tokens", a.shard_tokens),
                        ("--max-train-tokens", a.max_train_tokens)):
        if value is not None and value < 1:
            raise PrepError(f"{flag} must be >= 1, not {value}")
    if not a.progress_every >= 0:
        raise PrepError(f"--progress-every must be >= 0 seconds, not {a.progress_every}")
    os.makedirs(a.out, exist_ok=True)
    if glob.glob(os.path.join(glob.escape(a.out), "fineweb_*.bin")):
        raise PrepError(f"{a.out} already holds fineweb_*.bin shards: use an empty folder (no stale shard mixes in)")
    print(f"tokenizer {a.tokenizer}: {sp.get_piece_size()} pieces, bos_id {sp.bos_id()}, "
          f"{'identity (no case transform)' if a.identity else f'CaseOps markers at ids {markers}'}", flush=True)
    if a.corpus:
        val_path = os.path.join(a.corpus, "val.txt.xz")
        train_paths = sorted(glob.glob(os.path.join(glob.escape(a.corpus), "train_*.txt.xz")))
        if not os.path.exists(val_path) or not (train_paths or a.skip_train):
            raise PrepError(f"{a.corpus} needs val.txt.xz and train_*.txt.xz")
        val_meter, train_meter = Meter([val_path]), Meter(train_paths)
        val_items = iter_corpus_docs(val_path, val_meter)
        train_items = itertools.chain.from_iterable(iter_corpus_docs(p, train_meter) for p in train_paths)
    else:
        if not os.path.isfile(a.docs):
            raise PrepError(f"--docs {a.docs} is not a file")
        val_meter, train_meter = None, Meter([a.docs])
        val_items = itertools.islice(iter_jsonl_lines(a.docs), a.num_val_docs)
        train_items = itertools.islice(iter_jsonl_lines(a.docs, train_meter), a.num_val_docs, None)
    init = (a.tokenizer, a.identity, bool(a.docs))
    with Pool(a.workers, initializer=_init, initargs=(*init, None)) as pool:
        progress = Progress("fineweb_val", a.progress_every, val_meter, a.docs and a.num_val_docs)
        val_hashes, val_docs = write_val(pool, batches(val_items), a.out, a.shard_tokens, progress)
    if a.docs and val_docs < a.num_val_docs:
        raise PrepError(f"{a.docs} has {val_docs} documents, fewer than --num-val-docs={a.num_val_docs}")
    if a.compare_val:
        compare_val(a.out, a.compare_val)
    if not a.skip_train:
        with Pool(a.workers, initializer=_init, initargs=(*init, val_hashes)) as pool:
            progress = Progress("fineweb_train", a.progress_every, train_meter)
            write_train(pool, batches(train_items), a.out, a.shard_tokens, a.max_train_tokens, progress)


if __name__ == "__main__":
    main()
