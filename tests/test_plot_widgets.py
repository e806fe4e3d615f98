import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from utils import plot, widgets  # noqa: E402
from utils.energy import summarize_logits  # noqa: E402
from utils.models import build_model  # noqa: E402
from utils.train import History, EpochRecord  # noqa: E402


@pytest.fixture(autouse=True)
def _no_show(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("plot helpers must not call plt.show()")

    monkeypatch.setattr(plt, "show", refuse)
    yield
    plt.close("all")


def test_plot_helpers_return_figure_and_axes():
    x = torch.rand(5, 1, 28, 28)
    fig, axes = plot.show_images(x, [str(i) for i in range(5)], ncols=3)
    assert axes.shape == (2, 3) and axes[0, 1].get_title() == "1"
    fig, axes = plot.show_perturbations(x[:2], (x[:2] + 0.1).clamp(0, 1), [1, 2], [1, 3], labels=[1, 2])
    assert axes.shape == (3, 2)
    assert axes[2, 1].title.get_color() == "crimson" and axes[2, 0].title.get_color() == "black"
    fig, ax = plot.plot_confusion(torch.eye(10, dtype=torch.long) * 5)
    assert ax.get_xlabel() == "predicted"
    fig, ax = plot.plot_curves([0, 0.1, 0.2], {"a": [1, 0.5, 0.1], "b": [1, 0.9, 0.8]}, xlabel="ε", ylabel="acc")
    assert len(ax.get_lines()) == 2
    fig, ax = plot.plot_histograms({"clean": torch.randn(100), "noisy": torch.randn(100) + 2}, xlabel="E")
    assert len(ax.patches) > 0
    fig, axes = plot.plot_logit_summary(summarize_logits([2.0, 1.0, 0.1]))
    assert "-2.4170" in fig._suptitle.get_text()
    hist = History([EpochRecord(1, 1.0, 0.5, 0.9, 0.6, 1.0, 1e-3, {}), EpochRecord(2, 0.5, 0.8, 0.6, 0.7, 1.0, 1e-3, {})])
    fig, axes = plot.plot_history(hist)
    assert len(axes[1].get_lines()) == 2


def test_plot_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        plot.show_images(torch.zeros(0, 1, 28, 28))
    with pytest.raises(ValueError, match="same shape"):
        plot.show_perturbations(torch.zeros(2, 1, 28, 28), torch.zeros(3, 1, 28, 28), [0, 0], [0, 0])


def test_logit_explorer_redraws_from_the_pure_function(monkeypatch):
    seen = []
    real = widgets.summarize_logits
    monkeypatch.setattr(widgets, "summarize_logits", lambda v, T: seen.append((tuple(v), T)) or real(v, T))
    box = widgets.logit_explorer((2.0, 1.0, 0.1))
    controls = box.children[0].children
    assert len(controls) == 5  # three logit sliders, T, the shift button
    assert seen[-1] == ((2.0, 1.0, 0.1), 1.0)
    controls[1].value = 3.0
    assert seen[-1][0] == (2.0, 3.0, 0.1)
    controls[4].click()  # add 1 to every logit
    assert seen[-1][0] == pytest.approx((3.0, 4.0, 1.1))


def test_perturbation_explorer_calls_the_chosen_method():
    model = build_model("mlp", hidden=8).eval()
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    calls = []

    def noise(m, xb, yb, eps):
        calls.append(("noise", len(xb), eps))
        return (xb + eps).clamp(0, 1)

    box = widgets.perturbation_explorer(model, x, y, {"noise": noise}, eps=0.2)
    index, method, size = box.children[0].children
    size.value = 0.3
    index.value = 2
    assert calls[0] == ("noise", 1, 0.2) and calls[-1] == ("noise", 1, 0.3)
    with pytest.raises(ValueError, match="at least one"):
        widgets.perturbation_explorer(model, x, y, {})


def test_attack_explorer_passes_sliders_and_targets_to_the_attack():
    model = build_model("mlp", hidden=8).eval()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    calls = []

    def attack(m, xb, yb, eps=0.0, steps=1, targeted=False):
        calls.append((int(yb[0]), eps, steps, targeted))
        return (xb + eps).clamp(0, 1)

    box = widgets.attack_explorer(model, x, y, attack, sliders={"eps": (0.0, 0.5, 0.01, 0.1), "steps": (1, 50, 1, 5)})
    assert calls[-1] == (0, 0.1, 5, False)
    index, eps, steps = box.children[0].children
    (goal,) = box.children[1].children
    assert isinstance(steps.value, int)
    eps.value = 0.2
    index.value = 3
    assert calls[-1] == (3, 0.2, 5, False)
    goal.value = 7
    assert calls[-1] == (7, 0.2, 5, True)
    case = widgets.run_attack_case(model, x, y, attack, 1, eps=0.3)
    assert case.label == 1 and case.target is None and 0.29 < case.linf <= 0.3 + 1e-6
    assert case.success == (case.pred_adv != 1)
    targeted_case = widgets.run_attack_case(model, x, y, attack, 1, target=4, eps=0.0)
    assert targeted_case.target == 4 and targeted_case.success == (targeted_case.pred_adv == 4)
    with pytest.raises(ValueError, match="index"):
        widgets.run_attack_case(model, x, y, attack, 9)
