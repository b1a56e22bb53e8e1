"""CaseOps: the case transform and its inverse, tools/caseops_prep.py (shards, the validation byte
sidecar, the val/train overlap check), scoring on the sidecar in every scorer, the sidecar's
errors, BOS and marker tokens in the model, and a tiny run on CaseOps data with EVAL_ONLY of its
artifact scoring the same."""
import copy
import json
import lzma
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import smoke_data
import train_gpt as T
from helpers import (REPO_ROOT, SHARED_TOKENIZERS, TINY_RUN, final_line, one_error_line, randomized_model, run_script,
                     tiny_model_args)

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import caseops_prep as P  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_math")

CPU = torch.device("cpu")
TOOL = os.path.join(REPO_ROOT, "tools", "caseops_prep.py")
MARKS = (T.CASE_TITLE, T.CASE_ALLCAPS, T.CASE_CAPNEXT, T.CASE_ESC)


def shared_tokenizer(name):
    path = os.path.join(SHARED_TOKENIZERS, name)
    if not os.path.isfile(path):
        assert not os.environ.get("CI"), f"CI must have the tokenizer at {path}"
        pytest.skip(f"tokenizer not at {path}")
    return path


@pytest.fixture(scope="module")
def caseops_tok():
    return shared_tokenizer("fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")


@pytest.fixture(scope="module")
def plain_tok():
    return shared_tokenizer("fineweb_8192_bpe.model")


# ----- the transform

@pytest.mark.parametrize("text,want", [
    ("hello", "hello"),
    ("Hello", T.CASE_TITLE + "hello"),
    ("HELLO", T.CASE_ALLCAPS + "hello"),
    ("I", T.CASE_TITLE + "i"),  # a single capital: the Title rule
    ("a A", "a " + T.CASE_TITLE + "a"),
    ("iPhone", "i" + T.CASE_CAPNEXT + "phone"),
    ("McDonald", T.CASE_TITLE + "mc" + T.CASE_CAPNEXT + "donald"),
    ("ABCd", T.CASE_TITLE + "a" + T.CASE_CAPNEXT + "b" + T.CASE_CAPNEXT + "cd"),
    ("NASA's", T.CASE_ALLCAPS + "nasa's"),
    ("Élan straße", "Élan straße"),  # non-ASCII letters stay; "lan" is a lower-case run
    ("naïVe", "naï" + T.CASE_TITLE + "ve"),
    ("x2Y", "x2" + T.CASE_TITLE + "y"),
    ("\ue001A", T.CASE_ESC + "\ue001" + T.CASE_TITLE + "a"),  # a literal marker is escaped
    ("\ue004\ue004", T.CASE_ESC + "\ue004" + T.CASE_ESC + "\ue004"),
    ("\ue000", "\ue000"),  # not a marker
    ("", ""),
])
def test_transform_follows_the_rules(text, want):
    out = T.caseops_transform(text)
    assert out == want and T.caseops_decode(out) == text


WORDS = ["word", "Word", "WORD", "wOrD", "mcDonald", "McDonald", "iPhone", "A", "a", "I", "x", "XY", "Élan", "straße",
         "naïVe", "ÜBER", "ǅ", "ﬁ", "Ａ", "42", "3.14", "x1Y", "\ue000", "\ue001", "\ue002", "\ue003", "\ue004",
         "\ue004\ue001", "🎉", "日本", "—", "'s"]
GAPS = ["", " ", "  ", "\n", "\n\n", "\t", "-", ".", ", ", "\r\n"]


def test_transform_round_trips_random_strings():
    rng = random.Random(0)
    for trial in range(3000):
        text = "".join(rng.choice(WORDS) + rng.choice(GAPS) for _ in range(rng.randrange(0, 12)))
        if trial % 3 == 0:  # also raw character soup
            text = "".join(rng.choice("aZbY \n\ue001\ue002\ue003\ue004é1ß") for _ in range(rng.randrange(0, 20)))
        out = T.caseops_transform(text)
        assert T.caseops_decode(out) == text, repr(text)
        assert not re.search("[A-Z]", out), repr(out)  # every ASCII capital became a marker


# ----- the tokenizer and the tokens the model sees

