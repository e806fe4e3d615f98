"""Interactive explorers. Each is thin wiring of ipywidgets around a pure function that the tests
check directly.

Two kinds:

* :func:`frame_explorer` draws every combination of a few control values once, when the cell runs,
  and switches between the finished frames in the browser (nested ``Stack`` widgets whose
  ``selected_index`` is ``jslink``-ed to the sliders). It needs no kernel, so it works in the
  published HTML book as well as in Jupyter and Colab. The chapters' explorers are of this kind;
  :func:`attack_frames` and :func:`logit_frames` are their drawing functions.
* :func:`logit_explorer`, :func:`perturbation_explorer` and :func:`attack_explorer` recompute for any
  value, so they need a running kernel: in a published page their figure stays as it was drawn.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import torch

from .energy import summarize_logits
from .evaluate import predict
from .plot import plot_logit_summary, show_perturbations

Perturb = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]

MAX_FRAMES = 200  # a frame is a PNG of a few kB to a few tens of kB, saved inside the page


def _options(values) -> list[tuple[str, object]]:
    """``[(label, value), ...]`` from a sequence of values or of ``(label, value)`` pairs."""
    out = []
    for v in values:
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
            out.append(v)
        else:
            out.append((f"{v:g}" if isinstance(v, float) else str(v), v))
    if not out:
        raise ValueError("every control needs at least one value")
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"the labels of a control must differ, got {labels}")
    return out


def figure_png(fig, dpi: float = 80) -> bytes:
    """The figure as PNG bytes (tight bounding box); the figure is closed."""
    import io

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def frame_explorer(render: Callable[..., object], controls: Mapping[str, Sequence], *, dpi: float = 80,
                   initial: Mapping[str, object] | None = None):
    """An explorer that works without a kernel: every frame is drawn now, the browser switches.

    ``controls`` maps a keyword of ``render`` to its values (or ``(label, value)`` pairs), in the
    order the sliders appear; ``render(**values)`` returns a matplotlib figure, or ``(figure, text)``
    where ``text`` is a line of HTML shown above the figure. Every combination is drawn once
    (at most :data:`MAX_FRAMES`), as a PNG at ``dpi``. The first control selects among nested
    ``Stack`` widgets, the second among the stacks inside each of those, and so on; each slider's
    ``index`` is linked in the browser (``jslink``) to the ``selected_index`` of every stack of its
    level, so moving a slider shows another finished frame with no kernel behind the page.
    ``initial`` picks the starting value of some controls. The returned ``VBox`` carries the CSS
    class ``book-explorer``.
    """
    import ipywidgets as W

    if not controls:
        raise ValueError("frame_explorer needs at least one control")
    names = list(controls)
    options = {name: _options(controls[name]) for name in names}
    total = 1
    for name in names:
        total *= len(options[name])
    if total > MAX_FRAMES:
        raise ValueError(f"{total} frames is more than MAX_FRAMES = {MAX_FRAMES}: use fewer values")
    start = {}
    for name, value in (initial or {}).items():
        if name not in options:
            raise ValueError(f"initial names an unknown control {name!r}")
        values = [v for _, v in options[name]]
        if value not in values:
            raise ValueError(f"initial value {value!r} of {name!r} is not one of {values}")
        start[name] = values.index(value)

    sliders = {}
    for name in names:
        labels = [label for label, _ in options[name]]
        cls = W.SelectionSlider if len(labels) > 1 else W.Dropdown
        sliders[name] = cls(options=labels, index=start.get(name, 0), description=name,
                            continuous_update=True, style={"description_width": "initial"},
                            layout=W.Layout(width="320px"))
    stacks_at: list[list] = [[] for _ in names]

    def build(level: int, fixed: dict):
        if level == len(names):
            drawn = render(**fixed)
            fig, text = drawn if isinstance(drawn, tuple) else (drawn, None)
            image = W.Image(value=figure_png(fig, dpi), format="png")
            return W.VBox([W.HTML(text), image]) if text is not None else image
        name = names[level]
        children = [build(level + 1, {**fixed, name: value}) for _, value in options[name]]
        stack = W.Stack(children=children, selected_index=start.get(name, 0))
        stacks_at[level].append(stack)
        return stack

    frames = build(0, {})
    links = [W.jslink((sliders[name], "index"), (stack, "selected_index"))
             for name, stacks in zip(names, stacks_at) for stack in stacks]
    box = W.VBox([W.HBox(list(sliders.values()), layout=W.Layout(flex_flow="row wrap")), frames])
    box.add_class("book-explorer")
    box.links = links  # keep the links alive with the widget
    box.frame_count = total
    return box


def attack_frame(case: "AttackCase", *, title: str = ""):
    """One explorer frame: clean digit, perturbation and attacked digit side by side, with the
    predictions; returns ``(figure, status line)``."""
    fig, axes = plt.subplots(1, 3, figsize=(5.4, 2.2))
    delta = (case.x_adv - case.x)[0]
    bound = max(float(delta.abs().max()), 1e-6)
    axes[0].imshow(case.x[0, 0].numpy(), cmap="gray", vmin=0, vmax=1)
    axes[0].set_title(f"label {case.label}, predicted {case.pred_clean}", fontsize=9)
    axes[1].imshow(delta[0].numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound)
    axes[1].set_title(f"δ: max |δ| = {case.linf:.2f}, ‖δ‖₂ = {case.l2:.2f}", fontsize=9)
    axes[2].imshow(case.x_adv[0, 0].numpy(), cmap="gray", vmin=0, vmax=1)
    axes[2].set_title(f"predicted {case.pred_adv} (p = {case.prob_adv:.2f})", fontsize=9,
                      color="crimson" if case.pred_adv != case.label else "black")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    verdict = "success" if case.success else "no success"
    goal = "untargeted" if case.target is None else f"target {case.target}"
    return fig, f"{goal}: prediction {case.pred_clean} → <b>{case.pred_adv}</b> · {verdict}"


def attack_frames(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Callable, *,
                  digit_key: str = "digit", goal_key: str | None = None, title: Callable[..., str] | None = None):
    """A ``render`` function for :func:`frame_explorer` that attacks one digit with one setting.

    ``render(digit=i, goal=None|k, **params)`` runs :func:`run_attack_case` on digit ``i`` of
    ``(x, y)`` (targeted at ``k`` when a goal control is named and not None) and draws it with
    :func:`attack_frame`."""
    def render(**values):
        values = dict(values)
        index = int(values.pop(digit_key))
        target = values.pop(goal_key) if goal_key is not None else None
        case = run_attack_case(model, x, y, attack, index, target, **values)
        return attack_frame(case, title=title(**values) if title else "")

    return render


def logit_frames(logits: Sequence[float] = (2.0, 1.0, 0.1)):
    """A ``render`` function for :func:`frame_explorer`: ``render(shift=s, T=t)`` draws
    :func:`utils.plot.plot_logit_summary` for ``logits + s`` at temperature ``t``."""
    base = [float(v) for v in logits]

    def render(shift: float = 0.0, T: float = 1.0):
        summary = summarize_logits([v + shift for v in base], T)
        fig = plot_logit_summary(summary)[0]
        text = (f"logits {', '.join(f'{v + shift:.1f}' for v in base)} at T = {T:g}: "
                f"energy <b>{float(summary.energy):.2f}</b>")
        return fig, text

    return render


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


def models_attack_frames(models: Mapping[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor, attack: Callable,
                         *, model_key: str = "model", digit_key: str = "digit"):
    """Like :func:`attack_frames`, with one more control: which of ``models`` is attacked.

    ``render(model=name, digit=i, **params)`` attacks digit ``i`` of ``(x, y)`` on ``models[name]``
    with ``attack(model, x, y, **params)`` (untargeted) and draws it with :func:`attack_frame`; the
    title names the model and the parameters."""
    if not models:
        raise ValueError("models_attack_frames needs at least one model")

    def render(**values):
        values = dict(values)
        name = values.pop(model_key)
        if name not in models:
            raise ValueError(f"unknown model {name!r}; the explorer has {list(models)}")
        index = int(values.pop(digit_key))
        case = run_attack_case(models[name], x, y, attack, index, None, **values)
        params = ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}" for k, v in values.items())
        return attack_frame(case, title=f"{name}: {params}")

    return render
