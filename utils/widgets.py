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


class AttackCase:
    """One example attacked with one setting: what :func:`attack_explorer` draws."""

    def __init__(self, x, x_adv, label, target, pred_clean, pred_adv, prob_adv):
        self.x, self.x_adv = x, x_adv
        self.label, self.target = label, target
        self.pred_clean, self.pred_adv, self.prob_adv = pred_clean, pred_adv, prob_adv
        delta = (x_adv - x).flatten()
        self.linf = float(delta.abs().max()) if delta.numel() else 0.0
        self.l2 = float(delta.norm())

    @property
    def success(self) -> bool:
        """Untargeted: the prediction changed away from the label; targeted: it is the target."""
        if self.target is None:
            return self.pred_adv != self.label
        return self.pred_adv == self.target

    def __repr__(self) -> str:
        goal = "untargeted" if self.target is None else f"target {self.target}"
        return (f"AttackCase(label={self.label}, {goal}: {self.pred_clean} -> {self.pred_adv} "
                f"(p={self.prob_adv:.2f}), ‖δ‖∞={self.linf:.3f}, ‖δ‖₂={self.l2:.3f}, success={self.success})")


def run_attack_case(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Callable, index: int,
                    target: int | None = None, **params) -> AttackCase:
    """Attack example ``index`` of ``(x, y)`` with ``attack(model, x, y, **params)``; targeted at
    ``target`` (passing the target as the label and ``targeted=True``) when it is not None."""
    if not 0 <= index < len(x):
        raise ValueError(f"index must lie in 0..{len(x) - 1}, got {index}")
    xi, yi = x[index:index + 1], y[index:index + 1]
    if target is None:
        x_adv = attack(model, xi, yi, **params)
    else:
        x_adv = attack(model, xi, torch.tensor([int(target)], device=yi.device), targeted=True, **params)
    from .evaluate import predict_logits

    probs = torch.softmax(predict_logits(model, torch.cat([xi, x_adv])), dim=1)
    pred = probs.argmax(dim=1)
    return AttackCase(xi.cpu(), x_adv.detach().cpu(), int(yi), None if target is None else int(target),
                      int(pred[0]), int(pred[1]), float(probs[1, pred[1]]))


def attack_explorer(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Callable,
    *,
    sliders: Mapping[str, tuple] | None = None,
    targeted: bool = True,
    num_classes: int = 10,
):
    """An explorer for any attack with the book's contract.

    ``sliders`` maps a keyword of ``attack`` to ``(min, max, step, default)``: integer steps make an
    integer slider (``"steps": (1, 100, 1, 10)``), float steps a float slider (``"eps": (0, 0.5,
    0.01, 0.1)``). With ``targeted=True`` a drop-down offers "untargeted" or a target class. Each
    change re-runs :func:`run_attack_case` and redraws clean input, perturbation and result.
    """
    import ipywidgets as W

    sliders = dict(sliders or {})
    index = W.IntSlider(value=0, min=0, max=len(x) - 1, description="example", continuous_update=False)
    controls = {}
    for name, spec in sliders.items():
        lo, hi, step, default = spec
        cls = W.IntSlider if all(isinstance(v, int) for v in spec) else W.FloatSlider
        controls[name] = cls(value=default, min=lo, max=hi, step=step, description=name, continuous_update=False)
    goal = W.Dropdown(options=[("untargeted", None)] + [(f"target {k}", k) for k in range(num_classes)],
                      description="goal")
    status = W.HTML()
    out = W.Output()

    def redraw(*_):
        case = run_attack_case(model, x, y, attack, index.value, goal.value if targeted else None,
                               **{k: w.value for k, w in controls.items()})
        status.value = (f"label {case.label} · prediction {case.pred_clean} → <b>{case.pred_adv}</b> "
                        f"(p = {case.prob_adv:.2f}) · ‖δ‖∞ = {case.linf:.3f} · ‖δ‖₂ = {case.l2:.3f} · "
                        f"{'success' if case.success else 'no success'}")
        fig, _ = show_perturbations(case.x, case.x_adv, [case.pred_clean], [case.pred_adv],
                                    labels=[case.label], size=2.2)
        out.clear_output(wait=True)
        with out:
            _show(fig)

    widgets_ = [index, *controls.values()] + ([goal] if targeted else [])
    for w in widgets_:
        w.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox(widgets_[:3]), W.HBox(widgets_[3:]), status, out])