def test_caseops_tokenizer_ids(caseops_tok, plain_tok):
    """The CaseOps tokenizer's BOS is BOS_ID's default; the markers are ordinary pieces (not BOS,
    not control, not bytes), so nothing that looks for a BOS mistakes them for one."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=caseops_tok)
    assert sp.bos_id() == T.Hyperparameters().bos_id == 1 and sp.vocab_size() == 8192
    ids = [sp.piece_to_id(m) for m in MARKS]
    assert ids == [4, 5, 6, 7]
    for i, m in zip(ids, MARKS):
        assert sp.id_to_piece(i) == m and not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
    luts = T.load_tokenizer_luts(caseops_tok, 8192)
    assert luts.caseops and not any(luts.boundary[i] for i in ids)
    assert not T.load_tokenizer_luts(plain_tok, 8192).caseops


def test_marker_tokens_do_not_split_documents():
    """Documents full of marker ids: the model still isolates documents at BOS only (attention
    mask, BigramHash, SmearGate), document_spans splits at BOS only, and a marker carries context
    like any token."""
    args = tiny_model_args(vocab_size=64, train_seq_len=32, eval_seq_len=32)
    model = randomized_model(args, seed=3, emb_std=0.15)
    doc1, doc2 = [1, 4, 20, 6, 21, 5, 22], [1, 4, 30, 7, 4, 31, 6, 32]
    with torch.no_grad():
        joint = model(torch.tensor([doc1 + doc2]))
        alone = torch.cat([model(torch.tensor([d])) for d in (doc1, doc2)], dim=1)
        changed = model(torch.tensor([doc1 + [1, 4, 33] + doc2[3:]]))  # a token before a marker changed
    torch.testing.assert_close(joint, alone, atol=1e-5, rtol=0)
    assert (changed[0, len(doc1) + 3:] - joint[0, len(doc1) + 3:]).abs().amax() > 1e-3
    assert T.document_spans(torch.tensor(doc1 + doc2), 1) == [(0, 7), (7, 14)]


# ----- the prep tool's pieces

SAMPLES = [
    "Hello World. The USA and NASA; iPhone, McDonald's.",
    "line one\nLine Two\n\n  indented  twice   over  ",
    "  leading spaces and trailing ones   ",
    "ﬁne ½ Ａ ＢＣ café naïve ÜBER Élan straße",
    "日本語 🎉 Ω, \ue001 literal \ue004\ue002 markers \ue000",
    "tabs\there\r\nand CRLF",
    "x",
    "ALLCAPS WORDS IN A ROW",
]


def encode_val_docs(tok, identity, docs):
    P._init(tok, identity, False, None)
    tokens, sidecar, nbytes, decoded, hashes = P.encode_val((0, docs))
    return tokens.astype(np.int64), sidecar.astype(np.int64), nbytes


def per_doc_sums(tokens, sidecar):
    starts = list(np.flatnonzero(tokens == 1)) + [len(tokens)]
    assert starts[0] == 0 and (sidecar[tokens == 1] == 0).all()
    return [int(sidecar[a:b].sum()) for a, b in zip(starts[:-1], starts[1:])]


def normalized_bytes(tok, docs):
    """UTF-8 bytes of each document as the tokenizer reproduces it (after its normalizer)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tok)
    return [len(sp.decode(sp.encode(d)).encode("utf-8")) for d in docs]


@pytest.mark.parametrize("identity", [False, True], ids=["caseops", "identity"])
def test_sidecar_sums_to_each_documents_bytes(caseops_tok, plain_tok, identity):
    """Per document, the sidecar sums to the bytes of its text as the plain tokenizer reproduces it
    (the challenge's count: the same in both cases, markers or not); where the normalizer changes
    nothing (the synthetic documents), to its original UTF-8 length."""
    synthetic = smoke_data.make_docs(20, seed=4)
    docs = SAMPLES + synthetic
    tokens, sidecar, nbytes = encode_val_docs(plain_tok if identity else caseops_tok, identity, docs)
    sums = per_doc_sums(tokens, sidecar)
    assert sums == normalized_bytes(plain_tok, docs)
    assert sums[len(SAMPLES):] == [len(d.encode("utf-8")) for d in synthetic]
    assert nbytes == sum(len(d.encode("utf-8")) for d in docs)


def test_caseops_sidecar_equals_the_plain_table_on_the_same_text(caseops_tok, plain_tok):
    """The same documents, CaseOps tokens with their sidecar and plain tokens with the tokenizer's
    table: the same total bytes, so the two runs' bpb divide by the same number."""
    docs = SAMPLES + smoke_data.make_docs(30, seed=5)
    _, sidecar, _ = encode_val_docs(caseops_tok, False, docs)
    plain, _, _ = encode_val_docs(plain_tok, True, docs)
    luts, t = T.load_tokenizer_luts(plain_tok, 8192), torch.from_numpy(plain)
    assert int(sidecar.sum()) == int(luts.target_bytes(t[:-1], t[1:]).sum())


