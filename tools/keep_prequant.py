"""Run train_gpt.main() unchanged, but keep a copy of the float (pre-quantization) weights and
the GPTQ Hessians in OUT_DIR/prequant.pt for tools/quant_sweep.py, with the run's settings
(`clip_sigmas` is then the late-QAT grid); saved by a thread, so the timed quantization is not
held up. Run it where you would run train_gpt.py, with the same environment:
python3 tools/keep_prequant.py (a train_gpt.py in the current folder is the one run, else the
repository's); then python3 tools/quant_sweep.py with the same OUT_DIR."""
import argparse, dataclasses, os, sys, threading


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # a wrong argument: one line, before any work
        self.exit(2, f"{self.prog}: {message} (--help: usage)\n")


OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
              epilog="No arguments: the settings are train_gpt.py's environment variables.").parse_args()
import torch
sys.path[:0] = [os.getcwd(), os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]  # a run's own copy first
import train_gpt as T

orig = T.quantize_to_budget
threads = []

def patched(model, hessians, args, budget, run, *rest, **kw):
    if run.rank == 0:
        grid = kw.get("start_clip") or args.clip_sigmas  # the late-QAT grid, where the rate control starts
        blob = {"state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "hessians": {k: v.cpu().clone() for k, v in hessians.items()},
                "args": {**dataclasses.asdict(args), "clip_sigmas": grid}}
        th = threading.Thread(target=torch.save, args=(blob, os.path.join(args.out_dir, "prequant.pt")))
        th.start()
        threads.append(th)
    return orig(model, hessians, args, budget, run, *rest, **kw)

T.quantize_to_budget = patched
T.main()
for th in threads:
    th.join()
print("drive: done", flush=True)
