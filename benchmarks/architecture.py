"""What does the network cost? The book's two CNNs side by side, on the passes attacks and training make.

Run by hand (not a test)::

    python benchmarks/architecture.py [--device cpu|cuda] [--batch 256] [--repeats 5] [--threads N]
                                      [--clock wall|cpu] [--json PATH]

For ``"cnn"`` (:class:`utils.models.MnistCNN`, four 3x3 convolutions and two max-pools, the book's
network until it measured this) and ``"small_cnn"`` (:class:`utils.models.SmallCNN`, two 4x4 convolutions
of stride 2, the book's network now), both untrained
(the cost of a pass does not depend on the weights), it measures on one batch of random pixels:

* ``input gradient``: a forward and a backward pass with respect to the input, the step of every
  gradient attack (PGD, APGD, FAB, Carlini & Wagner);
* ``forward``: a forward pass without gradients, the query of a black-box attack (Square);
* ``training step``: forward, backward with respect to the weights and an Adam step, on clean digits.

It prints the throughput of both (images per second) and the ratio small_cnn / cnn. Every timing is the
best of ``--repeats`` runs after a warm-up, with the two networks interleaved in each repeat so that a
noisy spell hurts both alike. On a shared CPU use ``--threads 1 --clock cpu`` (the CPU time this
process spent, which repeats to about 1%).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.models import MnistCNN, SmallCNN, build_model, count_parameters  # noqa: E402

ARCHS = ("cnn", "small_cnn")


def timer(clock: str, device: torch.device) -> Callable[[Callable[[], None], int], float]:
    now = time.process_time if clock == "cpu" else time.perf_counter

    def run(fn: Callable[[], None], n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = now()
        for _ in range(n):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return now() - start

    return run


def passes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def input_gradient() -> None:
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(loss_fn(model(xx), y), xx)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def training_step() -> None:
        optimiser.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimiser.step()

    return {"input gradient": input_gradient, "forward": forward, "training step": training_step}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="passes per timed run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.calls < 1:
        parser.error("--batch, --repeats and --calls must be positive")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    nets = {a: build_model(a).to(device) for a in ARCHS}
    assert isinstance(nets["cnn"], MnistCNN) and isinstance(nets["small_cnn"], SmallCNN)
    work = {a: passes(nets[a], x, y) for a in ARCHS}
    run = timer(args.clock, device)
    best: dict[str, dict[str, float]] = {a: {} for a in ARCHS}
    for row in work["cnn"]:
        for a in ARCHS:
            run(work[a][row], 1)  # warm-up
        for _ in range(args.repeats):
            for a in ARCHS:
                t = run(work[a][row], args.calls)
                best[a][row] = min(best[a].get(row, float("inf")), t)
    rate = {a: {row: args.batch * args.calls / t for row, t in best[a].items()} for a in ARCHS}
    print(f"device {device}, {torch.get_num_threads()} thread(s), batch {args.batch}, best of {args.repeats} "
          f"({args.clock} clock), {platform.processor() or platform.machine()}")
    print(f"parameters: cnn {count_parameters(nets['cnn']):,}, small_cnn {count_parameters(nets['small_cnn']):,}")
    print(f"{'pass':<16}{'cnn (img/s)':>14}{'small_cnn (img/s)':>20}{'ratio':>9}")
    result = {"device": str(device), "threads": torch.get_num_threads(), "batch": args.batch,
              "clock": args.clock, "rows": {}}
    for row in rate["cnn"]:
        ratio = rate["small_cnn"][row] / rate["cnn"][row]
        print(f"{row:<16}{rate['cnn'][row]:>14,.0f}{rate['small_cnn'][row]:>20,.0f}{ratio:>8.1f}x")
        result["rows"][row] = {"cnn": rate["cnn"][row], "small_cnn": rate["small_cnn"][row], "ratio": ratio}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
