"""The file that ships as train_gpt.py: the readable source less its comments and docstrings
(train_gpt.minified) compressed into a self-extracting wrapper (train_gpt.shipped_form), whose
size is what the artifact counts as code.

    python3 tools/ship.py [OUT]               write it (default dist/train_gpt.py) and check it
    python3 tools/ship.py --decode FILE [OUT]  the code back out of a shipped file

The wrapper decodes the code into SHIPPED_SOURCE and executes it: the source's syntax tree less
its docstrings, so a run through it is the run of the source; train_gpt.py then counts the
wrapper's own size. Like every
tool, it works on the train_gpt.py of the current folder if there is one, else the repository's."""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.getcwd(), ROOT]  # a run's own copy first
import train_gpt as T  # noqa: E402

DECODE = ("import sys\n"  # run the wrapper's first statements only: decode, do not execute
          "src=open(sys.argv[1],'rb').read().split(b'\\nexec(')[0]\n"
          "ns={}\nexec(compile(src,sys.argv[1],'exec'),ns)\nsys.stdout.buffer.write(ns['SHIPPED_SOURCE'])\n")


def decode(path):
    """The source a shipped file carries (read by running its decoding lines, not the source)."""
    return subprocess.run([sys.executable, "-c", DECODE, path], capture_output=True, check=True).stdout


def main(argv):
    if argv[:1] == ["--decode"] and len(argv) in (2, 3):
        source = decode(argv[1])
        out = argv[2] if len(argv) == 3 else None
        if out:
            T.write_atomic(out, source)
            print(f"{out}: {len(source)} bytes of source")
        else:
            sys.stdout.buffer.write(source)
        return 0
    if len(argv) > 1 or argv[:1] and argv[0].startswith("-"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out = argv[0] if argv else os.path.join(ROOT, "dist", "train_gpt.py")
    with open(T.__file__, "rb") as f:
        source = f.read()
    shipped = T.shipped_form(source)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    T.write_atomic(out, shipped)
    code = T.minified(source)
    if decode(out) != code:
        print(f"{out}: decoding does not give the minified source back", file=sys.stderr)
        return 1
    print(f"{out}: {len(shipped)} bytes shipped for {len(source)} bytes of source ({len(code)} minified; "
          f"decodes to it exactly)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