def test_caseops_tokens_decode_to_the_text(caseops_tok):
    """Where the tokenizer's normalizer changes nothing (single spaces, no NFKC characters), the
    CaseOps tokens decode back to the very text; elsewhere the sidecar still counts the original."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=caseops_tok)
    docs = [SAMPLES[0], SAMPLES[-1], "A Title, an iPhone and \ue001 escaped"] + smoke_data.make_docs(10, seed=8)
    tokens, _, _ = encode_val_docs(caseops_tok, False, docs)
    starts = list(np.flatnonzero(tokens == 1)) + [len(tokens)]
    for d, a, b in zip(docs, starts[:-1], starts[1:]):
        assert T.caseops_decode(sp.decode(tokens[a + 1:b].tolist())) == d
    assert not set(tokens.tolist()) & {0, 2, 3}  # no pad, EOS or unknown piece


def test_sidecar_counts_as_the_table_does_after_the_normalizer(plain_tok):
    """The tokenizers collapse whitespace (and apply NFKC): the sidecar counts what the table counts,
    the text as the tokenizer reproduces it, token for token; the tool reports the original's bytes."""
    tokens, sidecar, nbytes = encode_val_docs(plain_tok, True, ["a  b\n\nc ", "   "])
    luts = T.load_tokenizer_luts(plain_tok, 8192)
    t = torch.from_numpy(tokens)
    assert sidecar[1:].tolist() == luts.target_bytes(t[:-1], t[1:]).tolist()
    assert per_doc_sums(tokens, sidecar) == [len("a b c"), 0] and nbytes == len("a  b\n\nc ") + 3


def test_a_sidecar_that_does_not_add_up_is_refused(plain_tok, monkeypatch):
    """Counts that do not sum to the decoded text's bytes (here: a broken counting rule) stop the tool."""
    P._init(plain_tok, True, False, None)
    monkeypatch.setattr(P, "sidecar_counts", lambda ids: np.ones(len(ids), dtype=np.int64))
    with pytest.raises(P.PrepError, match="validation document 0: its byte sidecar sums to .* but its decoded text has"):
        P.encode_val((0, ["Hello there, world"]))


# ----- any Unicode text: what the transform sees is what the tokenizer reads

def reproduced_by(tok, docs):
    """Each document as the tokenizer reproduces it: its own tokens decoded."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tok)
    return [sp.decode(sp.encode(d)) for d in docs]


def doc_slices(tokens):
    starts = list(np.flatnonzero(tokens == 1)) + [len(tokens)]
    return [slice(a + 1, b) for a, b in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("text,want", [
    ("E\u0301cole normale", "\u00c9cole normale"),  # the normalizer composes E + U+0301 after the marker
    ("the founder O\u0323\u0300runmila", "the founder \u1ecc\u0300runmila"),  # a proxy train document's
])
def test_a_capital_with_a_combining_mark_is_prepared(caseops_tok, plain_tok, text, want):
    """Once refused ("sums to 14 but its decoded text has 17 UTF-8 bytes"): the capital stays a
    literal one, the tokens decode to the tokenizer's reading of the text, the sidecar sums to it."""
    tokens, sidecar, _ = encode_val_docs(caseops_tok, False, [text])
    assert T.caseops_decode(P._sp.decode(tokens[1:].tolist())) == want == reproduced_by(plain_tok, [text])[0]
    assert per_doc_sums(tokens, sidecar) == [len(want.encode("utf-8"))]


