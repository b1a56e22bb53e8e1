"""TTT speed of two revisions of train_gpt.py on CPU (eager, 2 threads), same model, documents and
settings: python3 tools/ttt_cpu_bench.py OLD/train_gpt.py NEW/train_gpt.py
(e.g. OLD from `git show 6bc452d:train_gpt.py`). A CPU figure, not a GPU one."""
import argparse, importlib.util, os, sys, time


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # a wrong argument: one line, before any work
        self.exit(2, f"{self.prog}: {message} (--help: usage)\n")


def parse_args():
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("old", metavar="OLD", help="a revision's train_gpt.py")
    ap.add_argument("new", metavar="NEW", help="another revision's train_gpt.py")
    a = ap.parse_args()
    for path in (a.old, a.new):
        if not os.path.isfile(path):
            ap.error(f"no file {path}")
    return [a.old, a.new]


paths = parse_args()
import torch


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
docs = []
for n in [1500, 1200, 900, 600, 400] + [300] * 4 + [200] * 6 + [100] * 8:
    d = torch.randint(2, 1024, (n,), generator=g)
    d[0] = 1
    docs.append(d)
tokens = torch.cat(docs + [torch.tensor([1])])
revisions = [(load(p, f"rev{i}"), p) for i, p in enumerate(paths)]
for lr in (0.0, 0.003):
    for T, path in revisions:
        args = T.Hyperparameters(vocab_size=1024, num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, mlp_mult=4.0,
                                 train_seq_len=512, eval_seq_len=512,
                                 attn_backend="math", compile="0", ttt_enabled=True, ttt_rank=16, ttt_chunk=48,
                                 ttt_batch_docs=8, ttt_phases=1, ttt_lr=lr, ttt_max_seconds=1e9)
        if hasattr(T, "set_attention_backend"):  # revisions before the model held its attention (math on CPU)
            T.set_attention_backend("math", torch.device("cpu"), True)
        torch.manual_seed(1)
        model = T.build_model(args, torch.device("cpu"))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        luts = T.ByteLUTs(torch.full((1024,), 3), torch.zeros(1024, dtype=torch.bool), torch.zeros(1024, dtype=torch.bool))
        t0 = time.perf_counter()
        where = (torch.device("cpu"), lambda s: None)  # revisions before the Run context took them apart
        where = (T.Run(0, 1, *where),) if hasattr(T, "Run") else (0, 1, *where)
        res = T.evaluate_with_ttt(model, tokens, luts, args, *where)
        print(f"{path} lr {lr}: {time.perf_counter() - t0:.1f}s val_loss {res['val_loss']:.6f} "
              f"steps {res['ttt_steps']} tokens {res['tokens']}", flush=True)
