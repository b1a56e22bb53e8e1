"""Chunk steps of score-first TTT per rank, from a validation split's document lengths: the
per-batch schedule (up to 898ef54: TTT_BATCH_DOCS documents start together and the batch
lasts as long as its longest) against the lanes of evaluate_with_ttt (a row takes the next
document as soon as its own ends). A chunk step is one graph replay of fixed shape, so the
step count is what the TTT time scales with. The TTT settings come from the environment (e.g.
TTT_SHORT_CHUNK: the lanes count its short-document pass too). CPU only, reads the val shards:

    python3 tools/ttt_schedule.py DATA_PATH [VOCAB_SIZE] [WORLD_SIZE ...]
"""
import argparse
import dataclasses
import os
import sys


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # a wrong argument: one line, before any work
        self.exit(2, f"{self.prog}: {message} (--help: usage)\n")


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def parse_args():
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("data", metavar="DATA_PATH", help="folder of the fineweb_val_*.bin shards")
    ap.add_argument("vocab", metavar="VOCAB_SIZE", type=positive_int, nargs="?", default=8192, help="default 8192")
    ap.add_argument("worlds", metavar="WORLD_SIZE", type=positive_int, nargs="*", help="ranks to plan for (default 1 8)")
    a = ap.parse_args()
    if not os.path.isdir(a.data):
        ap.error(f"DATA_PATH {a.data} is not a folder")
    return a.data, a.vocab, a.worlds or [1, 8]


if __name__ == "__main__":
    cli = parse_args()  # before torch loads: --help and a wrong argument answer at once
sys.path[:0] = [os.getcwd(), os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]  # a run's own copy first
import train_gpt as T


def phase_shares(spans, args, rank, world):
    return T.ttt_phase_shares(spans, args, T.Run(rank, world))


def batch_steps(mine, C, D):
    return sum(-(-(mine[b][1] - mine[b][0]) // C) for b in range(0, len(mine), D))


def lane_steps(mine, args):  # evaluate_with_ttt's lanes, every pass of the phase, without the model
    return sum(1 for p in T.ttt_passes(args) for _ in T.Lanes(p.docs(mine), args.ttt_batch_docs, p.chunk).steps())


def main(data, vocab, worlds):
    args = dataclasses.replace(T.Hyperparameters.from_env(), vocab_size=vocab)
    tokens = T.load_validation_tokens(data, vocab)
    spans = T.document_spans(tokens, args.bos_id)
    lengths = sorted(e - s for s, e in spans)
    print(f"{len(spans)} documents, {tokens.numel() - 1} targets, longest {lengths[-1]}, median {lengths[len(lengths) // 2]}; "
          f"TTT_CHUNK {args.ttt_chunk}, TTT_BATCH_DOCS {args.ttt_batch_docs}, TTT_PHASES {args.ttt_phases}")
    C, D = args.ttt_chunk, args.ttt_batch_docs
    for world in worlds:
        # phases end with a collective: each phase lasts as long as its slowest rank
        cost = {}
        for name, f in (("batches", lambda m: batch_steps(m, C, D)), ("lanes", lambda m: lane_steps(m, args))):
            per_rank = [list(f(m) for m in phase_shares(spans, args, r, world)) for r in range(world)]
            cost[name] = sum(max(p[i] for p in per_rank) for i in range(len(per_rank[0])))
        ideal = sum(-(-sum(-(-(e - s) // C) for s, e in m) // D) for m in phase_shares(spans, args, 0, world))
        print(f"world {world}: chunk steps per rank, batches {cost['batches']}, lanes {cost['lanes']} "
              f"({cost['lanes'] / cost['batches']:.3f}x); rank 0's chunks / {D} rows: {ideal}")


if __name__ == "__main__":
    main(*cli)