COMBINING = "\u0300\u0301\u0302\u0303\u0307\u0308\u030a\u030c\u0323\u0327\u0331\u0336\u0345\u20dd"
STRESS = [
    # decomposed accents, stacked marks, letters that compose only in lower case (W+ring -> U+1E98 in lower case)
    "E\u0301cole", "\u00c9cole", "ABE\u0301", "iE\u0301x", "ABC\u0301D", "A\u0308rger U\u0308BER",
    "O\u0323\u0300runmila", "E" + "\u0301" * 20 + "\u0327", "Z\u0336\u0334A\u0335L\u0337G\u0338O\u0334",
    "W\u030a Y\u030a T\u0308 J\u030c H\u0331", "w\u030a", "NAI\u0308VE", "Ae\u0301", "AE\u0301", "\u0301A",
    "A\u0301\u0301",
    # Hangul: jamo compose to syllables; compatibility jamo; syllables
    "\u1100\u1161\u11a8", "K\u1100\u1161 \u1112\u1161\u11ab\u1100\u1173\u11af", "\u3131\u314f",
    "\ud55c\uad6d\uc5b4 KOREAN",
    # ligatures, compatibility capitals and full-width forms
    "\ufb01ne", "AB\ufb01", "A\ufb01", "\ufb01AB", "AB\ufb00x", "\u01c5 \u01c4 \u01c6", "\u0132ssel", "\u2122 AB\u2122",
    "\u216b \u2103 \u2116 \u3392", "\uff21 \uff21\uff22\uff23 AB\uff43 \uff21BC \uff28\uff45\uff4c\uff4c\uff4f",
    "\u210cilbert", "AB\u00aa", "X\u2071", "ABC\u207f",
    # Turkish I, final sigma, other non-ASCII capitals
    "\u0130stanbul", "I\u0307", "I\u0307STANBUL", "\u0131i \u0130I", "D\u0130YARBAKIR",
    "\u03a3\u038a\u03a3\u03a5\u03a6\u039f\u03a3",
    "\u03c3\u03bf\u03c6\u03cc\u03c2 \u03c2", "\u00c9LAN \u03a9mega \u1e9etra\u00dfe \u00c6SIR \u00d8RSTED \u01f1",
    # the marker characters themselves, and U+E000
    "\ue000\ue001\ue002\ue003\ue004", "\ue001A", "A\ue001", "\ue004\ue004", "AB\ue002cd", "\ue003\u0301",
    "A\ue004\u0301",
    # mixed scripts, emoji and other astral characters
    "Tokyo\u6771\u4eacTower", "MOSKVA \u041c\u043e\u0441\u043a\u0432\u0430", "\u0391\u03b8\u03ae\u03bd\u03b1 Athens",
    "\u05e2\u05d1\u05e8\u05d9\u05ea ABC", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 Arabic",
    "\u0939\u093f\u0928\u094d\u0926\u0940 HINDI",
    "\U0001f389Party", "A\U0001f389", "\U0001f44d\U0001f3fdOK", "\U0001d400\U0001d401", "\U0001d41aAB", "AB\U0001d41a",
    "\U0001f1eb\U0001f1f7 FR", "\U0001f468\u200d\U0001f469\u200d\U0001f467 Family",
    # control and invisible characters (the normalizer drops some: AB + U+0007 + cd reads ABcd)
    "AB\x07cd", "A\x00B", "A\x1fb", "AB\x7fcd", "A\x0bB", "AB\u200bcd", "AB\ufeffcd", "AB\u00adcd", "A\u200dB",
    "A\u2028B", "A\x85B", "AB\u2060cd", "AB\r\ncd", "AB\x0ccd",
    # whitespace and empty documents
    "  A  ", "\u00a0Hello\u00a0World\u00a0", "A\u3000B", "A\u2581B", "\u2581", "\t\n", "", " ", "\n\n",
]
STRESS_CHARS = [*"ABIWaez .1\n", *"\u00c9\u00df\u0130\u0131\u03a3\u03c2\ufb01\uff21\uff43\u2122",
                *"\u1100\u1161\u11a8\u6771\ue000\ue001\ue002\ue004\x07\x00\u200b\u00a0\u2581",
                "\U0001f389", "\U0001d41a", *COMBINING]


def stress_corpus(n_random=300, seed=0):
    """STRESS and random mixes of its characters (capitals next to marks, markers, ligatures...)."""
    rng = random.Random(seed)
    mixes = ["".join(rng.choice(STRESS_CHARS) for _ in range(rng.randrange(1, 24))) for _ in range(n_random)]
    return STRESS + [rng.choice(STRESS) + rng.choice(STRESS_CHARS) + rng.choice(STRESS) for _ in range(50)] + mixes


@pytest.mark.parametrize("identity", [False, True], ids=["caseops", "identity"])
def test_any_unicode_text_round_trips(caseops_tok, plain_tok, identity):
    """Each stress document: the transform inverts exactly, its tokens (train or val) decode to the
    text as the plain tokenizer reproduces it (the challenge's), and the sidecar sums to its bytes,
    which is what the plain tokenizer's table counts."""
    docs = stress_corpus()
    tokens, sidecar, _ = encode_val_docs(plain_tok if identity else caseops_tok, identity, docs)
    want = reproduced_by(plain_tok, docs)
    decoded = [P._sp.decode(tokens[s].tolist()) for s in doc_slices(tokens)]
    assert [d if identity else T.caseops_decode(d) for d in decoded] == want
    assert per_doc_sums(tokens, sidecar) == [len(w.encode("utf-8")) for w in want]
    plain, _, _ = encode_val_docs(plain_tok, True, docs)
    luts, t = T.load_tokenizer_luts(plain_tok, 8192), torch.from_numpy(plain)
    assert int(sidecar.sum()) == int(luts.target_bytes(t[:-1], t[1:]).sum())
    if not identity:
        assert all(T.caseops_decode(P.caseops_text(d, P._sp.normalize)) == d for d in docs)
        P._init(caseops_tok, False, False, {})
        train, _, _ = P.encode_train((0, docs))
        assert train.astype(np.int64).tolist() == tokens.tolist()  # train documents read alike


