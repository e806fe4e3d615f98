"""Interactive explorers. Each is thin wiring of ipywidgets around a pure function that the tests
check directly; each chapter shows a static figure of the explorer's default state beside it, so
the page reads fully without a running kernel."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import torch

from .energy import summarize_logits
from .evaluate import predict
from .plot import plot_logit_summary, show_perturbations

Perturb = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _show(fig) -> None:
    from IPython.display import display

    display(fig)
    plt.close(fig)


def logit_explorer(logits: Sequence[float] = (2.0, 1.0, 0.1), T: float = 1.0, *, lo: float = -6.0, hi: float = 6.0):
    """Sliders for each logit and for the temperature; shows logits, softmax and the energy
    (:func:`utils.energy.summarize_logits` drawn by :func:`utils.plot.plot_logit_summary`)."""
    import ipywidgets as W

    wide = W.Layout(width="300px")
    sliders = [W.FloatSlider(value=float(v), min=lo, max=hi, step=0.1, description=f"f_{i}",
                             continuous_update=False, layout=wide) for i, v in enumerate(logits)]
    temp = W.FloatLogSlider(value=float(T), base=10, min=-1, max=1, step=0.05, description="T",
                            continuous_update=False, layout=wide)
    shift = W.Button(description="add 1 to every logit")
    out = W.Output()

    def redraw(*_):
        summary = summarize_logits([s.value for s in sliders], temp.value)
        out.clear_output(wait=True)
        with out:
            _show(plot_logit_summary(summary)[0])

    def add_one(_):
        for s in sliders:
            s.value = min(hi, s.value + 1.0)

    for s in sliders + [temp]:
        s.observe(redraw, names="value")
    shift.on_click(add_one)
    redraw()
    controls = W.VBox(sliders + [temp, shift], layout=W.Layout(min_width="310px"))
    return W.HBox([controls, out], layout=W.Layout(flex_flow="row wrap"))


def perturbation_explorer(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    perturbations: Mapping[str, Perturb],
    *,
    eps_max: float = 0.5,
    eps: float = 0.1,
):
    """Pick an example, a perturbation method and its size ε; shows clean input, perturbation and
    perturbed input with the model's predictions. ``perturbations`` maps a name to a pure function
    ``(model, x, y, eps) -> x_perturbed`` (an attack configured with ``functools.partial``, or noise)."""
    import ipywidgets as W

    if not perturbations:
        raise ValueError("perturbation_explorer needs at least one perturbation")
    index = W.IntSlider(value=0, min=0, max=len(x) - 1, description="example", continuous_update=False)
    method = W.Dropdown(options=list(perturbations), description="method")
    size = W.FloatSlider(value=eps, min=0.0, max=eps_max, step=0.01, description="ε", continuous_update=False)
    out = W.Output()

    def redraw(*_):
        i = index.value
        xi, yi = x[i:i + 1], y[i:i + 1]
        x_pert = perturbations[method.value](model, xi, yi, size.value)
        fig, _ = show_perturbations(xi, x_pert, predict(model, xi), predict(model, x_pert), labels=yi, size=2.2)
        out.clear_output(wait=True)
        with out:
            _show(fig)

    for w in (index, method, size):
        w.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox([index, method, size]), out])
