"""Which network, and how many epochs, for the book's adversarially trained models? Measured on validation digits.

Run by hand (not a test)::

    python benchmarks/choose_network.py cnn:32:20 small_cnn:16:100 small_cnn:32:100 [--val 1000]
                                        [--objective pgd_at|trades] [--beta 6] [--lr 1e-3] [--shift 0]
                                        [--ema 0] [--json PATH] [--markdown PATH]

Each candidate ``arch:width:epochs`` is trained with the book's PGD-AT recipe (or, with
``--objective trades``, TRADES with ``--beta`` on the same inner attack)
(:func:`utils.zoo.candidate_spec`: ε = 0.3, 10 PGD steps inside training in the full profile, ε ramped
up over the first quarter, Adam with a cosine schedule, batch 128, seed 0) on the offline training
digits *minus* ``--val`` validation digits (:func:`utils.data.validation_split`, stratified, seed 0),
and then attacked on those validation digits with the five gradient attacks of the book's own evaluation
(:func:`utils.robustness.book_attacks` without its Square attack: FGSM, PGD-40 with 5 restarts on the
cross-entropy and on the margin loss, APGD-CE and APGD-T with 100 iterations). The test digits are never touched: the choice of
network and budget is made here, and the test digits measure the chosen one once, in the chapters.

With ``--json``, rows of earlier runs stay in the file and ``--markdown`` tables them all, so candidates
with different options can be measured by several runs into one table.

Printed per candidate: the training time, the time of the five attacks, clean accuracy, each attack's
accuracy and the per-digit worst case with its standard error. Times are wall-clock on this machine:
compare candidates measured in one run, on a machine doing nothing else. Models are cached like the
book's (``ADVBOOK_CACHE``), so a second run only attacks. ``small_cnn`` is
:class:`utils.models.SmallCNN`, the network the book chose with this script.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import zoo  # noqa: E402
from utils.cache import load_or_train  # noqa: E402
from utils.config import get_profile  # noqa: E402
from utils.data import load_mnist, validation_split  # noqa: E402
from utils.robustness import book_attacks, robustness_table  # noqa: E402


def parse_candidate(text: str) -> tuple[str, int, int]:
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"a candidate is arch:width:epochs, got {text!r}")
    arch, width, epochs = parts[0], int(parts[1]), int(parts[2])
    if width < 1 or epochs < 1:
        raise argparse.ArgumentTypeError(f"width and epochs must be positive, got {text!r}")
    return arch, width, epochs


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table, with a line saying what was measured on what."""
    meta = ("objective", "arch", "width", "epochs", "lr", "shift", "ema", "train_s", "attack_s", "n", "train_n",
            "source", "se")
    # the headline first, so that a reader sees it without scrolling; the times last
    cols = [k for k in rows[0] if k not in meta]
    cols = [c for c in cols if c == "worst case"] + [c for c in cols if c != "worst case"]
    lines = ["| objective | network | epochs | lr | shift | EMA | " + " | ".join(cols) + " | training | five attacks |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(cols) + "---:|---:|"]
    for r in rows:
        cells = [f"{r[c]:.1%}" + (f" ± {r['se']:.1%}" if c == "worst case" else "") for c in cols]
        lines.append(f"| {r.get('objective', 'pgd_at')} | `{r['arch']}` width {r['width']} | {r['epochs']} | "
                     f"{r['lr']:g} | {r['shift']} | {r['ema'] or 'off'} | " + " | ".join(cells)
                     + f" | {r['train_s'] / 60:.1f} min | {r['attack_s'] / 60:.1f} min |")
    sizes = sorted({(r["train_n"], r["n"], r["source"]) for r in rows})
    lines.append("\nAdversarial training at ε = " + f"{zoo.DEFENCE_EPS} (L∞): " + "; ".join(
        f"trained on {t:,} digits, attacked on {n:,} validation digits carved from the training digits ({src})"
        for t, n, src in sizes) + ". Times are wall-clock, one PyTorch thread.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("candidates", nargs="*", type=parse_candidate, metavar="ARCH:WIDTH:EPOCHS",
                        help="none: only write --markdown from the rows already in --json")
    parser.add_argument("--val", type=int, default=1000, help="validation digits carved from the training digits")
    parser.add_argument("--objective", choices=zoo.CANDIDATE_OBJECTIVES, default="pgd_at")
    parser.add_argument("--beta", type=float, default=6.0, help="TRADES' weight of its robustness term")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--shift", type=int, default=0, help="random shifts of up to this many pixels in training")
    parser.add_argument("--ema", type=float, default=0.0, help="decay of a moving average of the weights (0: off)")
    parser.add_argument("--profile", default="full")
    parser.add_argument("--json", type=Path, default=None,
                        help="keep the rows here; rows of earlier runs with other candidates or options stay")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.candidates:
        if args.json is None or not args.json.exists() or args.markdown is None:
            parser.error("without candidates, give --json (an existing file of rows) and --markdown")
        rows = json.loads(args.json.read_text())
        args.markdown.write_text(markdown(rows))
        return rows
    profile = get_profile(args.profile)
    data = load_mnist(profile)
    train, x_val, y_val = validation_split(data, args.val)
    # The book's gradient attacks: Square (the sixth) costs as much again on a robust candidate, and the
    # chapters measure the chosen recipe with all six on the test digits.
    attacks = {k: v for k, v in book_attacks(zoo.DEFENCE_EPS, profile).items() if not k.startswith("Square")}
    rows = []
    for arch, width, epochs in args.candidates:
        hidden = {"cnn": 200, "small_cnn": 100 if width <= 16 else 200}.get(arch)
        kwargs = (("width", width),) + ((("hidden", hidden),) if hidden is not None else ())
        tag = args.objective + (f"{args.beta:g}" if args.objective == "trades" else "")
        name = (f"val_{tag}_{arch}{width}_e{epochs}_lr{args.lr:g}_shift{args.shift}_ema{args.ema:g}"
                .replace(".", "p").replace("-", "m"))
        spec = zoo.candidate_spec(name, args.objective, profile, beta=args.beta, epochs=epochs, arch=arch,
                                  arch_kwargs=kwargs, lr=args.lr, shift=args.shift, ema=args.ema)
        start = time.perf_counter()
        tm = load_or_train(spec, train, progress=False)
        train_s = tm.train_seconds if tm.train_seconds else time.perf_counter() - start
        start = time.perf_counter()
        torch.manual_seed(600)
        table = robustness_table({name: tm.model}, x_val, y_val, attacks, eps=zoo.DEFENCE_EPS, progress=False)
        attack_s = time.perf_counter() - start
        acc = table.acc[name]
        worst = acc["worst case"]
        objective = args.objective + (f" β={args.beta:g}" if args.objective == "trades" else "")
        row = {"objective": objective, "arch": arch, "width": width, "epochs": epochs, "lr": args.lr,
               "shift": args.shift, "ema": args.ema, "train_s": round(train_s, 1),
               "attack_s": round(attack_s, 1), "n": len(y_val), "train_n": len(train.y_train),
               "source": data.source, **{k: round(v, 4) for k, v in acc.items()},
               "se": round(math.sqrt(worst * (1 - worst) / len(y_val)), 4)}
        rows.append(row)
        print(f"{arch}:{width}:{epochs}  train {train_s / 60:5.1f} min  attacks {attack_s / 60:4.1f} min  "
              f"clean {acc['clean']:.1%}  " + "  ".join(f"{k} {v:.1%}" for k, v in acc.items()
                                                       if k not in ("clean", "worst case"))
              + f"  worst {worst:.1%} ± {row['se']:.1%}", flush=True)
    if args.json is not None:
        # rows measured by earlier runs (other options) stay; a candidate measured again replaces its row
        earlier = json.loads(args.json.read_text()) if args.json.exists() else []
        ident = ("objective", "arch", "width", "epochs", "lr", "shift", "ema", "n")
        def identity(r: dict) -> tuple:
            return tuple(r.get(k, "pgd_at" if k == "objective" else None) for k in ident)
        mine = {identity(r) for r in rows}
        rows = [r for r in earlier if identity(r) not in mine] + rows
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