def test_text_the_plain_transform_got_right_is_unchanged(caseops_tok):
    """Where the records' transform already gave tokens that decode to the tokenizer's reading, the
    text (so the token ids) is the very same; only the texts it got wrong change."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=caseops_tok)
    docs = stress_corpus() + SAMPLES
    changed = 0
    for d in docs:
        old, new = T.caseops_transform(d), P.caseops_text(d, sp.normalize)
        right = T.caseops_decode(sp.decode(sp.encode(old))) == P.reproduced(d, sp.normalize)
        assert new == old if right else new != old, ascii(d)
        changed += not right
    assert 40 < changed < len(docs) // 2


# ----- scoring on the sidecar

@pytest.fixture(scope="module")
def identity_stream(plain_tok):
    """Plain tokens of text the normalizer leaves alone, with their --identity sidecar."""
    docs = smoke_data.make_docs(60, seed=11)
    tokens, sidecar, _ = encode_val_docs(plain_tok, True, docs)
    return torch.from_numpy(tokens), torch.from_numpy(sidecar)


@pytest.mark.slow
def test_sidecar_scoring_equals_table_scoring(plain_tok, identity_stream):
    """--identity with the plain tokenizer on text its normalizer leaves alone: the sidecar and the
    tokenizer's table give the same bytes, so plain, sliding and TTT scores agree to 1e-9."""
    tokens, counts = identity_stream
    luts = T.load_tokenizer_luts(plain_tok, 8192)
    side = T.ByteSidecar(counts)
    assert int(counts[1:].sum()) == int(luts.target_bytes(tokens[:-1], tokens[1:]).sum())
    args = tiny_model_args(vocab_size=8192, train_seq_len=64, eval_seq_len=64, eval_stride=16,
                           eval_batch_seqs=4, ttt_chunk=16, ttt_rank=2, ttt_batch_docs=4, ttt_phases=2, ttt_lr=0.01)
    model = randomized_model(args, seed=2)
    score = T.make_score_fn(model, CPU)
    n = 700
    for stride in (64, 16):
        a, b = (T.evaluate(score, tokens[:n + 1], src, 64, stride, 4, T.Run(0, 1, CPU)) for src in (luts, side))
        assert a["bytes"] == b["bytes"] and abs(a["val_bpb"] - b["val_bpb"]) < 1e-9
    a, b = (T.evaluate_with_ttt(copy.deepcopy(model), tokens[:n + 1], src, args, T.Run(0, 1, CPU, lambda s: None))
            for src in (luts, side))
    assert a["bytes"] == b["bytes"] and a["ttt_steps"] > 0 and abs(a["val_bpb"] - b["val_bpb"]) < 1e-9


def test_sidecar_counts_by_position():
    """The sidecar answers by position, not by token: two equal tokens, two counts."""
    tokens = torch.tensor([1, 9, 9, 9, 1, 9])
    side = T.ByteSidecar(torch.tensor([0, 5, 6, 7, 0, 8]))
    x, y, pos = tokens[:-1], tokens[1:], torch.arange(1, 6)
    assert side.target_bytes(x, y, pos).tolist() == [5, 6, 7, 0, 8]
    args = tiny_model_args(vocab_size=16)
    m = T.evaluate(T.make_score_fn(randomized_model(args), CPU), tokens, side, 4, 2, 2, T.Run(0, 1, CPU))
    assert m["bytes"] == 26 and m["tokens"] == 5


# ----- the sidecar's files and errors

def write_shard(path, values):
    h = np.zeros(256, dtype="<i4")
    h[:3] = 20240520, 1, len(values)
    with open(path, "wb") as f:
        f.write(h.tobytes() + np.asarray(values, dtype="<u2").tobytes())


@pytest.fixture
def val_dir(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 5, 6, 1, 7])
    write_shard(tmp_path / "fineweb_val_000001.bin", [8, 1, 9])
    write_shard(tmp_path / "fineweb_train_000000.bin", [1, 5, 6])
    return tmp_path


def test_sidecar_is_read_beside_the_val_shards(val_dir):
    write_shard(val_dir / "fineweb_val_bytes_000000.bin", [0, 3, 4, 0, 2, 1, 0, 5])
    assert [os.path.basename(f) for f in T.find_shards(str(val_dir), "val")] == \
        ["fineweb_val_000000.bin", "fineweb_val_000001.bin"]  # the sidecar is no val shard
    assert T.find_shards(str(val_dir), "val_bytes") == [str(val_dir / "fineweb_val_bytes_000000.bin")]
    val = T.load_validation_tokens(str(val_dir), 16)
    assert T.load_byte_sidecar(str(val_dir), val, 1).tolist() == [0, 3, 4, 0, 2, 1, 0, 5]
    cut = T.load_validation_tokens(str(val_dir), 16, limit=4)  # VAL_TOKENS_LIMIT cuts both alike
    assert T.load_byte_sidecar(str(val_dir), cut, 1, limit=4).tolist() == [0, 3, 4, 0, 2]


@pytest.mark.parametrize("counts,error", [
    ([0, 3, 4, 0, 2, 1, 0], "has 7 counts for 8 validation tokens"),  # short
    ([0, 3, 4, 0, 2, 1, 0, 5, 1], "has 9 counts for 8 validation tokens"),
    ([0, 3, 4, 2, 2, 1, 0, 5], "gives 2 bytes to the BOS at validation token 3"),
])
def test_sidecar_that_does_not_fit_is_a_data_error(val_dir, counts, error):
    write_shard(val_dir / "fineweb_val_bytes_000000.bin", counts)
    with pytest.raises(T.DataError, match=error):
        T.load_byte_sidecar(str(val_dir), T.load_validation_tokens(str(val_dir), 16), 1)


