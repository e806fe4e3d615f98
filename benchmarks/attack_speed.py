"""How fast are the book's attacks? Ours against torchattacks, and our PGD loop against its floor.

Run by hand (not a test)::

    python benchmarks/attack_speed.py [--device cpu|cuda] [--batch 256] [--repeats 3]
                                      [--profile fast|full] [--json PATH]

On the chapter-2 model (``utils.zoo.standard_spec()``, trained once and cached) and a fixed batch
of test digits it measures, in one run and on the same batch:

* throughput (images per second) of our FGSM, PGD-10, PGD-40, APGD-100 and CW against
  torchattacks' FGSM, PGD (same eps, alpha, steps, random start), APGD (same eps, steps,
  cross-entropy loss, one run) and CW (same c, kappa, steps, lr; ours with one binary-search
  step, the same budget), and the ratio ours / theirs (>= 1: ours is at least as fast);
* the floor: the time of one forward and backward pass with respect to the input on the same
  batch (the cost no PGD step can avoid), and our PGD-k (APGD-k) time divided by the time of k
  such passes in a row, timed the same way: the overhead of our loop (1.00 would be none at all).

Every timing is the best of ``--repeats`` runs after a warm-up run, with ours and theirs
interleaved so that a noisy machine hurts both alike; on a GPU each run is bracketed by
``torch.cuda.synchronize()``. The robust accuracy each attack leaves on the batch is printed
beside it, to show that both sides did comparable work.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from utils import attacks, cache, config, data, zoo  # noqa: E402
from utils.evaluate import accuracy  # noqa: E402

EPS = 0.3            # L∞ budget of the MNIST literature (Madry et al. 2018)
CW = dict(c=1.0, kappa=0.0, steps=100, lr=0.1)
APGD_STEPS = 100     # Croce & Hein's budget


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--batch", type=int, default=256, help="number of test digits attacked at once")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per attack (best one counts)")
    p.add_argument("--profile", choices=sorted(config.PROFILES), default=None,
                   help="training profile of the model (default: ADVBOOK_PROFILE or full)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall-clock time (default), or this process's CPU time: steadier on a CPU "
                        "shared with other work (use it with --threads 1; meaningless on a GPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--markdown", type=Path, default=None,
                   help="also write a Markdown report here (the book's results page includes "
                        "benchmarks/results/attack_speed.md)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but CUDA is not available")
    if args.clock == "cpu" and (args.device == "cuda" or (args.device is None and torch.cuda.is_available())):
        p.error("--clock cpu measures CPU work only; on a GPU use the wall clock")
    return args


def timer(device: torch.device, clock: str = "wall") -> Callable[[Callable[[], object]], float]:
    """A function that runs ``fn`` once and returns its duration in seconds."""
    now = time.perf_counter if clock == "wall" else time.process_time

    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = now()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return now() - start
    return run


def input_gradient_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The floor of one PGD step: forward and backward with respect to the input, nothing else."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torchattacks  # the reference; imported here so --help works without it

    if args.threads:
        torch.set_num_threads(args.threads)
    device = config.get_device(args.device)
    profile = config.get_profile(args.profile)
    config.seed_everything(0)

    mnist = data.load_mnist(profile)
    trained = cache.load_or_train(zoo.standard_spec(profile), mnist, device=device, progress=False)
    model = trained.model.eval()
    n = min(args.batch, len(mnist.y_test))
    x, y = mnist.x_test[:n].to(device), mnist.y_test[:n].to(device)
    time_it = timer(device, args.clock)

    print(f"model: {trained!r}")
    print(f"data: {mnist.description}; batch of {n} test digits; device {device}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"torchattacks {torchattacks.__version__}; {args.clock} clock, best of {args.repeats} after a warm-up")
    print(f"clean accuracy on the batch: {100 * accuracy(model, x, y):.1f}%")
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load_before is not None:
        print(f"load average {load_before:.2f} on {os.cpu_count()} cores")
    print()

    def pgd_pair(steps: int):
        alpha = 2.5 * EPS / steps
        ours = functools.partial(attacks.pgd, eps=EPS, alpha=alpha, steps=steps, random_start=True)
        theirs = torchattacks.PGD(model, eps=EPS, alpha=alpha, steps=steps, random_start=True)
        return ours, theirs, steps

    pairs: list[tuple[str, Callable, Callable, int | None]] = [
        ("FGSM", functools.partial(attacks.fgsm, eps=EPS), torchattacks.FGSM(model, eps=EPS), 1),
        ("PGD-10", *pgd_pair(10)),
        ("PGD-40", *pgd_pair(40)),
        (f"APGD-{APGD_STEPS} (CE)", functools.partial(attacks.apgd, eps=EPS, steps=APGD_STEPS, loss="ce"),
         torchattacks.APGD(model, eps=EPS, steps=APGD_STEPS, loss="ce", n_restarts=1), APGD_STEPS),
        (f"CW-{CW['steps']} (one c)", functools.partial(attacks.cw_l2, binary_search_steps=1, **CW),
         torchattacks.CW(model, **CW), None),
    ]

    def floor_block(steps: int) -> None:
        """``steps`` input-gradient steps in a row, parameters frozen as in our attacks: the
        least any ``steps``-step attack has to do, timed like the attack itself."""
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            for _ in range(steps):
                input_gradient_step(model, x, y)
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)

    rows = []
    floor_per_step = []
    for name, ours, theirs, steps in pairs:
        call_ours = lambda: ours(model, x, y)
        call_theirs = lambda: theirs(x, y).detach()  # torchattacks' APGD returns a tensor that requires grad
        call_floor = (lambda: floor_block(steps)) if steps else None
        x_ours, x_theirs = call_ours(), call_theirs()  # warm-up, and the results we report
        if call_floor:
            call_floor()
        t_ours, t_theirs, t_floor = [], [], []
        for _ in range(args.repeats):  # interleaved: a noisy spell hurts all three alike
            t_ours.append(time_it(call_ours))
            t_theirs.append(time_it(call_theirs))
            if call_floor:
                t_floor.append(time_it(call_floor))
        model.zero_grad(set_to_none=True)  # torchattacks' CW writes .grad into the parameters
        if t_floor:
            floor_per_step.append(min(t_floor) / steps)
        rows.append({
            "attack": name, "steps": steps,
            "ours_s": min(t_ours), "theirs_s": min(t_theirs),
            "ours_img_s": n / min(t_ours), "theirs_img_s": n / min(t_theirs),
            "ratio": min(t_theirs) / min(t_ours),
            "ours_robust_acc": accuracy(model, x_ours, y), "theirs_robust_acc": accuracy(model, x_theirs, y),
            "floor_s": min(t_floor) if t_floor else None,
            "overhead_vs_floor": (min(t_ours) / min(t_floor)) if t_floor else None,
        })
    floor = min(floor_per_step)

    # ---- the table ----
    head = f"{'attack':<18}{'ours img/s':>12}{'torchattacks':>14}{'ours/theirs':>13}{'robust acc ours/theirs':>25}"
    print(head)
    print("-" * len(head))
    for r in rows:
        acc = f"{100 * r['ours_robust_acc']:.1f}% / {100 * r['theirs_robust_acc']:.1f}%"
        print(f"{r['attack']:<18}{r['ours_img_s']:>12.1f}{r['theirs_img_s']:>14.1f}{r['ratio']:>13.2f}{acc:>25}")
    print()
    print(f"floor: one forward+backward w.r.t. the input on {n} digits = {1e3 * floor:.1f} ms "
          f"({n / floor:.0f} img/s)")
    for r in rows:
        if r["overhead_vs_floor"] is not None:
            print(f"{r['attack']}: {1e3 * r['ours_s']:.1f} ms / {r['steps']} input-gradient step(s) in a row "
                  f"{1e3 * r['floor_s']:.1f} ms = {r['overhead_vs_floor']:.3f}")
    slow = [r["attack"] for r in rows if r["ratio"] < 1.0]
    heavy = [r["attack"] for r in rows if r["attack"].startswith("PGD") and r["overhead_vs_floor"] > 1.10]
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    # the load average counts this run's own threads too; more than that means competition
    if device.type == "cpu" and load_after is not None and max(load_before, load_after) > torch.get_num_threads() + 0.5:
        print(f"note: other work was competing for the CPU (load average {load_before:.2f} before, "
              f"{load_after:.2f} after, {os.cpu_count()} cores): expect noisy ratios; "
              "--threads 1 --clock cpu and more --repeats are steadier")
    print()
    print("targets: every ratio >= 1.00 ->", "met" if not slow else f"NOT met for {', '.join(slow)}")
    print("         PGD overhead <= 1.10 ->", "met" if not heavy else f"NOT met for {', '.join(heavy)}")

    result = {
        "device": str(device), "torch": torch.__version__, "torchattacks": torchattacks.__version__,
        "threads": torch.get_num_threads(), "platform": platform.platform(),
        "batch": n, "repeats": args.repeats, "clock": args.clock, "profile": profile.name, "data": mnist.description,
        "model": repr(trained), "eps": EPS, "cw": CW,
        "floor_s": floor, "rows": rows, "load_average": [load_before, load_after],
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_report(result))
        print(f"wrote {args.markdown}")
    return result


def markdown_report(result: dict) -> str:
    """The measurements as a Markdown section: the table, the overheads, and where they were taken."""
    clock = ("CPU time of this process" if result["clock"] == "cpu" else "wall-clock time")
    lines = [
        "| attack | ours (img/s) | torchattacks (img/s) | ours / theirs | robust accuracy, ours / theirs |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['attack']} | {r['ours_img_s']:.1f} | {r['theirs_img_s']:.1f} | {r['ratio']:.2f} | "
                     f"{100 * r['ours_robust_acc']:.1f}% / {100 * r['theirs_robust_acc']:.1f}% |")
    over = [f"{r['attack']} {r['overhead_vs_floor']:.3f}" for r in result["rows"] if r["overhead_vs_floor"] is not None]
    load = result.get("load_average") or [None, None]
    load_text = "" if load[0] is None else f" Load average {load[0]:.2f} before and {load[1]:.2f} after the run."
    return "\n".join([
        "Throughput of the book's attacks (`utils.attacks`) and of torchattacks "
        f"{result['torchattacks']} on the same model and digits, measured side by side by "
        "`benchmarks/attack_speed.py` (see `benchmarks/README.md` for what each row runs).",
        "",
        *lines,
        "",
        "Overhead of our PGD and APGD loops over the same number of bare forward-backward passes with respect "
        "to the input (1.00 would be no overhead): " + ", ".join(over) + ".",
        "",
        f"Measured on {result['device']} ({result['platform']}), {result['threads']} thread(s), torch "
        f"{result['torch']}, batch of {result['batch']} digits, best of {result['repeats']} runs, {clock}; "
        f"model: {result['model']}; data: {result['data']}; ε = {result['eps']}.{load_text}",
        "",
    ])


if __name__ == "__main__":
    main()