def test_truncated_sidecar_is_a_data_error(val_dir):
    write_shard(val_dir / "fineweb_val_bytes_000000.bin", [0, 3, 4, 0, 2, 1, 0, 5])
    path = val_dir / "fineweb_val_bytes_000000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(T.DataError, match="header says 8 tokens"):
        T.load_byte_sidecar(str(val_dir), T.load_validation_tokens(str(val_dir), 16), 1)


def test_byte_source_setting(val_dir, plain_tok, caseops_tok):
    luts = T.load_tokenizer_luts(plain_tok, 8192)
    val = T.load_validation_tokens(str(val_dir), 16)
    for setting in ("auto", "0"):
        args = T.Hyperparameters(data_path=str(val_dir), tokenizer_path=plain_tok, byte_sidecar=setting)
        assert not T.use_byte_sidecar(args) and T.load_byte_source(args, val, luts, False)[0] is luts
    args = T.Hyperparameters(data_path=str(val_dir), byte_sidecar="1")
    with pytest.raises(T.DataError, match="BYTE_SIDECAR=1 but .* has no fineweb_val_bytes"):
        T.load_byte_source(args, val, luts, T.use_byte_sidecar(args))
    write_shard(val_dir / "fineweb_val_bytes_000000.bin", [0, 1, 1, 0, 1, 1, 0, 1])  # ids 5..9: byte pieces
    args = T.Hyperparameters(data_path=str(val_dir))
    assert T.use_byte_sidecar(args)
    src, note = T.load_byte_source(args, val, luts, True)
    assert isinstance(src, T.ByteSidecar) and note.startswith("bytes from the byte sidecar (5 bytes, sha256 ")
    assert note.endswith("; the tokenizer's table counts 5)")
    args = T.Hyperparameters(data_path=str(val_dir), tokenizer_path=caseops_tok, byte_sidecar="0")
    with pytest.raises(T.DataError, match="is a CaseOps tokenizer: its byte table counts the case markers"):
        T.load_byte_source(args, val, T.load_tokenizer_luts(caseops_tok, 8192), False)
    with pytest.raises(T.ConfigError, match="BYTE_SIDECAR=yes must be one of auto, 0, 1"):
        T.Hyperparameters(byte_sidecar="yes").validate(1)


def test_artifact_byte_source_must_match():
    """EVAL_ONLY scores the way the artifact was made: sidecar for sidecar, table for table."""
    args = T.Hyperparameters(data_path="/d")
    for same in (True, False):
        T.check_artifact_byte_source("a.ptz", same, same, args)
    with pytest.raises(T.ArtifactError, match="a.ptz was scored with the byte sidecar; .* would use the tokenizer's "
                                              "byte table: set BYTE_SIDECAR=1 and a DATA_PATH with the sidecar"):
        T.check_artifact_byte_source("a.ptz", True, False, args)
    with pytest.raises(T.ArtifactError, match="scored with the tokenizer's byte table; .* set BYTE_SIDECAR=0$"):
        T.check_artifact_byte_source("a.ptz", False, True, args)
    config = json.loads(T.pack_entries({}, args, "abc", byte_sidecar=True)[0][12:].decode())["config"]
    assert config[T.TOKENIZER_KEY] == "abc" and config[T.SIDECAR_KEY] is True
    assert T.SIDECAR_KEY not in json.loads(T.pack_entries({}, args, "abc")[0][12:].decode())["config"]


# ----- the tool end to end

def write_corpus(d, val_docs, train_docs, files=2):
    d.mkdir(parents=True, exist_ok=True)
    with lzma.open(d / "val.txt.xz", "wt", encoding="utf-8") as f:
        f.write("\n<|doc|>\n".join(val_docs) + "\n")
    per = -(-len(train_docs) // files)
    for i in range(files):
        with lzma.open(d / f"train_{i:03d}.txt.xz", "wt", encoding="utf-8") as f:
            f.write("\n<|doc|>\n".join(train_docs[i * per:(i + 1) * per]) + "\n")
    return d


def prep(*args, timeout=300):
    return subprocess.run([sys.executable, TOOL, "--workers", "2", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def cased_docs(n, seed):
    """smoke_data documents with a few more case patterns."""
    rng = random.Random(seed)
    extra = ["The USA and NASA agree.", "An iPhone at McDonald's.", "I said HELLO world.", "Über Élan, ÇA VA?"]
    return [d + " " + rng.choice(extra) for d in smoke_data.make_docs(n, seed)]


@pytest.mark.slow
def test_identity_prep_reproduces_make_shards(tmp_path, plain_tok):
    """--identity with the plain tokenizer: the very shards ../shared/tools/make_shards.py writes (the
    same documents, the same tokens), plus the sidecar."""
    make_shards = os.path.join(os.path.dirname(REPO_ROOT), "shared", "tools", "make_shards.py")
    if not os.path.isfile(make_shards):
        assert not os.environ.get("CI"), f"CI must have {make_shards}"
        pytest.skip("no make_shards.py beside the checkout")
    corpus = write_corpus(tmp_path / "c", cased_docs(30, 1), cased_docs(80, 2))
    ref = subprocess.run([sys.executable, make_shards, "--corpus", corpus, "--tokenizer", plain_tok, "--out",
                          tmp_path / "ref", "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    p = prep("--identity", "--corpus", corpus, "--tokenizer", plain_tok, "--out", tmp_path / "id",
             "--compare-val", tmp_path / "ref")
    assert p.returncode == 0, p.stderr
    assert "val tokens identical to" in p.stdout
    for name in ("fineweb_val_000000.bin", "fineweb_train_000000.bin"):
        assert (tmp_path / "id" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert (tmp_path / "id" / "fineweb_val_bytes_000000.bin").is_file()


@pytest.mark.slow
def test_prep_refuses_a_validation_document_in_train(tmp_path, caseops_tok):
    val, train = cased_docs(10, 3), cased_docs(30, 4)
    train[17] = "  " + val[6].replace(" ", "\n", 1) + " "  # the same text, spaced otherwise
    p = prep("--corpus", write_corpus(tmp_path / "c", val, train), "--tokenizer", caseops_tok, "--out", tmp_path / "o")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train document 17 is validation document 6 "), lines


@pytest.mark.slow
def test_prep_from_docs_jsonl(tmp_path, caseops_tok):
    """--docs: the first --num-val-docs documents are validation, the rest train; fewer documents
    than that, a duplicate, or an occupied output folder: one error line."""
    docs = cased_docs(12, 5)
    path = tmp_path / "docs_selected.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    p = prep("--docs", path, "--num-val-docs", 5, "--tokenizer", caseops_tok, "--out", tmp_path / "o")
    assert p.returncode == 0, p.stderr
    val = T.load_validation_tokens(str(tmp_path / "o"), 8192).numpy()
    side = T.load_byte_sidecar(str(tmp_path / "o"), torch.from_numpy(val), 1).numpy()
    assert per_doc_sums(val, side) == [len(d.encode("utf-8")) for d in docs[:5]]
    train = np.fromfile(tmp_path / "o" / "fineweb_train_000000.bin", dtype="<u2", offset=1024)
    assert (train == 1).sum() == 7
    again = prep("--docs", path, "--num-val-docs", 5, "--tokenizer", caseops_tok, "--out", tmp_path / "o")
    assert again.returncode == 1 and "already holds fineweb_*.bin shards" in again.stderr
    few = prep("--docs", path, "--num-val-docs", 20, "--tokenizer", caseops_tok, "--out", tmp_path / "few")
    assert few.returncode == 1 and "has 12 documents, fewer than --num-val-docs=20" in few.stderr
    path.write_text(path.read_text() + json.dumps({"text": docs[2]}) + "\n")
    dup = prep("--docs", path, "--num-val-docs", 5, "--tokenizer", caseops_tok, "--out", tmp_path / "dup")
    assert dup.returncode == 1 and "train document 7 is validation document 2" in dup.stderr
    plain = prep("--docs", path, "--tokenizer", shared_tokenizer("fineweb_8192_bpe.model"), "--out", tmp_path / "p")
    assert plain.returncode == 1 and "no pieces for the case markers" in plain.stderr


@pytest.mark.slow
def test_prep_reports_progress(tmp_path, caseops_tok):
    """A line on stderr per --progress-every: documents, MB, rates and, the input's size known, an ETA."""
    corpus = write_corpus(tmp_path / "c", cased_docs(4, 8), cased_docs(12, 9), files=1)
    p = prep("--corpus", corpus, "--tokenizer", caseops_tok, "--out", tmp_path / "o", "--progress-every", 0)
    assert p.returncode == 0, p.stderr
    rate = r"[\d,]+ docs/s, [\d.]+ MB/s, [\d.]+ M tokens/s over \d+s"
    for split, docs in (("val", 4), ("train", 12)):
        line = rf"^fineweb_{split}: {docs} docs, [\d.]+ MB, {rate}, 100.0% done, ETA 0.0 min$"
        assert re.search(line, p.stderr, re.M), p.stderr
        assert re.search(rf"^fineweb_{split}: .*; {rate}$", p.stdout, re.M), p.stdout


# ----- a tiny run on CaseOps data

CASEOPS_RUN = {**TINY_RUN, "VOCAB_SIZE": 8192, "VAL_TOKENS_LIMIT": 1500, "TTT_ENABLED": 1, "TTT_CHUNK": 16,
               "TTT_RANK": 4, "TTT_BATCH_DOCS": 4, "TTT_PHASES": 2, "TTT_LR": 0.01}


@pytest.fixture(scope="module")
def caseops_run(tmp_path_factory, caseops_tok):
    """CaseOps shards made by the tool from synthetic documents, one tiny run on them (TTT on)."""
    root = tmp_path_factory.mktemp("caseops")
    corpus = write_corpus(root / "corpus", cased_docs(60, 6), cased_docs(240, 7))
    p = prep("--corpus", corpus, "--tokenizer", caseops_tok, "--out", root / "data")
    assert p.returncode == 0, p.stderr
    run = run_script(root, DATA_PATH=root / "data", TOKENIZER_PATH=caseops_tok, OUT_DIR=root, **CASEOPS_RUN)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return root, run.stdout


@pytest.mark.slow
def test_caseops_run_scores_on_the_sidecar(caseops_run, caseops_tok):
    root, stdout = caseops_run
    line = next(l for l in stdout.splitlines() if l.startswith("data: "))
    val = T.load_validation_tokens(str(root / "data"), 8192, 1500)
    counts = T.load_byte_sidecar(str(root / "data"), val, 1, 1500)
    luts, t = T.load_tokenizer_luts(caseops_tok, 8192), val  # the table counts the markers too
    assert line.endswith(f"; bytes from the byte sidecar ({int(counts[1:].sum())} bytes, sha256 "
                         f"{T.sha256_prefix(counts.numpy().astype('<u2').tobytes())}; the tokenizer's table counts "
                         f"{int(luts.target_bytes(t[:-1], t[1:]).sum())})")
    _, config = T.load_artifact(str(root / "final_model_t.int6.ptz"))
    assert config[T.SIDECAR_KEY] is True and config[T.TOKENIZER_KEY] == T.file_sha256(caseops_tok)
    for kind in ("roundtrip", "sliding_window", "ttt"):
        assert 0 < float(final_line(stdout, kind)[1]) < 20


@pytest.mark.slow
def test_caseops_eval_only_scores_the_same(caseops_run, caseops_tok):
    root, stdout = caseops_run
    env = dict(DATA_PATH=root / "data", TOKENIZER_PATH=caseops_tok, OUT_DIR=root / "eval",
               EVAL_ONLY=root / "final_model_t.int6.ptz", **CASEOPS_RUN)
    p = run_script(root, **env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for kind in ("roundtrip", "sliding_window", "ttt"):
        assert final_line(p.stdout, kind) == final_line(stdout, kind), kind
    # scored another way than it was made: one clear error, before any scoring
    p = run_script(root, **{**env, "OUT_DIR": root / "eval0", "BYTE_SIDECAR": 0})
    one_error_line(p, "was scored with the byte sidecar", "set BYTE_SIDECAR=1")
    assert "val_bpb" not in p.stdout


@pytest.mark.slow
def test_run_with_a_bad_sidecar_stops_before_training(caseops_run, caseops_tok, tmp_path):
    root, _ = caseops_run
    data = tmp_path / "data"
    data.mkdir()
    for f in os.listdir(root / "data"):
        (data / f).write_bytes((root / "data" / f).read_bytes())
    side = data / "fineweb_val_bytes_000000.bin"
    counts = np.fromfile(side, dtype="<u2", offset=1024)
    write_shard(side, counts[:-1])  # one count short
    p = run_script(tmp_path, DATA_PATH=data, TOKENIZER_PATH=caseops_tok, OUT_DIR=tmp_path / "o", **CASEOPS_RUN)
    one_error_line(p, f"has {len(counts) - 1} counts for {len(counts)} validation tokens")
    assert "step:" not in p.stdout
    side.unlink()  # no sidecar at all: the CaseOps tokenizer's table would count the markers
    p = run_script(tmp_path, DATA_PATH=data, TOKENIZER_PATH=caseops_tok, OUT_DIR=tmp_path / "o2", **CASEOPS_RUN)
    one_error_line(p, "is a CaseOps tokenizer")
    assert "step:" not in p.stdout


@pytest.mark.parametrize("flag", ["--workers", "--shard-tokens", "--max-train-tokens"])
def test_prep_refuses_a_count_below_one(tmp_path, caseops_tok, flag):
    """--shard-tokens 0 wrote empty shard files without end, --workers 0 ended in a traceback: a count
    below 1 is one line, before any file."""
    p = prep("--corpus", write_corpus(tmp_path / "c", cased_docs(3, 1), cased_docs(3, 2)), "--tokenizer", caseops_tok,
             "--out", tmp_path / "o", flag, 0)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [f"error: {flag} must be >= 1, not 0"]
    assert not list((tmp_path / "o").glob("*.bin"))
